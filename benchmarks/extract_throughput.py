"""Benchmark `fae extract`: throughput against a bare encoder forward, and peak memory versus dataset size.

1. Throughput. The same images go through (a) the stage function `fae_cli.stages.extract.run`
   (decoding, ADM crop, DataLoader, encoder, shard writes) and (b) a bare loop of encoder
   forwards over the same batches, already decoded and in memory. The stage's rate is read
   from its manifest (images / seconds of its encoding loop, model build excluded). Each side
   runs `--repeats` times, interleaved, after one warm-up batch; the best run of each side
   counts. Goal: stage >= 0.9x bare.
2. Peak memory. The stage runs in a fresh process for each dataset size. The peak resident set
   size (ru_maxrss of that child) should not grow with the number of images, because the stage
   keeps only one shard in memory at a time. A child that only imports, opens the dataset and
   builds the encoder gives the baseline.

Example (the figures in docs/benchmarks.md):
    python benchmarks/extract_throughput.py --threads 1 --images 256 --sizes 500 2000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fae_cli.data.datasets import open_images
from fae_cli.encoders import build_encoder
from fae_cli.recipe import Recipe, load_recipe
from fae_cli.stages import extract


def make_recipe(args: argparse.Namespace, count: int, out_dir: Path) -> Recipe:
    return load_recipe(
        None,
        [
            f"data.source={args.data!r}",
            f"data.image_size={args.image_size}",
            f"data.limit={count}",
            f"encoder.name={args.encoder!r}",
            f"encoder.input_size={args.input_size}",
            f"extract.batch_size={args.batch_size}",
            f"extract.workers={args.workers}",
            f"extract.shard_size={args.shard_size}",
            "run.device='cpu'",
            f"run.out_dir={str(out_dir)!r}",
        ],
    )


def encoded_batches(args: argparse.Namespace, recipe: Recipe) -> list[torch.Tensor]:
    """Return the stage's batches, decoded and cropped, as uint8 tensors in memory."""
    dataset = open_images(recipe.data)
    batches = []
    for start in range(0, len(dataset), args.batch_size):
        stop = min(start + args.batch_size, len(dataset))
        batches.append(torch.stack([dataset[i][0] for i in range(start, stop)]))
    return batches


def bare_rate(encoder: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Return images/s of encoder forwards alone over batches held in memory."""
    started = time.perf_counter()
    with torch.inference_mode():
        for images in batches:
            encoder(images.float().div(255))
    return sum(len(images) for images in batches) / (time.perf_counter() - started)


def stage_rate(recipe: Recipe, out: Path) -> float:
    """Return images/s of the extract stage's encoding loop as its manifest records it."""
    extract.run(recipe, out=out)
    throughput = json.loads((out / "manifest.json").read_text())["throughput"]
    return throughput["images"] / throughput["seconds"]


def peak_rss_mib(args: argparse.Namespace, count: int, folder: Path) -> float:
    """Run the stage over `count` images in a fresh process; return that process's peak RSS in MiB."""
    code = (
        "import sys; from benchmarks.extract_throughput import main_child; main_child(sys.argv[1:])"
    )
    command = [sys.executable, "-c", code, json.dumps(vars(args)), str(count), str(folder / f"rss-{count}")]
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1])
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"the stage run over {count} images failed (wait status {status})")
    # Linux reports ru_maxrss in KiB.
    return usage.ru_maxrss / 1024


def main_child(argv: list[str]) -> None:
    """Run the stage over `argv[1]` images; with 0, only open the dataset and build the encoder."""
    args = argparse.Namespace(**json.loads(argv[0]))
    torch.set_num_threads(args.threads)
    count = int(argv[1])
    folder = Path(argv[2])
    recipe = make_recipe(args, max(count, 1), folder)
    if count == 0:
        open_images(recipe.data)
        build_encoder(recipe.encoder.name, input_size=recipe.encoder.input_size)
        return
    extract.run(recipe, out=folder / "cache")


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo (Linux), else the machine type."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist", help="data.source of the benchmark.")
    parser.add_argument("--encoder", default="efficientnet-lite0", help="Encoder registry name.")
    parser.add_argument("--image-size", type=int, default=128, help="data.image_size in pixels.")
    parser.add_argument("--input-size", type=int, default=128, help="encoder.input_size in pixels.")
    parser.add_argument("--batch-size", type=int, default=64, help="Images per encoder forward.")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the stage.")
    parser.add_argument("--shard-size", type=int, default=128, help="Images per shard.")
    parser.add_argument("--images", type=int, default=256, help="Images in the throughput comparison.")
    parser.add_argument("--sizes", type=int, nargs=2, default=(500, 2000), help="Two dataset sizes for the peak-memory runs.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per side, interleaved; the best counts.")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="fae-bench-") as temporary:
        folder = Path(temporary)
        recipe = make_recipe(args, args.images, folder)
        batches = encoded_batches(args, recipe)
        encoder = build_encoder(recipe.encoder.name, input_size=recipe.encoder.input_size)
        with torch.inference_mode():
            encoder(batches[0].float().div(255))

        # Interleaved, so that both sides see the same share of a machine that others load too.
        pairs = [(bare_rate(encoder, batches), stage_rate(recipe, folder / f"stage-{repeat}")) for repeat in range(args.repeats)]
        bare = max(pair[0] for pair in pairs)
        stage = max(pair[1] for pair in pairs)
        baseline = peak_rss_mib(args, 0, folder)
        memory = {count: peak_rss_mib(args, count, folder) for count in args.sizes}

    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads")
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{value:.1f}' for value in os.getloadavg())}")
    print(f"settings: {args.encoder} at {args.input_size} px, images {args.image_size} px, batch {args.batch_size}, workers {args.workers}")
    for repeat, (bare_run, stage_run) in enumerate(pairs):
        print(f"run {repeat}: bare forward {bare_run:.1f} images/s, fae extract {stage_run:.1f} images/s, ratio {stage_run / bare_run:.3f}")
    print(f"throughput over {args.images} images, best run of each: bare forward {bare:.1f} images/s, fae extract {stage:.1f} images/s, ratio {stage / bare:.3f}")
    print(f"peak RSS, imports + dataset + encoder only: {baseline:.0f} MiB")
    for count, mib in memory.items():
        print(f"peak RSS, {count} images (shards of {args.shard_size}): {mib:.0f} MiB")


if __name__ == "__main__":
    main()
