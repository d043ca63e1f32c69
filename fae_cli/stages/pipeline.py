"""Stage `run`: every stage of a recipe in order."""

from __future__ import annotations

from fae_cli.errors import FaeError
from fae_cli.recipe import Recipe
from fae_cli.stages import adapter, decoders, extract, generator, sample
from fae_cli.stages.plan import Plan, RunPaths


def plan(recipe: Recipe) -> list[Plan]:
    paths = RunPaths.of(recipe)
    plans = [
        extract.plan(recipe),
        adapter.plan(recipe),
        decoders.plan(recipe, phase="noise"),
    ]
    if recipe.decoder.finetune:
        plans.append(decoders.plan(recipe, phase="finetune"))
    plans += [
        extract.plan(recipe, latents_from=paths.adapter),
        generator.plan(recipe),
        sample.plan(recipe),
        Plan("evaluate fid", inputs={"samples": str(paths.samples)}, outputs={"metrics": str(paths.samples / "metrics.json")}),
    ]
    return plans


def run(recipe: Recipe) -> None:
    raise FaeError("`fae run` is not implemented yet in this fae version")
