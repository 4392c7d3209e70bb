"""Every inter-stage artifact in one place: file names, schema versions, writers and readers side by side.

One module per artifact: `model` (the model stage's folder), `profile`, `importance` (alpha, the head
Hessians and the GPTQ rounding gains), `allocation`, `metrics` (evaluate), `curve` (report). A stage that only
reads a small artifact imports its module here, never the stage that wrote it.

Wall-clock figures never go into a hashed artifact (a build's outputs must repeat byte for byte): a stage that
times its work writes them to `TIMINGS_FILE` beside its outputs, a file no dvc.yaml out names.
"""

#: Per-run wall-clock figures (seconds, throughput) beside a stage's outputs; DVC does not hash it.
TIMINGS_FILE = "timings.json"
