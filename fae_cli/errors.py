"""User-facing errors: the CLI prints their message on one line and exits with status 2."""


class FaeError(Exception):
    """An error caused by input (a recipe, a path, an artefact), not by a bug in fae."""
