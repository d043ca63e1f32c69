"""Options every stage command shares, recipe loading and the `--dry-run` printout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.syntax import Syntax
from rich.table import Table

from fae_cli.log import console
from fae_cli.recipe import Recipe, load_recipe, recipe_hash, to_toml
from fae_cli.stages.plan import Plan

RecipeOption = Annotated[
    Path | None,
    typer.Option("--recipe", "-r", help="Recipe TOML file; default: built-in defaults.", show_default=False),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe value, e.g. --set adapter.train.steps=100 (repeatable).", show_default=False),
]
DryRunOption = Annotated[
    bool,
    typer.Option("--dry-run", help="Print the resolved recipe and the planned inputs and outputs; run nothing."),
]


def resolve(recipe_path: Path | None, sets: list[str] | None, **shortcuts: object) -> Recipe:
    """Load the recipe and apply `--set` overrides, then the command's own shortcut options.

    Shortcut options (e.g. `--encoder`) are applied as `--set` overrides after the user's, so
    `extract --encoder dinov2-b` equals `extract --set encoder.name=dinov2-b`.
    """
    overrides = list(sets or [])
    for key, value in shortcuts.items():
        if value is not None:
            overrides.append(f"{key}={_as_toml(value)}")
    return load_recipe(recipe_path, overrides)


def _as_toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def print_dry_run(recipe: Recipe, plans: list[Plan]) -> None:
    """Print the resolved recipe and each stage's inputs and outputs."""
    console.print(f"[bold]resolved recipe[/bold] (hash {recipe_hash(recipe)})")
    console.print(Syntax(to_toml(recipe), "toml", theme="ansi_dark", background_color="default"))
    table = Table(title="plan (dry run: nothing was run)", show_lines=False)
    table.add_column("stage")
    table.add_column("role")
    table.add_column("path", overflow="fold")
    for plan in plans:
        for role, path in plan.inputs.items():
            table.add_row(plan.stage, f"in: {role}", path)
        for role, path in plan.outputs.items():
            table.add_row(plan.stage, f"out: {role}", path)
    console.print(table)
    for plan in plans:
        for note in plan.notes:
            console.print(f"{plan.stage}: {note}", highlight=False, soft_wrap=True)
