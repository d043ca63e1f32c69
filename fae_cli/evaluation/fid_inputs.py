"""Inputs of `evaluate fid`: image folders, ADM-style image .npz files and statistics .npz files.

- A folder: every image file in it and its sub-folders, decoded to RGB by the same rules as
  training data (`fae_cli.data.images`), so grey, RGBA, palette and CMYK files count as RGB.
- An .npz with `arr_0`: uint8 N x H x W x 3 images, as ADM's sample and reference batches. It is
  read in batches straight from the zip member, so 50,000 images need not fit in memory.
- An .npz with `mu`, `sigma` (pool3, 2048-d) and optionally `mu_s`, `sigma_s` (sFID, 2023-d):
  precomputed reference statistics. ADM's reference batches hold both images and statistics.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fae_cli.data.images import SkippedFiles, list_images, try_load_rgb
from fae_cli.errors import FaeError
from fae_cli.evaluation.frechet import GaussianStats
from fae_cli.evaluation.inception import POOL_WIDTH, SPATIAL_WIDTH

log = logging.getLogger(__name__)

STATISTICS_KEYS = {"pool": ("mu", "sigma", POOL_WIDTH), "spatial": ("mu_s", "sigma_s", SPATIAL_WIDTH)}
"""Feature name -> (mean key, covariance key, width) in a statistics .npz."""


def statistics_label(feature: str) -> str:
    """Return the .npz keys of a feature's statistics, e.g. "mu/sigma" for "pool"."""
    mean_key, cov_key, _ = STATISTICS_KEYS[feature]
    return f"{mean_key}/{cov_key}"


class ImageBatches(Protocol):
    """Images to score: `count` of them, yielded as uint8 N x 3 x H x W batches of one size each."""

    count: int
    skipped: SkippedFiles

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]: ...


@dataclass
class MetricInput:
    """One side of an evaluation: images to run through Inception, precomputed statistics, or both."""

    path: Path
    kind: str
    images: ImageBatches | None = None
    stats: dict[str, GaussianStats] = field(default_factory=dict)
    """Precomputed statistics by feature name: "pool" (FID) and "spatial" (sFID)."""

    def describe(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "images": self.images.count - len(self.images.skipped) if self.images is not None else 0,
            "skipped": len(self.images.skipped) if self.images is not None else 0,
            "statistics": [statistics_label(feature) for feature in sorted(self.stats)],
        }


def open_input(path: str | Path, *, role: str) -> MetricInput:
    """Open a folder or .npz as the `role` ("samples" or "reference") side of an evaluation."""
    path = Path(path)
    if path.is_dir():
        return MetricInput(path, "folder", images=FolderImages(path))
    if path.suffix.lower() == ".npz" and path.is_file():
        return _open_npz(path, role)
    if not path.exists():
        raise FaeError(f"{role} not found: {path}")
    raise FaeError(f"{role} {path} is neither an image folder nor an .npz file")


def _open_npz(path: Path, role: str) -> MetricInput:
    try:
        with np.load(path) as data:
            names = set(data.files)
            stats = {name: _read_stats(data, path, keys) for name, keys in STATISTICS_KEYS.items() if keys[0] in names}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise FaeError(f"cannot read {path}: {error}") from None

    images = NpzImages(path) if "arr_0" in names else None
    if images is None and not stats:
        raise FaeError(f"{path} has neither images (arr_0) nor statistics (mu, sigma); found {sorted(names)}")
    if role == "samples" and images is None:
        raise FaeError(f"samples {path} contains only statistics; samples must be images (a folder or an .npz with arr_0)")
    if role == "samples":
        stats = {}
    kinds = []
    if images is not None:
        kinds.append("images")
    if stats:
        kinds.append("statistics")
    return MetricInput(path, "npz " + " + ".join(kinds), images=images, stats=stats)


