"""Image datasets: class folders, flat folders, .npz arrays and the embedded Fashion-MNIST subset.

Every dataset yields `(image, label)`: a uint8 tensor 3 x S x S after the ADM resize and centre
crop to `data.image_size` (decoding rules in `fae_cli.data.images`), and an int label that is -1
for unlabelled images.

Splits. Folders are sorted by relative path and .npz arrays keep their row order. The holdout
split is `data.holdout` images evenly spaced over that order, and the train split is the rest,
which `data.limit` thins to evenly spaced rows. In a folder with class sub-folders the sorted
order runs class by class, so even spacing keeps each class's share in both splits (taking the
last rows would hold out only the last classes). The embedded Fashion-MNIST subset uses its own
test split (1,000 images) as the holdout and ignores `data.holdout`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fae_cli.data.images import (
    IMAGE_EXTENSIONS,
    SkippedFiles,
    center_crop_adm,
    list_images,
    try_load_rgb,
)
from fae_cli.errors import FaeError
from fae_cli.recipe import DataConfig

log = logging.getLogger(__name__)

EMBEDDED = "fashion-mnist"
EMBEDDED_FILE = Path(__file__).resolve().parents[2] / "data" / "fashion-mnist" / "fashion-mnist-subset.npz"
SPLITS = ("train", "holdout")
IMAGE_KEYS = ("images", "arr_0", "x")
LABEL_KEYS = ("labels", "arr_1", "y")


class ImageDataset(Dataset):
    """Images of one split, decoded and cropped on access; subclasses supply `_decode`."""

    def __init__(
        self,
        *,
        source: str,
        layout: str,
        split: str,
        image_size: int,
        labels: np.ndarray,
        class_names: list[str],
        rows: np.ndarray,
        total: int,
    ) -> None:
        self.source = source
        self.layout = layout
        self.split = split
        self.image_size = image_size
        self.labels = labels.astype(np.int64)
        self.class_names = class_names
        self.rows = rows.astype(np.int64)  # positions of this split's items in the sorted source
        self.total = total
        self.skipped = SkippedFiles()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, index: int) -> str:
        """Name of item `index` as logs and manifests show it."""
        return f"{self.source}[{self.rows[index]}]"

    def _decode(self, index: int) -> tuple[Image.Image | None, str | None]:
        raise NotImplementedError

    def read(self, index: int) -> tuple[torch.Tensor | None, int, str | None]:
        """Decode item `index`: (image, label, None), or (None, label, reason) if unreadable."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image, reason = self._decode(index)
        label = int(self.labels[index])
        if image is None:
            return None, label, reason
        # numpy transposes in one thread; a torch copy here would open an OpenMP region per image.
        array = np.ascontiguousarray(center_crop_adm(image, self.image_size).transpose(2, 0, 1))
        return torch.from_numpy(array), label, None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label, reason = self.read(index)
        if image is None:
            self.skipped.add(self.name(index), reason or "unreadable")
            raise FaeError(f"unreadable image {self.name(index)}: {reason}; use read() to skip such files")
        return image, label

    def describe(self) -> dict[str, Any]:
        """Facts for manifests: where the images come from and which of them this split holds."""
        return {
            "source": self.source,
            "layout": self.layout,
            "split": self.split,
            "count": len(self),
            "rows_sha256": hashlib.sha256(self.rows.tobytes()).hexdigest()[:16],
            "total": self.total,
            "image_size": self.image_size,
            "preprocessing": "adm-center-crop",
            "num_classes": self.num_classes,
            "class_names": self.class_names,
        }


