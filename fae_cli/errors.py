"""User-facing errors: the CLI prints their message on one line and exits with their status.

Invalid input exits 2. A run stopped by a signal after writing its checkpoint exits 128 plus
the signal number (143 for SIGTERM, 130 for SIGINT), as a shell reports a killed process, so a
job scheduler can tell "requeue me" from "fix the recipe".
"""


class FaeError(Exception):
    """An error caused by input (a recipe, a path, an artefact), not by a bug in fae."""

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
