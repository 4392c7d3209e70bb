"""The MLX backend: affine quantizers and kernels, GPTQ rounding, the rounding rule, the pack cache and the MLX folder."""
