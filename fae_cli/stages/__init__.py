"""Stage functions: each takes a validated recipe (and paths) and runs one pipeline stage.

They are callable from Python without the CLI. `plan(recipe)` of each stage module lists the
inputs and outputs without running anything (what `--dry-run` prints).
"""
