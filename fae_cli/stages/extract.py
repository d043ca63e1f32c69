"""Stage `extract`: frozen encoder features of an image dataset, cached on disk.

Steps: open the dataset split, build the encoder and find the shards that an earlier run
already finished. Each rank then takes a contiguous share of the missing indices and encodes it
batch by batch (bf16 autocast and channels-last on CUDA). A shard is written atomically as soon
as it fills, and `manifest.json` follows once every index is covered.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from torch.utils.data import DataLoader, Dataset

from fae_cli.artifacts import MANIFEST, read_manifest
from fae_cli.data.cache import CacheWriter, assign_shards, shard_length
from fae_cli.data.datasets import ImageDataset, open_images
from fae_cli.encoders import FrozenEncoder, build_encoder
from fae_cli.errors import FaeError
from fae_cli.log import Progress, console
from fae_cli.recipe import ExtractConfig, Recipe, to_toml
from fae_cli.stages.plan import Plan, RunPaths, stage_hash
from fae_cli.training.distributed import DistEnv, barrier, distributed_session

log = logging.getLogger(__name__)

# Plan inputs whose text contains this are fetched from the network unless already cached.
DOWNLOADS = "downloads on first use"

STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def plan(recipe: Recipe, out: Path | None = None, latents_from: Path | None = None, split: str = "train") -> Plan:
    paths = RunPaths.of(recipe)
    inputs = {"images": f"{recipe.data.source} ({split} split)", **encoder_inputs(recipe)}
    if latents_from is not None:
        inputs["adapter"] = str(latents_from)
        return Plan("extract --latents", inputs=inputs, outputs={"latent cache": str(out or paths.latents)})
    default = paths.features if split == "train" else paths.holdout_features
    return Plan("extract", inputs=inputs, outputs={"feature cache": str(out or default)})


def encoder_inputs(recipe: Recipe) -> dict[str, str]:
    """Describe the encoder as a plan input: its local weights file when set, else where its weights come from."""
    from fae_cli.encoders import encoder_spec

    if recipe.encoder.weights is not None:
        return {"encoder weights": str(recipe.encoder.weights)}
    spec = encoder_spec(recipe.encoder.name)
    if spec.offline_package is None:
        return {"encoder": f"{recipe.encoder.name} ({DOWNLOADS}: {spec.source})"}
    return {"encoder": f"{recipe.encoder.name} ({spec.source})"}


def run(recipe: Recipe, out: Path | None = None, split: str = "train") -> Path:
    """Write the feature cache of `split` ('train' or 'holdout') and return its folder.

    Default folders: `<run>/features` for train, `<run>/features-holdout` for holdout. Under
    torchrun every rank encodes its own share; without it the call runs in one process.
    """
    paths = RunPaths.of(recipe)
    if out is not None:
        folder = Path(out)
    elif split == "train":
        folder = paths.features
    else:
        folder = paths.holdout_features
    with distributed_session(recipe.run.device) as env:
        return _extract(recipe, folder, split, env)


def run_latents(recipe: Recipe, adapter: Path, out: Path | None = None) -> Path:
    """Write the latent cache of the training split through `adapter` (see `fae_cli.stages.latents`)."""
    # Imported here because the latents stage reuses this module's image-encoding helpers.
    from fae_cli.stages.latents import run_latents as write_latents

    return write_latents(recipe, adapter, out=out)


def _extract(recipe: Recipe, folder: Path, split: str, env: DistEnv) -> Path:
    settings = recipe.extract
    dataset = open_images(recipe.data, split)
    encoder = build_encoder(recipe.encoder.name, weights=recipe.encoder.weights, input_size=recipe.encoder.input_size, device=env.device)
    if env.device.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)

    facts = feature_facts(encoder, dataset, settings)
    writer = CacheWriter(folder, kind="features", count=len(dataset), identity=facts)
    if env.is_main:
        writer.prepare()
    barrier()
    done = writer.scan()
    missing = writer.missing(done)
    # Every rank must see the same finished shards before any rank writes a new one.
    barrier()

    if not missing and _manifest_matches(folder, writer.fingerprint):
        log.info("feature cache %s is complete and matches the recipe: nothing to extract", folder)
        return folder

    item_bytes = encoder.num_tokens * encoder.width * STORE_DTYPES[settings.dtype].itemsize * (2 if settings.flip else 1)
    shards = assign_shards(missing, shard_length(settings.shard_size, item_bytes), env.rank, env.world_size)
    remaining = sum(len(gap) for gap in missing)
    log.info(
        "extract: %d %s images of %s -> %s with %s (%s), %dx%d tokens of width %d%s",
        len(dataset), split, dataset.source, folder, encoder.name, encoder.weights_source, *encoder.grid, encoder.width,
        f"; kept {len(done)} finished shard(s), {remaining} images left" if done else "",
    )

    started = time.perf_counter()
    encoded = encode_shards(encoder, dataset, shards, writer, settings, env)
    seconds = time.perf_counter() - started
    barrier()

    rows = sum(shard.rows for shard in writer.scan())
    if rows == 0:
        raise FaeError(f"no readable images in {dataset.source}: all {len(dataset)} files failed to decode (see the log for reasons)")
    if env.is_main:
        manifest = writer.finish(
            recipe_hash=stage_hash(recipe, "features"),
            recipe_toml=to_toml(recipe),
            **facts,
            throughput={"images": encoded, "seconds": round(seconds, 3), "world_size": env.world_size},
        )
        dataset.skipped.entries.extend((entry["file"], entry["reason"]) for entry in manifest["skipped"])
        dataset.skipped.report()
        rate = encoded / seconds if seconds > 0 else 0.0
        log.info("wrote %d feature rows to %s (%d skipped); this rank: %d images in %.1f s, %.1f images/s", rows, folder, len(dataset.skipped), encoded, seconds, rate)
    barrier()
    return folder


def feature_facts(encoder: FrozenEncoder, dataset: ImageDataset, settings: ExtractConfig) -> dict[str, Any]:
    """Manifest facts of a feature cache; they also form the identity that resumed shards must match."""
    return {
        "encoder": encoder.name,
        "weights_hash": encoder.weights_hash,
        "weights_source": encoder.weights_source,
        "image_size": dataset.image_size,
        "input_size": encoder.input_size,
        "grid": list(encoder.grid),
        "width": encoder.width,
        "mean": list(encoder.mean),
        "std": list(encoder.std),
        "dtype": settings.dtype,
        "flip": settings.flip,
        "num_classes": dataset.num_classes,
        "data": dataset.describe(),
    }


def _manifest_matches(folder: Path, fingerprint: str) -> bool:
    if not (folder / MANIFEST).is_file():
        return False
    return read_manifest(folder).get("fingerprint") == fingerprint


# ----------------------------------------------------------------------------------------------
# Encoding


@dataclass
class ReadBatch:
    """Decoded images of one batch plus the files of that batch that could not be read."""

    index: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor
    skipped: list[tuple[str, str]]

    @property
    def size(self) -> int:
        return len(self.index) + len(self.skipped)


class _Readable(Dataset):
    """Wrap a dataset so that unreadable files travel to the main process instead of raising."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, int, str, str | None]:
        image, label, reason = self.dataset.read(index)
        return index, image, label, self.dataset.name(index), reason