class FolderDataset(ImageDataset):
    """Image files decoded with Pillow; unreadable files come back as (None, reason)."""

    def __init__(self, root: Path, files: list[Path], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.files = files

    def name(self, index: int) -> str:
        return str(self.files[index].relative_to(self.root))

    def _decode(self, index: int) -> tuple[Image.Image | None, str | None]:
        return try_load_rgb(self.files[index])


class ArrayDataset(ImageDataset):
    """uint8 arrays N x H x W (grey) or N x H x W x C (C = 1, 3 or 4) held in memory.

    `images` is the whole source array; item i reads row `rows[i]`, so a split costs no copy.
    """

    def __init__(self, images: np.ndarray, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.images = images

    def _decode(self, index: int) -> tuple[Image.Image | None, str | None]:
        array = self.images[self.rows[index]]
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        return Image.fromarray(array), None


# ----------------------------------------------------------------------------------------------
# Opening a dataset from the recipe


def open_images(data: DataConfig, split: str = "train") -> ImageDataset:
    """Open `data.source` (embedded name, image folder or .npz) and select `split`."""
    if split not in SPLITS:
        raise FaeError(f"invalid split {split!r}: use 'train' or 'holdout'")
    if data.source == EMBEDDED:
        return _open_embedded(data, split)

    path = Path(data.source).expanduser()
    if path.is_dir():
        return _open_folder(path, data, split)
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise FaeError(f"data.source file not found: {path}")
        return _open_npz(path, data, split)
    raise FaeError(f"data.source {data.source!r} not found: use '{EMBEDDED}', an image folder or an .npz file")


def split_rows(total: int, data: DataConfig, split: str, source: str) -> np.ndarray:
    """Return the rows of `split` among `total` sorted images.

    The holdout is `data.holdout` evenly spaced rows; train is every other row, thinned to
    `data.limit` evenly spaced rows when that is set.
    """
    holdout = data.holdout
    if holdout >= total:
        raise FaeError(f"data.holdout = {holdout} leaves no training images in {source} ({total} images); lower it")
    if split == "holdout" and holdout == 0:
        raise FaeError(f"{source} has no holdout split because data.holdout = 0; set data.holdout to the number of images to hold out")
    holdout_rows = evenly_spaced(total, holdout)
    if split == "holdout":
        return holdout_rows
    train = np.setdiff1d(np.arange(total, dtype=np.int64), holdout_rows, assume_unique=True)
    if data.limit is not None and data.limit < len(train):
        train = train[evenly_spaced(len(train), data.limit)]
    return train


def evenly_spaced(total: int, count: int) -> np.ndarray:
    """Return `count` distinct indices in [0, total), one at the middle of each of `count` equal bins."""
    return np.floor((np.arange(count, dtype=np.float64) + 0.5) * total / count).astype(np.int64)


def _open_folder(root: Path, data: DataConfig, split: str) -> ImageDataset:
    class_dirs = sorted(child for child in root.iterdir() if child.is_dir() and not child.name.startswith("."))
    class_files = [(folder.name, list_images(folder, recursive=True)) for folder in class_dirs]
    class_files = [(name, files) for name, files in class_files if files]
    top_level = list_images(root)

    if class_files:
        if top_level:
            log.warning("ignoring %d image(s) directly in %s: class sub-folders hold the labelled images", len(top_level), root)
        class_names = [name for name, _ in class_files]
        files = [path for _, paths in class_files for path in paths]
        labels = np.concatenate([np.full(len(paths), label) for label, (_, paths) in enumerate(class_files)])
        layout = "class-folders"
    else:
        class_names = []
        files = top_level
        labels = np.full(len(files), -1)
        layout = "flat-folder"

    if not files:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise FaeError(f"no image files in {root} (looked for {extensions}, any case, in the folder and its class sub-folders)")

    rows = split_rows(len(files), data, split, str(root))
    return FolderDataset(
        root,
        [files[row] for row in rows],
        source=str(root.resolve()),
        layout=layout,
        split=split,
        image_size=data.image_size,
        labels=labels[rows],
        class_names=class_names,
        rows=rows,
        total=len(files),
    )


def _open_npz(path: Path, data: DataConfig, split: str) -> ImageDataset:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise FaeError(f"cannot read {path}: {error}") from None
    with archive:
        image_key = next((key for key in IMAGE_KEYS if key in archive.files), None)
        if image_key is None:
            raise FaeError(f"{path} has no image array: expected one of the keys {', '.join(IMAGE_KEYS)} (found {', '.join(archive.files)})")
        images = archive[image_key]
        label_key = next((key for key in LABEL_KEYS if key in archive.files), None)
        labels = archive[label_key].astype(np.int64) if label_key else np.full(len(images), -1)
        names = [str(name) for name in archive["class_names"]] if "class_names" in archive.files else None

    _check_image_array(images, f"{path}:{image_key}")
    if len(labels) != len(images):
        raise FaeError(f"{path}: {len(images)} images but {len(labels)} labels in '{label_key}'")
    if names is None:
        names = [str(label) for label in range(int(labels.max()) + 1)] if label_key and len(labels) else []

    rows = split_rows(len(images), data, split, str(path))
    return ArrayDataset(
        images,
        source=str(path.resolve()),
        layout="npz",
        split=split,
        image_size=data.image_size,
        labels=labels[rows],
        class_names=names,
        rows=rows,
        total=len(images),
    )


def _check_image_array(images: np.ndarray, where: str) -> None:
    if images.dtype != np.uint8:
        raise FaeError(f"{where} has dtype {images.dtype}: expected uint8 images (0-255)")
    grey = images.ndim == 3
    channels_last = images.ndim == 4 and images.shape[3] in (1, 3, 4)
    if not (grey or channels_last):
        raise FaeError(f"{where} has shape {images.shape}: expected N x H x W or N x H x W x C with C = 1, 3 or 4")
    if len(images) == 0:
        raise FaeError(f"{where} contains no images")


def _open_embedded(data: DataConfig, split: str) -> ImageDataset:
    if not EMBEDDED_FILE.is_file():
        raise FaeError(
            f"the embedded Fashion-MNIST subset is missing ({EMBEDDED_FILE}); run fae from a source checkout "
            "or rebuild it with data/fashion-mnist/make_subset.py"
        )
    stored = "test" if split == "holdout" else data.split
    with np.load(EMBEDDED_FILE, allow_pickle=False) as archive:
        images = archive[f"{stored}_images"]
        labels = archive[f"{stored}_labels"].astype(np.int64)
        class_names = [str(name) for name in archive["class_names"]]

    rows = np.arange(len(images), dtype=np.int64)
    if split == "train" and data.limit is not None and data.limit < len(rows):
        rows = evenly_spaced(len(rows), data.limit)
    return ArrayDataset(
        images,
        source=EMBEDDED,
        layout=f"fashion-mnist-{stored}",
        split=split,
        image_size=data.image_size,
        labels=labels[rows],
        class_names=class_names,
        rows=rows,
        total=len(images),
    )
