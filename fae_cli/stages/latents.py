"""Stage `extract --latents`: FAE latents of the training images, with per-channel statistics.

Source: the run's feature cache when it exists and comes from the adapter's encoder (same
encoder, weights hash, image size, input size, width and grid), so the encoder does not run
again. Otherwise the training images pass through the frozen encoder batch by batch and the
features are never stored.

Each row is the adapter's posterior mean (`extract.latent_mode = 'mean'`) or one posterior
sample, stored as float32 C x H x W (latent channels x token grid). Sample i draws its noise
from (run.seed, dataset index) alone, so any sharding gives the same cache. Flipped copies are
stored when the feature cache has them (or, from images, when `extract.flip` is set).

The manifest records the per-channel mean and std over every stored row, flipped copies
included, with the encoder and the adapter (path, recipe hash, step) that produced them:
`fae_cli.diffusion.transport.LatentStats.from_manifest` reads them.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils.data import DataLoader

from fae_cli.artifacts import MANIFEST, read_manifest
from fae_cli.data.cache import (
    Cache,
    CacheWriter,
    ShardInfo,
    assign_shards,
    open_cache,
    shard_length,
)
from fae_cli.data.datasets import ImageDataset, open_images
from fae_cli.encoders import FrozenEncoder, build_encoder
from fae_cli.errors import FaeError
from fae_cli.models.fae import FAE
from fae_cli.recipe import Recipe, to_toml
from fae_cli.stages.adapter import load_adapter
from fae_cli.stages.extract import _Readable, collate_readable, encode_batch
from fae_cli.stages.plan import RunPaths, stage_hash
from fae_cli.training.checkpoint import CHECKPOINTS, read_checkpoint_header, resolve_checkpoint
from fae_cli.training.distributed import (
    DistEnv,
    barrier,
    distributed_session,
    sample_generator,
    sample_seed,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

# Feature facts an adapter was trained on; a feature cache or encoder must match all of them.
ENCODER_FACTS = ("encoder", "weights_hash", "image_size", "input_size")
# Random stream of posterior samples, derived from the run seed.
_SAMPLE_STREAM = 3


def run_latents(
    recipe: Recipe, adapter: Path, out: Path | None = None, features: Path | None = None
) -> Path:
    """Write the latent cache of the training split through `adapter` and return its folder.

    `features` defaults to the run's feature cache and `out` to `<run>/latents`. Under torchrun
    every rank encodes its own shards; a rerun keeps finished shards.
    """
    paths = RunPaths.of(recipe)
    folder = Path(out) if out is not None else paths.latents
    features = Path(features) if features is not None else paths.features
    with distributed_session(recipe.run.device) as env:
        return _write(recipe, Path(adapter), features, folder, env)


# ----------------------------------------------------------------------------------------------
# Adapter identity


def adapter_identity(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Return the adapter's artefact folder, recipe hash and step, which latent caches record.

    A finished adapter has its recipe hash in `manifest.json`. For a checkpoint of an unfinished
    run, the hash is computed from the recipe stored in the checkpoint header.
    """
    folder = resolve_checkpoint(path)
    artefact = folder.parent.parent if folder.parent.name == CHECKPOINTS else folder
    recipe_hash = manifest.get("recipe_hash")
    if recipe_hash is None:
        header = read_checkpoint_header(folder)
        stored = Recipe.model_validate(tomllib.loads(header["fae.recipe"]))
        recipe_hash = stage_hash(stored, "adapter")
    return {
        "path": str(artefact.resolve()),
        "recipe_hash": str(recipe_hash),
        "step": int(manifest["step"]),
    }


def _matching_features(
    features: Path, adapter_manifest: dict[str, Any]
) -> tuple[Cache | None, str]:
    """Open the feature cache when it is complete and made by the adapter's encoder; otherwise return why it is not used."""
    if not (features / MANIFEST).is_file():
        return None, f"no complete feature cache at {features}"
    cache = open_cache(features, kind="features")
    expected = {key: adapter_manifest[key] for key in ENCODER_FACTS}
    expected.update(width=adapter_manifest["width"], grid=list(adapter_manifest["grid"]))
    found = {key: cache.manifest.get(key) for key in ENCODER_FACTS}
    found.update(width=cache.width, grid=list(cache.grid))
    differing = [key for key in expected if expected[key] != found[key]]
    if differing:
        key = differing[0]
        return (
            None,
            f"feature cache {features} has {key} {found[key]!r}, the adapter was trained on {expected[key]!r}",
        )
    return cache, ""


# ----------------------------------------------------------------------------------------------
# The stage


