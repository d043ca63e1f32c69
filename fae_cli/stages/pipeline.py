"""Stage `run`: every stage of a recipe in order, skipping the ones that are up to date.

A stage is up to date when its output folder has a manifest whose recipe hash equals the hash
of the recipe values that stage depends on (`stage_hash`). A folder without a manifest is an
unfinished stage: running it again resumes it. A folder whose manifest has another hash was
produced by other settings: the run stops and names it instead of overwriting finished work.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from fae_cli.artifacts import MANIFEST, RECIPE_FILE, atomic_write_bytes, describe_changes, read_manifest, write_manifest
from fae_cli.errors import FaeError
from fae_cli.log import console
from fae_cli.recipe import Recipe, to_toml
from fae_cli.stages import adapter, decoders, extract, generator, sample
from fae_cli.stages.plan import STAGE_SECTIONS, Plan, RunPaths, stage_hash
from fae_cli.training.distributed import DistEnv, barrier, cleanup, init_distributed

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference.npz"


@dataclass
class Step:
    """One stage of the pipeline: its name, hash key, output folder and how to run it."""

    name: str
    key: str
    folder: Path
    action: Callable[[], Any]
    writes_manifest: bool = True


def plan(recipe: Recipe) -> list[Plan]:
    """Return the plans of every stage `run` would execute, in order, with each stage's state.

    A stage whose output is up to date is noted as skipped, an unfinished one as resumed, and
    one made from other settings gets a warning: the real run would stop there.
    """
    paths = RunPaths.of(recipe)
    plans = [extract.plan(recipe), adapter.plan(recipe), decoders.plan(recipe, phase="noise")]
    if recipe.decoder.finetune:
        plans.append(decoders.plan(recipe, phase="finetune"))
    plans += [
        extract.plan(recipe, latents_from=paths.adapter),
        generator.plan(recipe),
        sample.plan(recipe),
        Plan("evaluate", inputs=evaluate_inputs(recipe, paths.samples / "samples.npz"), outputs={"metrics": str(paths.evaluation / "metrics.json")}),
    ]
    for stage_plan, step in zip(plans, _steps(recipe, env=None), strict=True):
        try:
            if is_up_to_date(recipe, step):
                stage_plan.notes.append(f"up to date in {step.folder}: skipped")
            elif step.folder.exists():
                stage_plan.notes.append(f"unfinished in {step.folder}: resumed")
        except FaeError as error:
            stage_plan.warnings.append(f"the run would stop here: {error}")
            break  # the stages after it would not be reached
    return plans


def evaluate_inputs(recipe: Recipe, samples: Path, reference: str | None = None) -> dict[str, str]:
    """Return the inputs of `evaluate fid`: samples, the reference, and Inception weights when named."""
    reference = reference or recipe.evaluate.reference
    if reference is None:
        reference = f"{recipe.data.source} (up to {recipe.evaluate.num_reference} held-out images)"
    inputs = {"samples": str(samples), "reference": reference}
    if recipe.evaluate.inception_weights is not None:
        inputs["Inception weights"] = str(recipe.evaluate.inception_weights)
    elif "isc" in recipe.evaluate.metrics:
        inputs["Inception weights"] = f"torch-fidelity's Inception with logits (isc needs them; {extract.DOWNLOADS})"
    return inputs


def model_summary(recipe: Recipe) -> list[str]:
    """Describe the models the recipe builds, with parameter counts from meta-device copies.

    The feature width and grid come from the encoder registry, so nothing is downloaded. Raises
    a FaeError when a model cannot be built from the recipe (an unknown generator, an image size
    the decoder cannot tile), which `run` checks before its first stage.
    """
    import torch

    from fae_cli.encoders import encoder_spec
    from fae_cli.models.fae import build_fae
    from fae_cli.models.pixel_decoder import build_pixel_decoder
    from fae_cli.stages.generation import build_generator

    spec = encoder_spec(recipe.encoder.name)
    input_size = recipe.encoder.input_size or spec.input_size
    grid = spec.grid_at(input_size)
    notes = [f"encoder {recipe.encoder.name}: {grid[0]}x{grid[1]} tokens of width {spec.width} at {input_size} px"]
    with torch.device("meta"):
        fae = build_fae(recipe.adapter, spec.width, grid)
        notes.append(
            f"adapter ({recipe.adapter.kind}): encoder {_millions(fae.encoder)}, feature decoder {_millions(fae.decoder)}, "
            f"latent {recipe.adapter.latent_channels}x{grid[0]}x{grid[1]}"
        )
        pixel = build_pixel_decoder(recipe.decoder, spec.width, grid, recipe.data.image_size)
        notes.append(f"pixel decoder {recipe.decoder.size}: {_millions(pixel)}, {recipe.data.image_size} px output")
        model, _ = build_generator(recipe.generator, recipe.adapter.latent_channels, grid)
        notes.append(f"generator {recipe.generator.model} ({recipe.generator.family}): {_millions(model)}")
    return notes


def _millions(module: Any) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M parameters"


# ----------------------------------------------------------------------------------------------
# Running


def run(recipe: Recipe) -> dict[str, Any]:
    """Run every stage of the recipe, print a results table and return the results."""
    env = init_distributed(recipe.run.device)
    try:
        return _run(recipe, env)
    finally:
        cleanup()


def _steps(recipe: Recipe, env: DistEnv | None) -> list[Step]:
    """Return the stages of `run` in order; `env` is only read when an action runs."""
    paths = RunPaths.of(recipe)
    steps = [
        Step("extract", "features", paths.features, lambda: extract.run(recipe)),
        Step("train-adapter", "adapter", paths.adapter, lambda: adapter.run(recipe)),
        Step("train-decoders (noise)", "decoder-noise", paths.decoder_noise, lambda: decoders.run(recipe, phase="noise")),
    ]
    if recipe.decoder.finetune:
        steps.append(
            Step("train-decoders (finetune)", "decoder-finetune", paths.decoder_finetune, lambda: decoders.run(recipe, phase="finetune"))
        )
    steps += [
        Step("extract --latents", "latents", paths.latents, lambda: extract.run_latents(recipe, adapter=paths.adapter)),
        Step("train-generator", "generator", paths.generator, lambda: generator.run(recipe)),
        Step("sample", "samples", paths.samples, lambda: _sample_and_mark(recipe, env), writes_manifest=False),
        Step("evaluate", "evaluation", paths.evaluation, lambda: _evaluate(recipe, env), writes_manifest=False),
    ]
    return steps


def _run(recipe: Recipe, env: DistEnv) -> dict[str, Any]:
    model_summary(recipe)  # an invalid model setting stops here, not after hours of earlier stages
    steps = _steps(recipe, env)
    timings: list[tuple[str, str, float]] = []
    for step in steps:
        started = time.perf_counter()
        if is_up_to_date(recipe, step):
            log.info("%s: up to date in %s, skipped", step.name, step.folder)
            timings.append((step.name, "skipped", time.perf_counter() - started))
            continue
        log.info("%s: running -> %s", step.name, step.folder)
        step.action()
        barrier()
        timings.append((step.name, "ran", time.perf_counter() - started))

    results = collect_results(recipe)
    if env.is_main:
        print_summary(timings, results)
    return results


def is_up_to_date(recipe: Recipe, step: Step) -> bool:
    """Tell whether a stage's output exists and was made from the same settings.

    Raises a FaeError when the output was made from other settings, so finished work is never
    overwritten silently.
    """
    manifest_path = step.folder / MANIFEST
    if not manifest_path.is_file():
        return False
    manifest = read_manifest(step.folder)
    expected = stage_hash(recipe, step.key)
    if manifest.get("recipe_hash") == expected:
        return True
    raise FaeError(
        f"{step.folder} was produced by other settings ({_changed_settings(recipe, step.key, step.folder, manifest)}); "
        "set another run.name, or delete that folder and the stages after it to redo them"
    )


def _changed_settings(recipe: Recipe, key: str, folder: Path, manifest: dict[str, Any]) -> str:
    """Name the recipe values `key` depends on that differ from the recipe.toml stored in `folder`."""
    import tomllib

    from fae_cli.recipe import recipe_dict

    hashes = f"recipe hash {manifest.get('recipe_hash')} there, {stage_hash(recipe, key)} now"
    now = recipe_dict(recipe)
    try:
        before = recipe_dict(Recipe.model_validate(tomllib.loads((folder / RECIPE_FILE).read_text(encoding="utf-8"))))
    except (OSError, tomllib.TOMLDecodeError, ValueError):
        return hashes

    def selected(data: dict[str, Any]) -> dict[str, Any]:
        return {**{name: data[name] for name in STAGE_SECTIONS[key]}, "run.seed": data["run"]["seed"]}

    described = describe_changes(selected(before), selected(now))
    return described or hashes


def _sample_and_mark(recipe: Recipe, env: DistEnv) -> None:
    folder = sample.run(recipe)
    if env.is_main:
        write_manifest(
            folder,
            "samples",
            recipe_hash=stage_hash(recipe, "samples"),
            parents={"generator": RunPaths.of(recipe).generator},
            recipe_toml=to_toml(recipe),
            count=recipe.sample.num_samples,
        )


def _evaluate(recipe: Recipe, env: DistEnv) -> None:
    """Score the samples with FID (and the recipe's other metrics) against the reference."""
    from fae_cli.evaluation.fid import run_fid

    paths = RunPaths.of(recipe)
    if not env.is_main:
        return
    reference = Path(recipe.evaluate.reference) if recipe.evaluate.reference is not None else write_reference(recipe)
    report = run_fid(
        paths.samples / "samples.npz",
        reference,
        metrics=recipe.evaluate.metrics,
        batch_size=recipe.evaluate.batch_size,
        out=paths.evaluation,
        device=recipe.run.device,
    )
    write_manifest(
        paths.evaluation,
        "evaluation",
        recipe_hash=stage_hash(recipe, "evaluation"),
        parents={"samples": paths.samples},
        recipe_toml=to_toml(recipe),
        metrics=report["metrics"],
    )


def write_reference(recipe: Recipe) -> Path:
    """Write up to `evaluate.num_reference` held-out images as an ADM-style `reference.npz`."""
    from fae_cli.data.datasets import open_images

    path = RunPaths.of(recipe).evaluation / REFERENCE_FILE
    if path.is_file():
        return path
    dataset = open_images(recipe.data, "holdout")
    if len(dataset) == 0:
        raise FaeError(
            f"no held-out images in {recipe.data.source} for the FID reference; set data.holdout > 0 or evaluate.reference"
        )
    count = min(len(dataset), recipe.evaluate.num_reference)
    images = []
    labels = []
    for index in range(count):
        image, label = dataset[index][:2]
        images.append(image.permute(1, 2, 0).numpy())
        labels.append(label)
    import io

    buffer = io.BytesIO()
    np.savez(buffer, arr_0=np.stack(images).astype(np.uint8), arr_1=np.asarray(labels, dtype=np.int64))
    atomic_write_bytes(path, buffer.getvalue())
    log.info("wrote %d held-out images to %s", count, path)
    return path


# ----------------------------------------------------------------------------------------------
# Results


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def collect_results(recipe: Recipe) -> dict[str, Any]:
    """Gather the headline numbers each stage wrote, and the paths a user looks at first."""
    paths = RunPaths.of(recipe)
    results: dict[str, Any] = {}
    adapter_metrics = _read_json(paths.adapter / "metrics.json")
    if adapter_metrics:
        results["adapter"] = adapter_metrics
    evaluation = _read_json(paths.evaluation / "metrics.json")
    if evaluation:
        results["metrics"] = evaluation.get("metrics", {})
    results["grid"] = str(paths.samples / "grid.png")
    results["metrics_file"] = str(paths.evaluation / "metrics.json")
    return results


def _flatten_numbers(data: Any, prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            flat.update(_flatten_numbers(value, f"{prefix}{key}."))
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        flat[prefix.rstrip(".")] = float(data)
    return flat


def print_summary(timings: list[tuple[str, str, float]], results: dict[str, Any]) -> None:
    stages = Table(title="stages")
    stages.add_column("stage")
    stages.add_column("status")
    stages.add_column("seconds", justify="right")
    for name, status, seconds in timings:
        stages.add_row(name, status, f"{seconds:.1f}")
    console.print(stages)

    table = Table(title="results")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in _flatten_numbers(results.get("metrics", {})).items():
        table.add_row(key, f"{value:.4g}")
    for key, value in _flatten_numbers(results.get("adapter", {}), "adapter.").items():
        table.add_row(key, f"{value:.4g}")
    console.print(table)
    console.print(f"sample grid:  {results['grid']}", highlight=False)
    console.print(f"metrics.json: {results['metrics_file']}", highlight=False)
