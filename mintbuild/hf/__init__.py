"""Hugging Face checkpoints: reading safetensors, streaming decoder blocks, writing safetensors one tensor at a time,
and the tensor-name conventions (per-expert MoE names) the stages share."""
