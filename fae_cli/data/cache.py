"""Feature and latent caches: sharded safetensors plus `manifest.json`.

Layout of a cache folder:
  part-000000000.safetensors  one shard, named by the first dataset index it covers.
                              Tensors: `features` (B x L x D) or `latents` (B x C x H x W) in
                              the stored dtype, `labels` (int64 B, -1 unlabelled) and `index`
                              (int64 B, the dataset index of each row). Caches with flips add
                              `features_flip` / `latents_flip` (horizontally flipped images).
                              Header metadata: the covered index range [start, stop), the
                              unreadable files in that range, and the fingerprint of the settings.
  manifest.json               written last, once every index is covered: encoder, grid, width,
                              dtype, count, the shard list and the skipped files.

A shard covers a contiguous index range [start, stop); its rows are the readable images of that
range, in order. Shards are written atomically (temporary file, fsync, rename), so a folder only
ever holds complete shards: a rerun after a kill keeps them and extracts the missing ranges,
whatever the world size of either run. Readers memory-map the shards, so reading a batch touches
only its rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fae_cli.artifacts import MANIFEST, _fsync_dir, describe_changes, read_manifest, write_manifest
from fae_cli.errors import FaeError
from fae_cli.training.distributed import shard_indices

FORMAT = "fae-cache-1"
KINDS = ("features", "latents")
SHARD_GLOB = "part-*.safetensors"
MAX_SHARD_BYTES = 2 * 1024**3


def shard_name(start: int) -> str:
    return f"part-{start:09d}.safetensors"


def shard_length(shard_size: int, bytes_per_item: int) -> int:
    """Return the images per shard: `shard_size`, lowered so that a shard stays within 2 GiB."""
    return max(1, min(shard_size, MAX_SHARD_BYTES // max(1, bytes_per_item)))


def fingerprint(identity: dict[str, Any]) -> str:
    """Return a 16-hex-digit hash of the settings that determine a cache's content."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def assign_shards(missing: list[range], length: int, rank: int, world_size: int) -> list[range]:
    """Return the shards of this rank: a contiguous share of the missing indices, cut into pieces.

    The missing indices are taken in order and split over ranks with `shard_indices`, so every
    index goes to exactly one rank and none is padded or repeated. Each share is cut into shards
    of at most `length` indices that never span a gap between missing ranges.
    """
    total = sum(len(run) for run in missing)
    share = shard_indices(total, rank, world_size)
    shards: list[range] = []
    position = 0
    for run in missing:
        # This run's positions in the concatenated order, intersected with the share.
        first = max(share.start, position)
        last = min(share.stop, position + len(run))
        for start in range(first, last, length):
            stop = min(start + length, last)
            shards.append(range(run.start + start - position, run.start + stop - position))
        position += len(run)
    return shards


@dataclass(frozen=True)
class ShardInfo:
    """A complete shard on disk."""

    file: str
    start: int
    stop: int
    rows: int
    skipped: list[tuple[str, str]]

    def describe(self) -> dict[str, Any]:
        return {"file": self.file, "start": self.start, "stop": self.stop, "rows": self.rows}


# ----------------------------------------------------------------------------------------------
# Writing


