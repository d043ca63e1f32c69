"""Image files: discovery and robust decoding to 8-bit RGB with Pillow.

Decoding rules (the same for training data and for evaluation, so FID sees what training saw):
- Any Pillow mode becomes 3-channel 8-bit RGB.
- Alpha is dropped, keeping the stored colour values, as Pillow's `convert("RGB")` does and as
  torch-fidelity and the ADM evaluation pipeline do; transparent areas are not composited.
- Palette images go through RGBA first, so a palette with transparency decodes like RGBA.
- 16-bit and 32-bit integer greyscale (I;16, I) keep their top 8 bits of the value range actually
  used by the mode (I;16: value >> 8); float images (F) are clipped to [0, 255].
- CMYK and YCbCr use Pillow's conversion.

Resizing follows the ADM (guided-diffusion) ImageNet pipeline: halve with a box filter while the
short side is at least twice the target, resize the short side to the target with bicubic
interpolation, then crop the centre square.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fae_cli.errors import FaeError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


def is_image_file(path: Path) -> bool:
    """Match image extensions case-insensitively (`.JPEG` counts)."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Return the image files of a folder in sorted order; raise if the folder is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FaeError(f"image folder not found: {folder}")
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(path for path in pattern if is_image_file(path))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a Pillow image of any mode to 8-bit RGB (rules in the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        array = np.asarray(image, dtype=np.uint16) >> 8
        return Image.fromarray(array.astype(np.uint8), mode="L").convert("RGB")
    if mode == "I":
        array = np.asarray(image, dtype=np.int64)
        shift = 8 if array.max(initial=0) > 255 else 0
        shift = 24 if array.max(initial=0) > 65535 else shift
        return Image.fromarray(np.clip(array >> shift, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        array = np.clip(np.asarray(image, dtype=np.float32), 0, 255)
        return Image.fromarray(np.rint(array).astype(np.uint8), mode="L").convert("RGB")
    if mode == "P":
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully into RGB; raise OSError-like errors for unreadable files."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


@dataclass
class SkippedFiles:
    """Unreadable files met while decoding a dataset, reported once in the log and the manifest."""

    entries: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str | Path, reason: str) -> None:
        self.entries.append((str(path), reason))

    def __len__(self) -> int:
        return len(self.entries)

    def report(self) -> None:
        if not self.entries:
            return
        shown = ", ".join(f"{Path(path).name} ({reason})" for path, reason in self.entries[:5])
        more = f", and {len(self.entries) - 5} more" if len(self.entries) > 5 else ""
        log.warning("skipped %d unreadable image(s): %s%s", len(self.entries), shown, more)


def try_load_rgb(path: str | Path) -> tuple[Image.Image | None, str | None]:
    """Decode a file; on failure return (None, short reason) instead of raising."""
    try:
        return load_rgb(path), None
    except UnidentifiedImageError:
        return None, "not an image"
    except (OSError, SyntaxError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "truncated" in reason.lower():
            reason = "truncated"
        return None, reason


def center_crop_adm(image: Image.Image, size: int) -> np.ndarray:
    """Resize so the short side equals `size` and crop the centre: uint8 array size x size x 3.

    Box-filter halving first keeps large downscales free of aliasing; the bicubic step then
    lands the short side exactly on `size` (ADM's `center_crop_arr`).
    """
    image = to_rgb(image)
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)

    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)

    array = np.array(image)
    top = (array.shape[0] - size) // 2
    left = (array.shape[1] - size) // 2
    return np.ascontiguousarray(array[top : top + size, left : left + size])
