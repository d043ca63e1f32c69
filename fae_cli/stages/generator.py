"""Stage `generator`."""

from __future__ import annotations

from pathlib import Path

from fae_cli.errors import FaeError
from fae_cli.recipe import Recipe
from fae_cli.stages.plan import Plan, RunPaths

def plan(recipe: Recipe, latents: Path | None = None, out: Path | None = None) -> Plan:
    paths = RunPaths.of(recipe)
    return Plan(
        f"train-generator ({recipe.generator.family})",
        inputs={"latent cache": str(latents or paths.latents)},
        outputs={"generator": str(out or paths.generator)},
    )


def run(recipe: Recipe, **paths: Path | None) -> Path:
    raise FaeError("this stage is not implemented yet in this fae version")