def _read_stats(data: np.lib.npyio.NpzFile, path: Path, keys: tuple[str, str, int]) -> GaussianStats:
    mean_key, cov_key, width = keys
    if cov_key not in data.files:
        raise FaeError(f"{path} has {mean_key} but no {cov_key}")
    mu = np.asarray(data[mean_key], dtype=np.float64)
    sigma = np.asarray(data[cov_key], dtype=np.float64)
    if mu.shape != (width,) or sigma.shape != (width, width):
        raise FaeError(f"{path}: {mean_key} {mu.shape} and {cov_key} {sigma.shape} should be ({width},) and ({width}, {width})")
    return GaussianStats(mu, sigma)


class FolderImages:
    """The image files of a folder (recursive, sorted), decoded in a background thread."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = list_images(folder, recursive=True)
        if not self.files:
            raise FaeError(f"no image files in {folder}")
        self.count = len(self.files)
        self.skipped = SkippedFiles()

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        chunks = [self.files[start : start + batch_size] for start in range(0, len(self.files), batch_size)]
        # Decode chunk i + 1 while the caller runs Inception on chunk i; Pillow releases the GIL
        # while it decompresses.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._decode, chunks[0])
            for index in range(len(chunks)):
                arrays = pending.result()
                if index + 1 < len(chunks):
                    pending = pool.submit(self._decode, chunks[index + 1])
                yield from _stack_same_size(arrays)
        self.skipped.report()
        if len(self.skipped) == self.count:
            raise FaeError(f"none of the {self.count} image files in {self.folder} could be decoded")

    def _decode(self, paths: list[Path]) -> list[np.ndarray]:
        arrays = []
        for path in paths:
            image, reason = try_load_rgb(path)
            if image is None:
                self.skipped.add(path, reason or "unreadable")
                continue
            arrays.append(np.asarray(image, dtype=np.uint8))
        return arrays


class NpzImages:
    """`arr_0` of an .npz (uint8 N x H x W x 3), read batch by batch from the zip member."""

    def __init__(self, path: Path, member: str = "arr_0"):
        self.path = path
        self.member = f"{member}.npy"
        self.skipped = SkippedFiles()
        with zipfile.ZipFile(path) as archive, archive.open(self.member) as stream:
            shape, dtype = _read_npy_header(stream, path)
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
            raise FaeError(f"{path}: {member} is {np.dtype(dtype).name} {shape}; expected uint8 N x H x W x 3 images")
        if shape[0] == 0:
            raise FaeError(f"{path}: {member} contains no images")
        self.count, self.height, self.width = shape[0], shape[1], shape[2]

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        image_bytes = self.height * self.width * 3
        with zipfile.ZipFile(self.path) as archive, archive.open(self.member) as stream:
            _read_npy_header(stream, self.path)
            for start in range(0, self.count, batch_size):
                size = min(batch_size, self.count - start)
                buffer = stream.read(size * image_bytes)
                if len(buffer) != size * image_bytes:
                    raise FaeError(f"{self.path}: arr_0 ends after {start} + {len(buffer) // image_bytes} images; the file is truncated")
                array = torch.frombuffer(bytearray(buffer), dtype=torch.uint8).view(size, self.height, self.width, 3)
                yield array.permute(0, 3, 1, 2).contiguous()


def _read_npy_header(stream, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise FaeError(f"{path}: unsupported .npy format version {version}")
    if fortran_order:
        raise FaeError(f"{path}: arr_0 is stored in Fortran order; save it with np.ascontiguousarray")
    return shape, dtype


class TensorImages:
    """Images already in memory (uint8 N x 3 x H x W), e.g. reconstructions scored by rFID."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 N x 3 x H x W images, got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.count = images.shape[0]
        self.skipped = SkippedFiles()

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        yield from self.images.split(batch_size)


def _stack_same_size(arrays: list[np.ndarray]) -> Iterator[torch.Tensor]:
    """Stack H x W x 3 arrays into N x 3 x H x W batches, starting a new batch when the size changes."""
    start = 0
    for end in range(1, len(arrays) + 1):
        if end == len(arrays) or arrays[end].shape != arrays[start].shape:
            yield torch.from_numpy(np.stack(arrays[start:end])).permute(0, 3, 1, 2).contiguous()
            start = end
