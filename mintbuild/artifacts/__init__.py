"""Every inter-stage artifact in one place: file names, schema versions, writers and readers side by side.

One module per artifact: `model` (the model stage's folder), `profile`, `importance` (alpha, the head
Hessians and the GPTQ rounding gains), `allocation`, `metrics` (evaluate), `curve` (report). A stage that only
reads a small artifact imports its module here, never the stage that wrote it.
"""
