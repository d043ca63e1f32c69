"""Stage `decoders`."""

from __future__ import annotations

from pathlib import Path

from fae_cli.errors import FaeError
from fae_cli.recipe import Recipe
from fae_cli.stages.plan import Plan, RunPaths

def plan(recipe: Recipe, phase: str = "noise", features: Path | None = None, adapter: Path | None = None, out: Path | None = None) -> Plan:
    paths = RunPaths.of(recipe)
    inputs = {"feature cache": str(features or paths.features)}
    if phase == "finetune":
        inputs["adapter"] = str(adapter or paths.adapter)
        inputs["noise-phase decoder"] = str(paths.decoder_noise)
    target = paths.decoder_noise if phase == "noise" else paths.decoder_finetune
    return Plan(f"train-decoders ({phase})", inputs=inputs, outputs={"pixel decoder": str(out or target)})


def run(recipe: Recipe, **paths: Path | None) -> Path:
    raise FaeError("this stage is not implemented yet in this fae version")
