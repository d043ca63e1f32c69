"""Stage `sample`."""

from __future__ import annotations

from pathlib import Path

from fae_cli.errors import FaeError
from fae_cli.recipe import Recipe
from fae_cli.stages.plan import Plan, RunPaths

def plan(recipe: Recipe, generator: Path | None = None, out: Path | None = None) -> Plan:
    paths = RunPaths.of(recipe)
    decoder = paths.decoder_finetune if recipe.decoder.finetune else paths.decoder_noise
    return Plan(
        "sample",
        inputs={"generator": str(generator or paths.generator), "adapter": str(paths.adapter), "pixel decoder": str(decoder)},
        outputs={"samples": str(out or paths.samples)},
        notes=[f"{recipe.sample.num_samples} samples, {recipe.sample.sampler} x {recipe.sample.steps} steps"],
    )


def run(recipe: Recipe, **paths: Path | None) -> Path:
    raise FaeError("this stage is not implemented yet in this fae version")
