"""Quantizers: the torch reference of MLX's affine round-to-nearest (`reference`), the SIMD layer (`simd`), the
profile's fused error kernels (`error_kernels`) and the packer's fused quantize-and-pack kernel (`pack_kernel`).

Import the module you need: this package imports nothing, so a stage pays only for the kernels it runs.
"""
