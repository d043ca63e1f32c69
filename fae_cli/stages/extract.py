"""Stage `extract`."""

from __future__ import annotations

from pathlib import Path

from fae_cli.errors import FaeError
from fae_cli.recipe import Recipe
from fae_cli.stages.plan import Plan, RunPaths

def plan(recipe: Recipe, out: Path | None = None, latents_from: Path | None = None) -> Plan:
    paths = RunPaths.of(recipe)
    if latents_from is not None:
        return Plan(
            "extract --latents",
            inputs={"images": recipe.data.source, "encoder": recipe.encoder.name, "adapter": str(latents_from)},
            outputs={"latent cache": str(out or paths.latents)},
        )
    return Plan(
        "extract",
        inputs={"images": recipe.data.source, "encoder": recipe.encoder.name},
        outputs={"feature cache": str(out or paths.features)},
    )


def run(recipe: Recipe, **paths: Path | None) -> Path:
    raise FaeError("this stage is not implemented yet in this fae version")