def _write(recipe: Recipe, adapter_path: Path, features: Path, folder: Path, env: DistEnv) -> Path:
    model, adapter_manifest = load_adapter(adapter_path, device=env.device, use_ema=True)
    identity = adapter_identity(adapter_path, adapter_manifest)
    mode = recipe.extract.latent_mode
    cache, reason = _matching_features(features, adapter_manifest)

    if cache is not None:
        source = FeatureSource(cache, features)
    else:
        log.info(
            "latents: %s; encoding the training images with %s", reason, adapter_manifest["encoder"]
        )
        source = ImageSource(recipe, adapter_manifest, env.device)

    facts = {
        "encoder": adapter_manifest["encoder"],
        "weights_hash": adapter_manifest["weights_hash"],
        "image_size": adapter_manifest["image_size"],
        "input_size": adapter_manifest["input_size"],
        "feature_width": adapter_manifest["width"],
        "grid": list(model.grid),
        "latent_channels": model.latent_channels,
        "dtype": "float32",
        "flip": source.flip,
        "num_classes": source.num_classes,
        "mode": mode,
        "adapter": identity,
        "source": source.describe(),
    }
    # The writer's identity leaves out the path, so that a moved adapter folder keeps the shards.
    writer_identity = {**facts, "adapter": {key: identity[key] for key in ("recipe_hash", "step")}}
    if mode == "sample":
        writer_identity["seed"] = recipe.run.seed
    writer = CacheWriter(folder, kind="latents", count=source.count, identity=writer_identity)
    if env.is_main:
        writer.prepare()
    barrier()
    done = writer.scan()
    missing = writer.missing(done)
    barrier()

    if (
        not missing
        and (folder / MANIFEST).is_file()
        and read_manifest(folder).get("fingerprint") == writer.fingerprint
    ):
        log.info(
            "latent cache %s is complete and matches the adapter and recipe: nothing to encode",
            folder,
        )
        return folder

    item_bytes = (
        4 * model.latent_channels * model.grid[0] * model.grid[1] * (2 if source.flip else 1)
    )
    shards = assign_shards(
        missing, shard_length(recipe.extract.shard_size, item_bytes), env.rank, env.world_size
    )
    log.info(
        "latents: %d rows from %s through adapter %s (%s, step %d) -> %s, %d x %d x %d %s%s",
        source.count,
        source.name,
        identity["path"],
        identity["recipe_hash"],
        identity["step"],
        folder,
        model.latent_channels,
        *model.grid,
        "posterior means" if mode == "mean" else "posterior samples",
        " with flipped copies" if source.flip else "",
    )
    encoder = LatentEncoder(model, mode, sample_seed(recipe.run.seed, _SAMPLE_STREAM))
    for shard in shards:
        tensors, skipped = source.encode(shard, encoder, recipe.extract.batch_size)
        writer.write(shard, tensors, skipped)
    barrier()

    if env.is_main:
        finished = writer.scan()
        mean, std, rows = latent_statistics(folder, finished, source.flip)
        writer.finish(
            recipe_hash=stage_hash(recipe, "latents"),
            recipe_toml=to_toml(recipe),
            **facts,
            mean=mean,
            std=std,
            stats_rows=rows,
        )
        log.info(
            "wrote %d latent rows to %s; per-channel mean in [%.3g, %.3g], std in [%.3g, %.3g]",
            sum(shard.rows for shard in finished),
            folder,
            min(mean),
            max(mean),
            min(std),
            max(std),
        )
    barrier()
    return folder


class LatentEncoder:
    """Features N x L x D -> latents N x C x H x W: posterior means, or one sample per row."""

    def __init__(self, model: FAE, mode: str, seed: int) -> None:
        self.model = model
        self.mode = mode
        self.seed = seed
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, features: torch.Tensor, index: torch.Tensor, flipped: bool) -> torch.Tensor:
        mean, logvar = self.model.encode(features.to(self.device, torch.float32))
        latents = mean
        if self.mode == "sample":
            # One generator per dataset index (and flip), so the draw does not depend on sharding.
            noise = torch.stack(
                [
                    torch.randn(
                        mean.shape[1:],
                        generator=sample_generator(self.seed, 2 * int(i) + int(flipped)),
                    )
                    for i in index
                ]
            )
            latents = mean + torch.exp(0.5 * logvar) * noise.to(mean.device)
        rows, cols = self.model.grid
        return latents.float().transpose(1, 2).reshape(len(latents), -1, rows, cols).cpu()


class FeatureSource:
    """Rows of a feature cache; latent row r is feature row r."""

    def __init__(self, cache: Cache, folder: Path) -> None:
        self.cache = cache
        self.folder = folder
        self.count = len(cache)
        self.flip = cache.has_flip
        self.num_classes = cache.num_classes
        self.name = f"feature cache {folder}"

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "features",
            "path": str(self.folder.resolve()),
            "fingerprint": self.cache.manifest.get("fingerprint"),
        }

    def encode(
        self, shard: range, encoder: LatentEncoder, batch_size: int
    ) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
        rows = torch.arange(shard.start, shard.stop)
        index = self.cache.index[rows]
        parts: dict[str, list[torch.Tensor]] = {"latents": [], "latents_flip": []}
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            parts["latents"].append(
                encoder(self.cache.get(batch), index[start : start + batch_size], flipped=False)
            )
            if self.flip:
                parts["latents_flip"].append(
                    encoder(
                        self.cache.get(batch, flip=True),
                        index[start : start + batch_size],
                        flipped=True,
                    )
                )
        tensors = {name: torch.cat(values) for name, values in parts.items() if values}
        tensors.update(labels=self.cache.labels[rows], index=index)
        return tensors, []


