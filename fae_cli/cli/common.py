"""Options every stage command shares, recipe loading and the `--dry-run` printout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.syntax import Syntax

from fae_cli.log import output
from fae_cli.recipe import Recipe, load_recipe, recipe_hash, to_toml
from fae_cli.stages.plan import MADE_WHEN_MISSING, Plan

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
    typer.Option("--dry-run", metavar="", help="Print the resolved recipe and the planned inputs and outputs; run nothing."),
]


def resolve(recipe_path: Path | None, sets: list[str] | None, shortcuts: dict[str, tuple[str, object]] | None = None) -> Recipe:
    """Load the recipe and apply `--set` overrides, then the command's own shortcut options.

    `shortcuts` maps a recipe key to (the option's name, its value or None when not given).
    They are applied after the user's `--set` overrides, so `extract --encoder dinov2-b` equals
    `extract --set encoder.name=dinov2-b`, and an invalid value is reported against the option.
    """
    overrides = list(sets or [])
    labels: dict[str, str] = {}
    for key, (option, value) in (shortcuts or {}).items():
        if value is not None:
            overrides.append(f"{key}={_as_toml(value)}")
            labels[key] = option
    return load_recipe(recipe_path, overrides, labels=labels)


def _as_toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_as_toml(item) for item in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def print_dry_run(recipe: Recipe, plans: list[Plan]) -> None:
    """Print the resolved recipe and each stage's inputs and outputs, flagging missing inputs.

    An input is "made by <stage>" when an earlier stage of the plan writes it, "found" when it
    exists, and "MISSING" when it is a path that neither exists nor is made by the plan. It is
    "download" when it comes from the network on first use (a hub encoder). Other names carry
    no flag.
    """
    from fae_cli.stages.pipeline import model_summary

    # Building every model on the meta device first turns an invalid model setting into an error.
    models = model_summary(recipe)
    output.print(f"[bold]resolved recipe[/bold] (hash {recipe_hash(recipe)})")
    output.print(Syntax(to_toml(recipe), "toml", theme="ansi_dark", background_color="default"))
    output.print("[bold]plan[/bold] (dry run: nothing was run)")
    produced: dict[str, str] = {}
    missing: list[str] = []
    downloads: list[str] = []
    for plan in plans:
        if not plan.inputs and not plan.outputs:
            continue
        output.print(plan.stage, highlight=False)
        for role, value in plan.inputs.items():
            status = input_status(value, produced)
            path = value.split(" (")[0]
            if status == "MISSING" and path not in missing:
                missing.append(path)
            if status == "download" and path not in downloads:
                downloads.append(path)
            flag = f"  \\[{status}]" if status else ""
            output.print(f"  in   {role + ':':<20} {escape(value)}{flag}", highlight=False, soft_wrap=True)
        for role, value in plan.outputs.items():
            produced.setdefault(value, plan.stage)
            output.print(f"  out  {role + ':':<20} {escape(value)}", highlight=False, soft_wrap=True)
    for note in models:
        output.print(f"models: {note}", highlight=False, soft_wrap=True)
    for plan in plans:
        for note in plan.notes:
            output.print(f"{plan.stage}: {note}", highlight=False, soft_wrap=True)
    for plan in plans:
        for warning in plan.warnings:
            output.print(f"[yellow]warning:[/yellow] {plan.stage}: {escape(warning)}", highlight=False, soft_wrap=True)
    if downloads:
        output.print(
            f"[yellow]note:[/yellow] {len(downloads)} input(s) download on first use, so the run needs network access "
            f"or a filled cache: {', '.join(downloads)}",
            highlight=False,
            soft_wrap=True,
        )
    if missing:
        output.print(
            f"[yellow]warning:[/yellow] {len(missing)} input path(s) missing, the run would stop at the first: {', '.join(missing)}",
            highlight=False,
            soft_wrap=True,
        )


def input_status(value: str, produced: dict[str, str]) -> str:
    """Return the dry-run flag of one plan input: made by a stage, found, MISSING, download, or "" for a name."""
    from fae_cli.data.datasets import EMBEDDED, EMBEDDED_FILE
    from fae_cli.stages.extract import DOWNLOADS

    if DOWNLOADS in value:
        return "download"
    path = value.split(" (")[0]
    for made, stage in produced.items():
        if path == made or path.startswith(made.rstrip("/") + "/"):
            return f"made by {stage}"
    if path == EMBEDDED:
        return "found" if EMBEDDED_FILE.is_file() else "MISSING"
    if Path(path).exists():
        return "found"
    if MADE_WHEN_MISSING in value:
        return "made by this stage"
    looks_like_path = "/" in path or "\\" in path or Path(path).suffix != ""
    return "MISSING" if looks_like_path else ""
