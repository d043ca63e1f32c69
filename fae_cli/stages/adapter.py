"""Stage `adapter`."""

from __future__ import annotations

from pathlib import Path

from fae_cli.errors import FaeError
from fae_cli.recipe import Recipe
from fae_cli.stages.plan import Plan, RunPaths

def plan(recipe: Recipe, features: Path | None = None, out: Path | None = None) -> Plan:
    paths = RunPaths.of(recipe)
    return Plan(
        "train-adapter",
        inputs={"feature cache": str(features or paths.features)},
        outputs={"adapter": str(out or paths.adapter)},
    )


def run(recipe: Recipe, **paths: Path | None) -> Path:
    raise FaeError("this stage is not implemented yet in this fae version")
