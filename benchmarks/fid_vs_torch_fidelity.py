"""Time `fae evaluate fid` against torch-fidelity's `calculate_metrics` on the same two folders.

Both use the same Inception weights file and the same batch size; torch-fidelity keeps its
other defaults (DataLoader with up to 4 worker processes). The folders hold random crops of
scikit-image's sample photos (CC0 / public domain), saved as PNG. Runs alternate between the
two tools, and the median time of each is reported with the two FID values.

    python benchmarks/fid_vs_torch_fidelity.py --count 256 --repeats 2 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat")


def make_folder(folder: Path, count: int, size: int, seed: int) -> None:
    """Write `count` PNG crops (size x size) of scikit-image photos into `folder`."""
    import skimage.data

    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        photo = photos[index % len(photos)]
        crop = int(rng.integers(size, min(photo.shape[:2]) + 1))
        top = int(rng.integers(0, photo.shape[0] - crop + 1))
        left = int(rng.integers(0, photo.shape[1] - crop + 1))
        image = Image.fromarray(photo[top : top + crop, left : left + crop]).resize((size, size), Image.BICUBIC)
        image.save(folder / f"{index:05d}.png")


def time_fae(samples: Path, reference: Path, weights: Path, batch_size: int) -> tuple[float, float]:
    from fae_cli.evaluation.fid import run_fid

    start = time.perf_counter()
    report = run_fid(samples, reference, metrics=["fid"], batch_size=batch_size, weights=weights, device="cpu")
    return time.perf_counter() - start, report["metrics"]["fid"]


def time_torch_fidelity(samples: Path, reference: Path, weights: Path, batch_size: int) -> tuple[float, float]:
    from torch_fidelity import calculate_metrics

    start = time.perf_counter()
    metrics = calculate_metrics(
        input1=str(samples),
        input2=str(reference),
        fid=True,
        batch_size=batch_size,
        feature_extractor_weights_path=str(weights),
        cuda=False,
        cache=False,
        verbose=False,
    )
    return time.perf_counter() - start, metrics["frechet_inception_distance"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=256, help="images per folder")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=64, help="images per Inception forward (both tools)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each tool, taken in turns")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads; default: torch's choice")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the images; default: a temporary one")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from fae_cli.evaluation.inception import resolve_weights

    weights = resolve_weights().path
    import torch_fidelity  # noqa: F401  (import time is not part of either measurement)

    with tempfile.TemporaryDirectory() as scratch:
        root = args.workdir or Path(scratch)
        samples, reference = root / "samples", root / "reference"
        make_folder(samples, args.count, args.size, seed=0)
        make_folder(reference, args.count, args.size, seed=1)

        fae_times, fidelity_times = [], []
        for _ in range(args.repeats):
            seconds, fae_value = time_fae(samples, reference, weights, args.batch_size)
            fae_times.append(seconds)
            seconds, fidelity_value = time_torch_fidelity(samples, reference, weights, args.batch_size)
            fidelity_times.append(seconds)

    fae_median, fidelity_median = statistics.median(fae_times), statistics.median(fidelity_times)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op threads, Python {sys.version.split()[0]}")
    print(f"images: {args.count} + {args.count} PNG, {args.size} x {args.size}, batch {args.batch_size}, weights {weights.name}")
    print(f"fae evaluate fid:  {fae_median:8.2f} s (runs: {', '.join(f'{t:.2f}' for t in fae_times)})  FID {fae_value:.6f}")
    print(f"torch-fidelity:    {fidelity_median:8.2f} s (runs: {', '.join(f'{t:.2f}' for t in fidelity_times)})  FID {fidelity_value:.6f}")
    print(f"speed-up (torch-fidelity time / fae time): {fidelity_median / fae_median:.2f}x")
    print(f"FID relative difference: {abs(fae_value - fidelity_value) / abs(fidelity_value):.2e}")


if __name__ == "__main__":
    main()