def collate_readable(items: list[tuple[int, torch.Tensor | None, int, str, str | None]]) -> ReadBatch:
    good = [item for item in items if item[1] is not None]
    skipped = [(name, reason or "unreadable") for _, image, _, name, reason in items if image is None]
    # Stacked by numpy in one thread, like the decoding: cheap next to the encoder's OpenMP work.
    images = torch.from_numpy(np.stack([item[1].numpy() for item in good])) if good else torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    index = torch.tensor([item[0] for item in good], dtype=torch.long)
    labels = torch.tensor([item[2] for item in good], dtype=torch.long)
    return ReadBatch(index, images, labels, skipped)


def encode_batch(encoder: FrozenEncoder, images: torch.Tensor, device: torch.device, flip: bool, precision: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode uint8 images N x 3 x S x S; return features (and features of mirrored images)."""
    x = images.to(device, non_blocking=True).float().div_(255)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = device.type == "cuda" and precision == "bf16"
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        features = encoder(x)
        flipped = encoder(x.flip(-1)) if flip else None
    return features, flipped


class _ShardBuffer:
    """Rows of one shard, preallocated in the stored dtype so that memory stays at one shard."""

    def __init__(self, capacity: int, encoder: FrozenEncoder, dtype: torch.dtype, flip: bool) -> None:
        shape = (capacity, encoder.num_tokens, encoder.width)
        self.features = torch.empty(shape, dtype=dtype)
        self.flipped = torch.empty(shape, dtype=dtype) if flip else None
        self.index = torch.empty(capacity, dtype=torch.long)
        self.labels = torch.empty(capacity, dtype=torch.long)
        self.skipped: list[tuple[str, str]] = []
        self.rows = 0

    def add(self, batch: ReadBatch, features: torch.Tensor | None, flipped: torch.Tensor | None) -> None:
        self.skipped.extend(batch.skipped)
        count = len(batch.index)
        if count == 0:
            return
        rows = slice(self.rows, self.rows + count)
        self.features[rows] = features.to("cpu", self.features.dtype)
        if self.flipped is not None:
            self.flipped[rows] = flipped.to("cpu", self.flipped.dtype)
        self.index[rows] = batch.index
        self.labels[rows] = batch.labels
        self.rows += count

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            "features": self.features[: self.rows],
            "labels": self.labels[: self.rows],
            "index": self.index[: self.rows],
        }
        if self.flipped is not None:
            tensors["features_flip"] = self.flipped[: self.rows]
        return tensors


def encode_shards(encoder: FrozenEncoder, dataset: ImageDataset, shards: list[range], writer: CacheWriter, settings: ExtractConfig, env: DistEnv) -> int:
    """Encode and write `shards` in order; return the number of images this rank processed."""
    if not shards:
        return 0
    batch_size = settings.batch_size
    batches = [list(range(start, min(start + batch_size, shard.stop))) for shard in shards for start in range(shard.start, shard.stop, batch_size)]
    loader = DataLoader(
        _Readable(dataset),
        batch_sampler=batches,
        num_workers=settings.workers,
        collate_fn=collate_readable,
        pin_memory=env.device.type == "cuda",
    )
    batches_left = iter(loader)
    total = sum(len(shard) for shard in shards)
    processed = 0

    with _progress(enabled=env.is_main) as progress:
        task = progress.add_task(f"extract {encoder.name}" + (f" (rank 0 of {env.world_size})" if env.distributed else ""), total=total)
        for shard in shards:
            buffer = _ShardBuffer(len(shard), encoder, STORE_DTYPES[settings.dtype], settings.flip)
            for _ in range(math.ceil(len(shard) / batch_size)):
                batch = next(batches_left)
                features, flipped = (None, None)
                if len(batch.index):
                    features, flipped = encode_batch(encoder, batch.images, env.device, settings.flip, settings.precision)
                buffer.add(batch, features, flipped)
                processed += batch.size
                progress.advance(task, batch.size)
            writer.write(shard, buffer.tensors(), buffer.skipped)
    return processed


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} images/s" if speed else "- images/s")


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )
