"""Rebuild `fashion-mnist-subset.npz` from the Debian package `dataset-fashion-mnist`.

Selection: walking each split in its original order, keep an image while its class has fewer
than 600 (train) or 100 (test) kept images, so every class is represented equally and the
kept images keep their original relative order. Run from anywhere:

    python data/fashion-mnist/make_subset.py [--source /usr/share/datasets/fashion-mnist]

The output is deterministic: `np.savez_compressed` of the same arrays gives the same arrays
back (the zip container itself stores timestamps, so compare contents, not file hashes).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
from pathlib import Path

import numpy as np

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
PER_CLASS = {"train": 600, "test": 100}
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (big-endian header: magic with dtype and rank, then one size per axis)."""
    data = gzip.decompress(path.read_bytes())
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * axis : 8 + 4 * axis], "big") for axis in range(rank))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(shape)


def select_balanced(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Return the indices of the first `per_class` images of every class, in original order."""
    kept = [np.flatnonzero(labels == label)[:per_class] for label in range(len(CLASS_NAMES))]
    for label, indices in enumerate(kept):
        if len(indices) < per_class:
            raise ValueError(f"class {label} has only {len(indices)} images, {per_class} needed")
    return np.sort(np.concatenate(kept))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"), help="Folder with the four idx .gz files.")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("fashion-mnist-subset.npz"), help="Output .npz file.")
    args = parser.parse_args()

    arrays: dict[str, np.ndarray] = {"class_names": np.array(CLASS_NAMES)}
    for split, (image_file, label_file) in FILES.items():
        images = read_idx(args.source / image_file)
        labels = read_idx(args.source / label_file)
        index = select_balanced(labels, PER_CLASS[split])
        arrays[f"{split}_images"] = images[index]
        arrays[f"{split}_labels"] = labels[index]
        arrays[f"{split}_index"] = index.astype(np.int32)

    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    for name in (*FILES["train"], *FILES["test"]):
        path = args.source / name
        raw = path.read_bytes()
        print(f"{name}  gz sha256 {hashlib.sha256(raw).hexdigest()}  content sha256 {hashlib.sha256(gzip.decompress(raw)).hexdigest()}")


if __name__ == "__main__":
    main()