class ImageSource:
    """Training images through the adapter's frozen encoder; unreadable images are skipped."""

    def __init__(
        self, recipe: Recipe, adapter_manifest: dict[str, Any], device: torch.device
    ) -> None:
        self.dataset: ImageDataset = open_images(recipe.data, "train")
        if self.dataset.image_size != adapter_manifest["image_size"]:
            raise FaeError(
                f"data.image_size = {self.dataset.image_size} but the adapter was trained on {adapter_manifest['image_size']} px images; "
                f"set data.image_size={adapter_manifest['image_size']}"
            )
        self.encoder: FrozenEncoder = build_encoder(
            adapter_manifest["encoder"],
            weights=recipe.encoder.weights,
            input_size=adapter_manifest["input_size"],
            device=device,
        )
        if self.encoder.weights_hash != adapter_manifest["weights_hash"]:
            raise FaeError(
                f"encoder {self.encoder.name} ({self.encoder.weights_source}) has weights hash {self.encoder.weights_hash}, "
                f"the adapter was trained on features of weights {adapter_manifest['weights_hash']}; set encoder.weights to those weights"
            )
        self.device = device
        self.precision = recipe.extract.precision
        self.workers = recipe.extract.workers
        self.count = len(self.dataset)
        self.flip = recipe.extract.flip
        self.num_classes = self.dataset.num_classes
        self.name = f"{self.count} images of {self.dataset.source}"

    def describe(self) -> dict[str, Any]:
        return {"kind": "images", "data": self.dataset.describe()}

    def encode(
        self, shard: range, encoder: LatentEncoder, batch_size: int
    ) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
        batches = [
            list(range(start, min(start + batch_size, shard.stop)))
            for start in range(shard.start, shard.stop, batch_size)
        ]
        loader = DataLoader(
            _Readable(self.dataset),
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=collate_readable,
        )
        parts: dict[str, list[torch.Tensor]] = {
            "latents": [],
            "latents_flip": [],
            "labels": [],
            "index": [],
        }
        skipped: list[tuple[str, str]] = []
        for batch in loader:
            skipped.extend(batch.skipped)
            if not len(batch.index):
                continue
            features, flipped = encode_batch(
                self.encoder, batch.images, self.device, self.flip, self.precision
            )
            parts["latents"].append(encoder(features, batch.index, flipped=False))
            if flipped is not None:
                parts["latents_flip"].append(encoder(flipped, batch.index, flipped=True))
            parts["labels"].append(batch.labels)
            parts["index"].append(batch.index)
        tensors = {name: torch.cat(values) for name, values in parts.items() if values}
        if "latents" not in tensors:
            return self._empty(encoder), skipped
        return tensors, skipped

    def _empty(self, encoder: LatentEncoder) -> dict[str, torch.Tensor]:
        # A shard whose images were all unreadable still records its range.
        rows, cols = encoder.model.grid
        empty = torch.empty(0, encoder.model.latent_channels, rows, cols)
        tensors = {
            "latents": empty,
            "labels": torch.empty(0, dtype=torch.long),
            "index": torch.empty(0, dtype=torch.long),
        }
        if self.flip:
            tensors["latents_flip"] = empty.clone()
        return tensors


def latent_statistics(
    folder: Path, shards: list[ShardInfo], flip: bool
) -> tuple[list[float], list[float], int]:
    """Return the per-channel mean and std (population) over every row, flips included, and the row count.

    Sums run in float64 over N x H x W values per channel, so the figures do not depend on the
    shard layout beyond float64 rounding.
    """
    total = torch.zeros((), dtype=torch.float64)
    sums = None
    squares = None
    rows = 0
    for shard in shards:
        with safe_open(str(folder / shard.file), framework="pt") as handle:
            names = ["latents", "latents_flip"] if flip else ["latents"]
            for name in names:
                latents = handle.get_tensor(name).double()
                if not len(latents):
                    continue
                values = latents.transpose(0, 1).reshape(latents.shape[1], -1)
                sums = values.sum(dim=1) if sums is None else sums + values.sum(dim=1)
                squares = (
                    values.square().sum(dim=1)
                    if squares is None
                    else squares + values.square().sum(dim=1)
                )
                total += values.shape[1]
                rows += len(latents)
    if sums is None or squares is None:
        raise FaeError(f"latent cache {folder} contains no rows: every image was unreadable")
    mean = sums / total
    variance = (squares / total - mean.square()).clamp(min=0)
    std = variance.sqrt()
    bad = [
        channel
        for channel, value in enumerate(std.tolist())
        if not (math.isfinite(value) and value > 0)
    ]
    if bad:
        raise FaeError(
            f"latent channel {bad[0]} has std {std[bad[0]].item()} over {folder}: the adapter produces constant latents; retrain or check it"
        )
    return mean.tolist(), std.tolist(), rows
