"""Stage `sample`: images from a trained generator, one PNG per sample, plus ADM-style outputs.

Steps: load the generator (EMA weights unless `sample.use_ema` is false), the adapter its
latents came from and a pixel decoder of the same encoder. Check the output folder's earlier
settings, list the samples whose PNG is missing, and give each rank (under torchrun) a
contiguous share of them. Each batch draws sample i's label and noise from (seed, i) alone,
samples latents, decodes them to images and writes `images/000123.png` atomically. Rank 0
then writes `samples.npz` (`arr_0` uint8 N x H x W x 3, `arr_1` labels, -1 when
unconditional), `grid.png` (the first samples) and `sampling.json` (every setting).

A rerun with the same settings generates only the missing PNGs. A rerun with other settings
that change the images (sampler, steps, guidance, seed, labels, weights) is rejected.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fae_cli.artifacts import MANIFEST, atomic_write_bytes, atomic_write_text, describe_changes, read_manifest
from fae_cli.errors import FaeError
from fae_cli.log import Progress, console
from fae_cli.recipe import Recipe
from fae_cli.stages.generation import (
    Generator,
    ImageDecoder,
    LatentSampler,
    find_decoders,
    generate_images,
    image_grid,
    load_generator,
    png_bytes,
    sample_labels,
)
from fae_cli.stages.plan import Plan, RunPaths
from fae_cli.training.distributed import DistEnv, barrier, distributed_session, shard_indices

log = logging.getLogger(__name__)

IMAGES = "images"
NPZ = "samples.npz"
GRID = "grid.png"
SETTINGS = "sampling.json"
GRID_MAX = 100  # samples shown in grid.png
# sampling.json keys that may differ between a run and its resume: they do not change any image.
OPERATIONAL_KEYS = ("num_samples", "batch_size", "world_size", "complete")


def plan(recipe: Recipe, generator: Path | None = None, out: Path | None = None) -> Plan:
    paths = RunPaths.of(recipe)
    decoder = paths.decoder_finetune if recipe.decoder.finetune else paths.decoder_noise
    inputs = {"generator": str(generator or paths.generator), "adapter": str(paths.adapter), "pixel decoder": str(decoder)}
    if recipe.sample.guide_checkpoint is not None:
        inputs["guide generator"] = str(recipe.sample.guide_checkpoint)
    return Plan(
        "sample",
        inputs=inputs,
        outputs={"samples": str(out or paths.samples)},
        notes=[_describe_plan(recipe)],
    )


def _describe_plan(recipe: Recipe) -> str:
    settings = recipe.sample
    if recipe.generator.family == "flow":
        guidance = f"guidance {settings.cfg_scale} ({settings.flow_guidance_form})" if settings.cfg_scale not in (None, 1.0) else "no guidance"
        denoise = "denoising step" if settings.flow_denoise else "no denoising"
        return f"{settings.num_samples} samples, flow inverse with KV cache, {guidance}, {denoise}"
    return f"{settings.num_samples} samples, {settings.sampler} x {settings.steps} steps, shift {settings.shift}"


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def run(
    recipe: Recipe,
    generator: Path | None = None,
    out: Path | None = None,
    adapter: Path | None = None,
    decoder: Path | None = None,
) -> Path:
    """Generate `sample.num_samples` images and return the output folder.

    `generator` defaults to `<run>/generator`, `out` to `<run>/samples`; `adapter` and
    `decoder` override the ones `find_decoders` picks.
    """
    paths = RunPaths.of(recipe)
    generator = Path(generator) if generator is not None else paths.generator
    out = Path(out) if out is not None else paths.samples
    with distributed_session(recipe.run.device) as env:
        return _sample(recipe, generator, out, adapter, decoder, env)


def _sample(
    recipe: Recipe,
    generator_path: Path,
    out: Path,
    adapter: Path | None,
    decoder: Path | None,
    env: DistEnv,
) -> Path:
    config = recipe.sample
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    generator = load_generator(generator_path, device=env.device, use_ema=config.use_ema)
    guide = (
        _load_guide(generator, config.guide_checkpoint, env)
        if config.guide_checkpoint is not None
        else None
    )
    sampler = LatentSampler(generator, config, guide)
    image_decoder, decoders_used = find_decoders(
        recipe, generator.facts, env.device, adapter=adapter, decoder=decoder
    )
    settings = sampling_settings(recipe, generator, sampler, decoders_used, env)

    # Every rank checks and lists before any rank writes, so all see the same missing set.
    check_settings(out, settings)
    missing = missing_indices(out, config.num_samples)
    barrier()
    if env.is_main:
        atomic_write_text(
            out / SETTINGS, json.dumps({**settings, "complete": False}, indent=2) + "\n"
        )
    mine = [missing[i] for i in shard_indices(len(missing), env.rank, env.world_size)]
    log.info(
        "sampling %d of %d images (%d already written) with %s %s step %d (%s weights), %s, %s: %s -> %s",
        len(missing),
        config.num_samples,
        config.num_samples - len(missing),
        generator.family,
        generator.facts["model"],
        generator.step,
        "EMA" if generator.ema else "raw",
        _describe_sampler(settings),
        f"{env.world_size} ranks" if env.distributed else "1 process",
        generator.checkpoint,
        out,
    )
    write_images(
        sampler,
        image_decoder,
        config.seed,
        mine,
        config.batch_size,
        config.labels,
        out / IMAGES,
        env,
    )
    barrier()

    if env.is_main:
        finish(out, settings, generator.num_classes)
    barrier()
    return out


def _load_guide(generator: Generator, path: Path, env: DistEnv) -> Generator:
    """Load the autoguidance model and check that it models the same latents."""
    guide = load_generator(path, device=env.device, use_ema=True)
    if guide.family != "diffusion" or generator.family != "diffusion":
        raise FaeError(
            f"autoguidance needs two diffusion generators; {path} is a {guide.family} generator and the main one a {generator.family} generator"
        )
    generator.stats.check_matches(
        guide.stats, expected_from=f"generator {generator.checkpoint}", actual_from=f"guide {path}"
    )
    if guide.latent_shape != generator.latent_shape or guide.num_classes != generator.num_classes:
        raise FaeError(
            f"guide {path} models latents {guide.latent_shape} with {guide.num_classes} classes, the generator {generator.latent_shape} "
            f"with {generator.num_classes}; use a guide trained on the same latent cache"
        )
    return guide


def sampling_settings(
    recipe: Recipe,
    generator: Generator,
    sampler: LatentSampler,
    decoders: dict[str, Any],
    env: DistEnv,
) -> dict[str, Any]:
    """Return the `sampling.json` record: every setting that determines the images, and the operational ones."""
    config = recipe.sample
    return {
        "family": generator.family,
        "model": generator.facts["model"],
        **sampler.describe(),
        "seed": config.seed,
        "labels": config.labels if generator.num_classes else "unconditional",
        "num_classes": generator.num_classes,
        "checkpoint": {
            "path": str(generator.checkpoint),
            "step": generator.step,
            "weights": "ema" if generator.ema else "raw",
            "hash": generator.weights_hash,
        },
        **decoders,
        "num_samples": config.num_samples,
        "batch_size": config.batch_size,
        "world_size": env.world_size,
    }


def _describe_sampler(settings: dict[str, Any]) -> str:
    if settings["family"] == "flow":
        guidance = settings["guidance"]
        return f"flow inverse, guidance {guidance['scale'] if guidance else 'off'}, denoise {'on' if settings['denoise'] else 'off'}"
    scales = sorted({interval["scale"] for interval in settings["guidance"]}) or [1.0]
    return f"{settings['sampler']} x {settings['steps']} steps ({settings['nfe']} NFE), shift {settings['shift']}, guidance scales {scales}"


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Raise a FaeError when `out` contains samples made with settings that change the images."""
    path = out / SETTINGS
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise FaeError(
            f"invalid {path}; delete it only if every PNG in {out / IMAGES} comes from the current settings"
        ) from None
    stable_before = {key: value for key, value in before.items() if key not in OPERATIONAL_KEYS}
    stable_now = {key: value for key, value in settings.items() if key not in OPERATIONAL_KEYS}
    # "path" entries are left out: a moved input is the same input.
    changes = describe_changes(stable_before, stable_now, limit=2, ignore=("path",))
    if changes:
        raise FaeError(
            f"{out} contains samples made with other settings ({changes}); choose another output folder (--out) or delete it"
        )
    check_count(out, before, settings["num_samples"])


def check_count(out: Path, before: dict[str, Any], count: int) -> None:
    """Raise a FaeError when sampling `count` images into `out` would shrink finished work.

    A finished folder of N samples may grow (the rerun adds indices N..), but writing fewer
    would replace its samples.npz and grid.png with a subset. A folder that `fae run` marked
    with a manifest keeps the count that manifest records, so its FID stays true.
    """
    finished = int(before.get("num_samples", 0)) if before.get("complete") else 0
    if count < finished:
        raise FaeError(
            f"{out} contains {finished} finished samples, and sampling {count} would replace its samples.npz and "
            f"grid.png with fewer; choose another output folder (--out), or sample {finished} or more"
        )
    if (out / MANIFEST).is_file():
        recorded = read_manifest(out).get("count")
        if recorded is not None and count != recorded:
            raise FaeError(
                f"{out} contains the {recorded} samples of a `fae run` (see its manifest.json); "
                f"write {count} samples to another folder with --out"
            )


def missing_indices(out: Path, count: int) -> list[int]:
    """Return the indices in [0, count) without a complete PNG (an empty file counts as missing)."""
    folder = out / IMAGES
    done = set()
    if folder.is_dir():
        for path in folder.glob("*.png"):
            if path.stem.isdigit() and path.stat().st_size > 0:
                done.add(int(path.stem))
    return [index for index in range(count) if index not in done]


def write_images(
    sampler: LatentSampler,
    decoder: ImageDecoder,
    seed: int,
    indices: list[int],
    batch_size: int,
    label_mode: str,
    folder: Path,
    env: DistEnv,
) -> None:
    """Generate and write the PNGs of `indices`, batch by batch."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not env.is_main) as progress:
        task = progress.add_task(
            "sample" + (f" (rank 0 of {env.world_size})" if env.distributed else ""),
            total=len(indices),
        )
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            images, _ = generate_images(sampler, decoder, seed, batch, batch_size, label_mode)
            for index, image in zip(batch, images):
                atomic_write_bytes(folder / image_name(index), png_bytes(image))
            progress.advance(task, len(batch))


def finish(out: Path, settings: dict[str, Any], num_classes: int) -> None:
    """Collect every PNG into `samples.npz`, tile `grid.png` and write the final `sampling.json`."""
    count = settings["num_samples"]
    folder = out / IMAGES
    images = np.stack([read_png(folder / image_name(index)) for index in range(count)])
    label_mode = settings["labels"] if num_classes else "balanced"
    labels = sample_labels(settings["seed"], range(count), num_classes, label_mode).numpy()

    # Written to a temporary file and renamed, so a reader never sees a partial archive.
    temporary = out / f".{NPZ}.tmp"
    with open(temporary, "wb") as handle:
        np.savez(handle, arr_0=images, arr_1=labels)
    temporary.replace(out / NPZ)

    shown = images[:GRID_MAX]
    columns = (
        num_classes
        if settings["labels"] == "balanced" and 0 < num_classes <= 16
        else math.ceil(math.sqrt(len(shown)))
    )
    atomic_write_bytes(out / GRID, png_bytes(image_grid(shown, columns)))

    extra = sorted(
        path.name
        for path in folder.glob("*.png")
        if not path.stem.isdigit() or int(path.stem) >= count
    )
    if extra:
        log.warning(
            "%s contains %d PNGs outside samples 0..%d (e.g. %s); samples.npz leaves them out",
            folder,
            len(extra),
            count - 1,
            extra[0],
        )
    atomic_write_text(out / SETTINGS, json.dumps({**settings, "complete": True}, indent=2) + "\n")
    log.info("wrote %d sample PNGs to %s, and %s, %s and %s to %s", count, folder, NPZ, GRID, SETTINGS, out)


def read_png(path: Path) -> np.ndarray:
    """Read a sample PNG as uint8 H x W x 3; raise a FaeError naming the file when it is unreadable."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise FaeError(
            f"sample {path} is unreadable ({error}); delete it and rerun the same command to regenerate it"
        ) from None
