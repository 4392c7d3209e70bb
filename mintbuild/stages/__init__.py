"""The stages: one verb = one module = one DVC stage = one CLI subcommand (params in, artifact out).

Nothing imports a stage but the CLI and `sweep`, which composes stages on purpose.
"""
