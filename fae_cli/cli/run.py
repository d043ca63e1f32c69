"""`fae run RECIPE`: every stage of a recipe in order."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fae_cli.cli.app import app
from fae_cli.cli.common import DryRunOption, SetOption, print_dry_run, resolve


@app.command("run")
def run_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    sets: SetOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Run every stage of a recipe, skipping stages whose output exists and matches."""
    from fae_cli.stages import pipeline

    resolved = resolve(recipe, sets)
    if dry_run:
        print_dry_run(resolved, pipeline.plan(resolved))
        return
    pipeline.run(resolved)
