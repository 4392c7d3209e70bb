"""Hugging Face checkpoints: reading safetensors, streaming decoder blocks, writing safetensors one tensor at a time."""