class CacheWriter:
    """Write a cache of `count` dataset indices shard by shard, keeping shards of earlier runs.

    `identity` contains the settings that determine the content (encoder, weights hash, sizes,
    dtype, flips, dataset); shards written under other settings are never mixed in. Under
    torchrun every rank creates a writer; rank 0 calls `prepare` and `finish`, every rank calls
    `scan` (before any rank writes) and `write` for its own shards.
    """

    def __init__(self, folder: str | Path, *, kind: str, count: int, identity: dict[str, Any]) -> None:
        if kind not in KINDS:
            raise ValueError(f"cache kind must be one of {KINDS}, got {kind!r}")
        self.folder = Path(folder)
        self.kind = kind
        self.count = count
        self.identity = identity
        self.fingerprint = fingerprint(identity)

    def prepare(self) -> None:
        """Create the folder and remove temporary files that a killed run left behind."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".part-*.tmp-*"):
            stale.unlink(missing_ok=True)

    def scan(self) -> list[ShardInfo]:
        """Return the complete shards in the folder, sorted by start; raise if they do not belong."""
        shards = [self._read_header(path) for path in sorted(self.folder.glob(SHARD_GLOB))] if self.folder.is_dir() else []
        shards.sort(key=lambda shard: shard.start)
        for before, after in zip(shards, shards[1:]):
            if after.start < before.stop:
                raise FaeError(
                    f"shards {before.file} and {after.file} in {self.folder} overlap; delete one of them and rerun to re-extract its range"
                )
        if shards and shards[-1].stop > self.count:
            raise FaeError(f"shard {shards[-1].file} in {self.folder} covers index {shards[-1].stop - 1} but the dataset has {self.count} images")
        return shards

    def missing(self, shards: list[ShardInfo]) -> list[range]:
        """Return the index ranges that no complete shard covers, in order."""
        gaps = []
        position = 0
        for shard in shards:
            if shard.start > position:
                gaps.append(range(position, shard.start))
            position = shard.stop
        if position < self.count:
            gaps.append(range(position, self.count))
        return gaps

    def write(self, shard: range, tensors: dict[str, torch.Tensor], skipped: list[tuple[str, str]]) -> Path:
        """Write one shard atomically: a temporary file, fsynced, renamed into place."""
        metadata = {
            "fae.format": FORMAT,
            "fae.kind": self.kind,
            "fae.fingerprint": self.fingerprint,
            "fae.identity": json.dumps(self.identity, sort_keys=True, default=str),
            "fae.start": str(shard.start),
            "fae.stop": str(shard.stop),
            "fae.skipped": json.dumps(skipped),
        }
        path = self.folder / shard_name(shard.start)
        temporary = self.folder / f".{path.name}.tmp-{os.getpid()}"
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(temporary), metadata=metadata)
        # safetensors creates the file private (0600); a cache is shared like the manifest beside it.
        os.chmod(temporary, 0o644)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        _fsync_dir(self.folder)
        return path

    def finish(self, *, recipe_hash: str, recipe_toml: str | None = None, **facts: Any) -> dict[str, Any]:
        """Check that the shards cover every index, then write `manifest.json` and return it."""
        shards = self.scan()
        gaps = self.missing(shards)
        if gaps:
            listed = ", ".join(f"{gap.start}-{gap.stop - 1}" for gap in gaps[:3])
            raise FaeError(f"cache {self.folder} is incomplete: no shard covers indices {listed}; rerun the same command to extract them")
        skipped = [{"file": name, "reason": reason} for shard in shards for name, reason in shard.skipped]
        return write_manifest(
            self.folder,
            self.kind,
            recipe_hash=recipe_hash,
            recipe_toml=recipe_toml,
            format=FORMAT,
            fingerprint=self.fingerprint,
            count=sum(shard.rows for shard in shards),
            images=self.count,
            skipped=skipped,
            shards=[shard.describe() for shard in shards],
            **facts,
        )

    def _read_header(self, path: Path) -> ShardInfo:
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                rows = handle.get_slice("index").get_shape()[0] if "index" in handle.keys() else -1
        except (SafetensorError, OSError) as error:
            raise FaeError(f"shard {path} is unreadable ({error}); delete it and rerun to re-extract its images") from None
        if metadata.get("fae.format") != FORMAT or rows < 0:
            raise FaeError(f"{path} is not a fae cache shard; move it out of {self.folder} or choose another output folder")
        if metadata["fae.fingerprint"] != self.fingerprint:
            stored = json.loads(metadata["fae.identity"])
            details = describe_changes(stored, json.loads(json.dumps(self.identity, default=str)))
            raise FaeError(f"{self.folder} contains a cache made with other settings ({details}); choose another output folder or delete it")
        skipped = [tuple(entry) for entry in json.loads(metadata["fae.skipped"])]
        return ShardInfo(path.name, int(metadata["fae.start"]), int(metadata["fae.stop"]), rows, skipped)


# ----------------------------------------------------------------------------------------------
# Reading


class Cache:
    """A complete cache, memory-mapped: rows are read from the shards only when asked for.

    Row r of the cache is the r-th stored image in index order; `index[r]` is its dataset index
    (they differ only after skipped images). `get` and `load_all` return float32.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = folder
        self.manifest = manifest
        self.kind = manifest["kind"]
        self.has_flip = bool(manifest["flip"])
        self.num_classes = int(manifest["num_classes"])
        self.grid = tuple(manifest["grid"])
        self._files = [folder / shard["file"] for shard in manifest["shards"]]
        missing = [path.name for path in self._files if not path.is_file()]
        if missing:
            raise FaeError(f"cache {folder} is missing shard {missing[0]}; rerun fae extract with the same settings to rebuild it")

        rows = [int(shard["rows"]) for shard in manifest["shards"]]
        self._starts = torch.tensor([0, *rows]).cumsum(0)
        self._handles: list[Any] | None = None
        self.labels = self._concat("labels", torch.long)
        self.index = self._concat("index", torch.long)
        self.item_shape, self.dtype = self._item_layout()
        self.width = self.item_shape[-1] if self.kind == "features" else self.item_shape[0]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps do not pickle; a DataLoader worker reopens the shards on first access.
        state = self.__dict__.copy()
        state["_handles"] = None
        return state

    def _handle(self, shard: int) -> Any:
        if self._handles is None:
            self._handles = [None] * len(self._files)
        if self._handles[shard] is None:
            self._handles[shard] = safe_open(str(self._files[shard]), framework="pt")
        return self._handles[shard]

    def _tensor_name(self, flip: bool) -> str:
        if flip and not self.has_flip:
            raise FaeError(f"cache {self.folder} has no flipped copies; extract again with extract.flip = true")
        return f"{self.kind}_flip" if flip else self.kind

    def _concat(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        parts = [self._handle(shard).get_tensor(name) for shard in range(len(self._files))]
        return torch.cat(parts).to(dtype) if parts else torch.empty(0, dtype=dtype)

    def _item_layout(self) -> tuple[tuple[int, ...], torch.dtype]:
        for shard in range(len(self._files)):
            handle = self._handle(shard)
            if handle.get_slice(self.kind).get_shape()[0]:
                sample = handle.get_slice(self.kind)[0:1]
                return tuple(sample.shape[1:]), sample.dtype
        raise FaeError(f"cache {self.folder} contains no rows")

    def get(self, indices: torch.Tensor, flip: bool = False) -> torch.Tensor:
        """Return rows `indices` (cache rows 0..len-1, any order, repeats allowed) as float32."""
        name = self._tensor_name(flip)
        rows = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
            raise IndexError(f"cache rows must lie in [0, {len(self)}), got {int(rows.min())}..{int(rows.max())}")

        out = torch.empty((rows.numel(), *self.item_shape), dtype=torch.float32)
        shard_of = torch.searchsorted(self._starts, rows, right=True) - 1
        for shard in shard_of.unique().tolist():
            where = (shard_of == shard).nonzero().reshape(-1)
            local = rows[where] - self._starts[shard]
            out[where] = self._read_rows(shard, local, name)
        return out

    def _read_rows(self, shard: int, local: torch.Tensor, name: str) -> torch.Tensor:
        # Read each run of consecutive rows with one slice, then put the rows back in request order.
        wanted, inverse = torch.unique(local, sorted=True, return_inverse=True)
        breaks = (torch.nonzero(wanted[1:] - wanted[:-1] != 1).reshape(-1) + 1).tolist()
        bounds = [0, *breaks, len(wanted)]
        view = self._handle(shard).get_slice(name)
        pieces = [view[int(wanted[a]) : int(wanted[b - 1]) + 1] for a, b in zip(bounds, bounds[1:])]
        return torch.cat(pieces).float()[inverse]

    def load_all(self, flip: bool = False) -> torch.Tensor:
        """Return every row as one float32 tensor (the whole cache in memory)."""
        name = self._tensor_name(flip)
        out = torch.empty((len(self), *self.item_shape), dtype=torch.float32)
        for shard in range(len(self._files)):
            start, stop = int(self._starts[shard]), int(self._starts[shard + 1])
            if stop > start:
                out[start:stop] = self._handle(shard).get_tensor(name).float()
        return out


def open_cache(folder: str | Path, kind: str = "features") -> Cache:
    """Open a complete cache folder of `kind` ('features' or 'latents') for memory-mapped reading."""
    if kind not in KINDS:
        raise ValueError(f"cache kind must be one of {KINDS}, got {kind!r}")
    folder = Path(folder)
    if not (folder / MANIFEST).is_file() and any(folder.glob(SHARD_GLOB)):
        raise FaeError(f"cache {folder} is incomplete (shards without {MANIFEST}); rerun the same fae extract command to finish it")
    manifest = read_manifest(folder, expect_kind=kind)
    return Cache(folder, manifest)
