"""Stage `train-generator`: a diffusion transformer or a normalizing flow on a latent cache.

Steps: open the latent cache and read its per-channel statistics (`LatentStats`). Check them
against a run being resumed, and the cache's class count against `generator.num_classes`.
Build the model of `generator.family` and train it with the shared trainer (EMA included).
Flipped copies, when the cache has them, count as extra training samples. During training and
at the end, the EMA model samples a grid of fixed classes and seeds into `<out>/grids/`,
decoded through the adapter and pixel decoder when both are found. Finally write
`manifest.json` beside the checkpoints.

Families:
- 'diffusion' (SiT / LightningDiT): trains on normalised latents (z - mean) / std with the
  flow-matching loss of `fae_cli.diffusion.transport`; logs `mse` and `cos`.
- 'flow' (STARFlow): the flow holds the statistics as buffers and normalises raw latents
  itself; it trains on the exact NLL of the latents plus Gaussian noise of
  `generator.flow_noise_sigma` (stored in the model config); logs `bits_per_dim`.

The checkpoint header entry `fae.generator` holds the family, the spec that rebuilds the model,
the latent statistics and the latent cache's facts (encoder, adapter, grid), so `sample` needs
no recipe to rebuild and check the model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fae_cli.artifacts import atomic_write_bytes, write_manifest
from fae_cli.data.cache import Cache, open_cache
from fae_cli.diffusion.transport import LatentStats, Transport
from fae_cli.errors import FaeError
from fae_cli.recipe import Recipe, to_toml
from fae_cli.stages.generation import (
    KIND,
    MODEL_KEY,
    Generator,
    ImageDecoder,
    LatentSampler,
    build_generator,
    find_decoders,
    generate_images,
    image_grid,
    png_bytes,
)
from fae_cli.stages.plan import Plan, RunPaths, stage_hash
from fae_cli.training.checkpoint import latest_checkpoint, read_checkpoint_header
from fae_cli.training.distributed import DistEnv, barrier, distributed_session
from fae_cli.training.trainer import Trainer, TrainTask

log = logging.getLogger(__name__)

GRIDS = "grids"
GRID_ROWS = 2  # samples per class in a training grid
GRID_MAX_CLASSES = 10  # classes shown (the first ones) when the cache has more
GRID_UNCONDITIONAL = 16  # samples in the grid of an unconditional generator
# Latent-cache manifest facts that the generator records and sampling checks.
LATENT_FACTS = (
    "encoder",
    "weights_hash",
    "image_size",
    "input_size",
    "feature_width",
    "grid",
    "latent_channels",
    "mode",
    "adapter",
    "num_classes",
)


def plan(recipe: Recipe, latents: Path | None = None, out: Path | None = None) -> Plan:
    paths = RunPaths.of(recipe)
    return Plan(
        f"train-generator ({recipe.generator.family})",
        inputs={"latent cache": str(latents or paths.latents)},
        outputs={"generator": str(out or paths.generator)},
    )


# ----------------------------------------------------------------------------------------------
# The training task


class GeneratorTask(TrainTask):
    """Generator training on every latent-cache row; with flips, rows len.. are the mirrored copies."""

    kind = KIND

    def __init__(
        self,
        model: nn.Module,
        family: str,
        cache: Cache,
        stats: LatentStats,
        transport: Transport,
        grids: GridWriter | None,
        conditional: bool,
    ) -> None:
        self.model = model
        self.family = family
        self.cache = cache
        self.stats = stats
        self.transport = transport
        self.grids = grids
        self.rows = len(cache)
        self.conditional = conditional

    def __len__(self) -> int:
        return self.rows * (2 if self.cache.has_flip else 1)

    def fetch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flipped = indices >= self.rows
        rows = indices % self.rows
        latents = torch.empty((len(indices), *self.cache.item_shape), dtype=torch.float32)
        if (~flipped).any():
            latents[~flipped] = self.cache.get(rows[~flipped])
        if flipped.any():
            latents[flipped] = self.cache.get(rows[flipped], flip=True)
        # The flow normalises with its own copy of the statistics (buffers saved with its weights).
        if self.family == "diffusion":
            latents = self.stats.normalize(latents)
        return latents, self.cache.labels[rows]

    def loss(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        latents, labels = batch
        labels = labels if self.conditional else None
        if self.family == "diffusion":
            terms = self.transport.loss(model, latents, labels)
            return terms.loss.mean(), {"mse": terms.mse.mean(), "cos": terms.cos.mean()}
        outputs = model(latents, labels)
        return outputs["loss"], {
            "bits_per_dim": outputs["bits_per_dim"],
            "prior": outputs["prior"],
            "logdet": outputs["logdet"],
        }

    def evaluate(self, model: nn.Module, ema: nn.Module, step: int) -> dict[str, float]:
        if self.grids is not None:
            self.grids.write(ema, step)
        return {}


class GridWriter:
    """Samples of fixed classes and seeds from the EMA model, tiled into `<out>/grids/step-XXXXXXXX.png` (rank 0 only)."""

    def __init__(
        self,
        recipe: Recipe,
        facts: dict[str, Any],
        stats: LatentStats,
        decoder: ImageDecoder,
        folder: Path,
        env: DistEnv,
    ) -> None:
        self.recipe = recipe
        self.facts = facts
        self.stats = stats
        self.decoder = decoder
        self.folder = folder
        self.env = env
        num_classes = facts["spec"]["num_classes"]
        shown = min(num_classes, GRID_MAX_CLASSES)
        # Index i has label i mod num_classes (balanced labels), so the first `shown` indices of
        # each block of num_classes cover the first classes, one column per class.
        self.indices = (
            [row * num_classes + c for row in range(GRID_ROWS) for c in range(shown)]
            if num_classes
            else list(range(GRID_UNCONDITIONAL))
        )
        self.columns = shown if num_classes else 4
        # Autoguidance needs a second checkpoint; grids use classifier-free guidance only.
        self.config = recipe.sample.model_copy(update={"guide_checkpoint": None})

    def write(self, model: nn.Module, step: int) -> None:
        if not self.env.is_main:
            return
        generator = Generator(
            family=self.facts["family"], model=model, stats=self.stats, facts=self.facts
        )
        sampler = LatentSampler(generator, self.config)
        images, _ = generate_images(
            sampler, self.decoder, self.config.seed, self.indices, len(self.indices), "balanced"
        )
        path = self.folder / f"step-{step:08d}.png"
        atomic_write_bytes(path, png_bytes(image_grid(images, self.columns)))
        log.info("sample grid at step %d -> %s", step, path)


# ----------------------------------------------------------------------------------------------
# The stage


def run(recipe: Recipe, latents: Path | None = None, out: Path | None = None) -> Path:
    """Train the generator of `generator.family` on a latent cache and return its artefact folder.

    `latents` defaults to `<run>/latents` and `out` to `<run>/generator`. Rerunning the same
    command resumes from the folder's latest checkpoint.
    """
    paths = RunPaths.of(recipe)
    latents = Path(latents) if latents is not None else paths.latents
    out = Path(out) if out is not None else paths.generator
    with distributed_session(recipe.run.device) as env:
        return _train(recipe, latents, out, env)


def _train(recipe: Recipe, latents: Path, out: Path, env: DistEnv) -> Path:
    config = recipe.generator
    cache = open_cache(latents, kind="latents")
    stats = LatentStats.from_manifest(cache.manifest)
    check_resumed_stats(out, stats, latents)
    if config.num_classes not in (0, cache.num_classes):
        raise FaeError(
            f"generator.num_classes = {config.num_classes} but the latent cache {latents} has {cache.num_classes} classes; "
            f"set generator.num_classes={cache.num_classes} (or 0 for an unconditional generator)"
        )

    torch.manual_seed(recipe.run.seed)
    grid = tuple(cache.grid)
    model, spec = build_generator(config, stats.channels, grid)
    if config.family == "flow":
        model.set_latent_stats(list(stats.mean), list(stats.std))
    facts = generator_facts(config.family, config.model, spec, stats, cache, latents)
    parameters = sum(param.numel() for param in model.parameters() if param.requires_grad)
    log.info(
        "generator: %s %s, %.2fM parameters, on %d latent rows%s of %d x %d x %d, %s",
        config.family,
        config.model,
        parameters / 1e6,
        len(cache),
        " (+ flipped copies)" if cache.has_flip else "",
        stats.channels,
        *grid,
        f"{config.num_classes} classes" if config.num_classes else "unconditional",
    )

    grids = _grid_writer(recipe, facts, stats, out, env)
    task = GeneratorTask(
        model,
        config.family,
        cache,
        stats,
        Transport.from_config(config),
        grids,
        config.num_classes > 0,
    )
    identity = {
        "generator": config.model_dump(mode="json", exclude={"train"}),
        "latents": {
            "recipe_hash": cache.manifest["recipe_hash"],
            "count": len(cache),
            "flip": cache.has_flip,
            "stats": stats.to_dict(),
        },
    }
    trainer = Trainer(
        task,
        config.train,
        out,
        seed=recipe.run.seed,
        env=env,
        identity=identity,
        metadata={MODEL_KEY: facts},
        recipe_toml=to_toml(recipe),
        recipe_key="generator.train",
    )
    result = trainer.fit()

    if env.is_main:
        write_manifest(
            out,
            KIND,
            recipe_hash=stage_hash(recipe, "generator"),
            parents={"latents": latents},
            recipe_toml=to_toml(recipe),
            **facts,
            parameters=parameters,
            step=result.step,
            checkpoint=str(result.checkpoint.relative_to(out)),
            metrics=result.metrics,
        )
        log.info("generator written to %s (step %d)", out, result.step)
    barrier()
    return out


def generator_facts(
    family: str, name: str, spec: dict[str, Any], stats: LatentStats, cache: Cache, latents: Path
) -> dict[str, Any]:
    """Return the header entry that rebuilds the model and ties it to its latents."""
    missing = [key for key in LATENT_FACTS if key not in cache.manifest]
    if missing:
        raise FaeError(
            f"latent cache {latents} has no '{missing[0]}' in its manifest; extract it again with `fae extract --latents`"
        )
    latent_facts = {key: cache.manifest[key] for key in LATENT_FACTS}
    latent_facts.update(
        recipe_hash=cache.manifest["recipe_hash"],
        path=str(latents.resolve()),
        count=len(cache),
        flip=cache.has_flip,
    )
    return {
        "family": family,
        "model": name,
        "spec": spec,
        "latent_stats": stats.to_dict(),
        "latents": latent_facts,
    }


def check_resumed_stats(out: Path, stats: LatentStats, latents: Path) -> None:
    """Raise a FaeError when `out` contains a run trained on latents of other statistics or channels."""
    folder = latest_checkpoint(out)
    if folder is None:
        return
    header = read_checkpoint_header(folder)
    if MODEL_KEY not in header:
        return
    stored = LatentStats.from_dict(header[MODEL_KEY]["latent_stats"])
    run_from = f"generator run {out}"
    cache_from = f"latent cache {latents}"
    stored.check_matches(stats, expected_from=run_from, actual_from=cache_from)
    difference = max(
        max(abs(a - b) for a, b in zip(stored.mean, stats.mean)),
        max(abs(a - b) for a, b in zip(stored.std, stats.std)),
    )
    if difference > 0:
        raise FaeError(
            f"latent statistics mismatch: {run_from} was trained with other per-channel mean/std than {cache_from} has "
            f"(largest difference {difference:.3g}); resume with the latent cache it was trained on, or write to another folder (--out)"
        )


def _grid_writer(
    recipe: Recipe, facts: dict[str, Any], stats: LatentStats, out: Path, env: DistEnv
) -> GridWriter | None:
    """Return the grid writer when the adapter and a pixel decoder of these latents are found, else None (logged)."""
    if not env.is_main:
        return None
    found = find_decoders(recipe, facts, env.device, required=False)
    if found is None:
        return None
    return GridWriter(recipe, facts, stats, found[0], out / GRIDS, env)
