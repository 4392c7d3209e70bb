"""The llama.cpp backend: the pinned build, ggml's quantizers, GGUF names and layout, the imatrix, the GGUF
source, llama-quantize packing and llama-perplexity.
"""
