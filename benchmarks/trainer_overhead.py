"""Trainer step time against a bare forward/backward/AdamW loop on the same model and batch.

Both loops train the same FAE adapter on the same in-memory features. The bare loop does only
forward, backward, `optimizer.step()` and `zero_grad()`. The trainer also fetches batches by
index, seeds the RNG per micro-batch, clips, checks for non-finite values, updates the EMA,
logs and draws its progress bar. The timed span of the trainer runs from the fetch of the first
timed step to the fetch of the step after the last, so it covers whole loop iterations. The two
loops alternate `--repeats` times and the medians are compared.

Achieved FLOP/s come from `torch.utils.flop_counter` (matmuls and attention of one forward and
backward) divided by the bare step time, and are compared with the rate of a square fp32 matmul
measured on the same threads.

    python benchmarks/trainer_overhead.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fae_cli.models.fae import build_fae, kl_divergence
from fae_cli.recipe import AdapterConfig, OptimConfig
from fae_cli.training.ema import EMA
from fae_cli.training.trainer import Trainer, TrainTask

KL_WEIGHT = 1e-6


def vae_loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    x_hat, mean, logvar = model(x)
    return F.mse_loss(x_hat, x) + KL_WEIGHT * kl_divergence(mean, logvar)


class InMemoryTask(TrainTask):
    """The adapter's VAE loss on a feature tensor in memory; records when each batch is fetched."""

    kind = "benchmark"

    def __init__(self, model: torch.nn.Module, data: torch.Tensor) -> None:
        self.model = model
        self.data = data
        self.fetch_times: list[float] = []

    def __len__(self) -> int:
        return len(self.data)

    def fetch(self, indices: torch.Tensor) -> torch.Tensor:
        self.fetch_times.append(time.perf_counter())
        return self.data[indices]

    def loss(self, model, x, step):
        x_hat, mean, logvar = model(x)
        mse = F.mse_loss(x_hat, x)
        kl = kl_divergence(mean, logvar)
        return mse + KL_WEIGHT * kl, {"mse": mse, "kl": kl}


def build(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AdapterConfig(decoder_layers=args.decoder_layers, decoder_head_dim=64)
    return build_fae(config, args.width, (args.grid, args.grid))


def bare_step_seconds(args: argparse.Namespace, data: torch.Tensor) -> float:
    model = build(args).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = data[: args.batch]
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        vae_loss(model, x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / args.steps


def trainer_step_seconds(args: argparse.Namespace, data: torch.Tensor) -> float:
    task = InMemoryTask(build(args), data)
    optim = OptimConfig(
        steps=args.warmup + args.steps + 1,
        batch_size=args.batch,
        learning_rate=1e-4,
        warmup_steps=0,
        checkpoint_every=10**9,
        log_every=50,
    )
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(task, optim, run_dir, seed=0, identity={}, progress=True).fit()
    times = task.fetch_times
    return (times[args.warmup + args.steps] - times[args.warmup]) / args.steps


def extra_work_seconds(args: argparse.Namespace, data: torch.Tensor, repeats: int = 50) -> float:
    """Time the trainer's per-step work beyond forward/backward/AdamW, op by op in isolation.

    Short repeated ops are far less disturbed by other jobs on a shared CPU than whole steps,
    so this bounds the overhead when the step-time ratio is noisy. The ops mirror what
    `Trainer.train_step` adds: batch fetch by index, RNG seeding, gradient norm and clipping,
    the finite check, and the EMA update.
    """
    model = build(args).train()
    vae_loss(model, data[: args.batch]).backward()
    ema = EMA(model, 0.9999)
    params = [param for param in model.parameters() if param.requires_grad]
    indices = torch.randperm(len(data))[: args.batch]
    start = time.perf_counter()
    for step in range(repeats):
        data[indices]
        torch.manual_seed(step)
        norm = torch.nn.utils.get_total_norm([param.grad for param in params])
        torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm)
        bool(torch.isfinite(norm).item())
        ema.update(model)
    return (time.perf_counter() - start) / repeats


def step_flops(args: argparse.Namespace, data: torch.Tensor) -> int:
    model = build(args).train()
    counter = FlopCounterMode(display=False)
    with counter:
        vae_loss(model, data[: args.batch]).backward()
    return counter.get_total_flops()


def matmul_flops_per_second(size: int = 1024, repeats: int = 20) -> float:
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        rates.append(2 * size**3 / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256, help="Feature width D.")
    parser.add_argument("--grid", type=int, default=8, help="Token grid side (L = grid^2).")
    parser.add_argument("--decoder-layers", type=int, default=2, help="Feature decoder blocks.")
    parser.add_argument("--batch", type=int, default=32, help="Batch size (one micro-batch).")
    parser.add_argument("--steps", type=int, default=30, help="Timed steps per measurement.")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed steps before each measurement.")
    parser.add_argument("--repeats", type=int, default=3, help="Alternating bare/trainer measurements.")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    data = torch.randn(4 * args.batch, args.grid * args.grid, args.width, generator=torch.Generator().manual_seed(0))
    bare, trained = [], []
    for _ in range(args.repeats):
        bare.append(bare_step_seconds(args, data))
        trained.append(trainer_step_seconds(args, data))
    bare_s = statistics.median(bare)
    trainer_s = statistics.median(trained)
    flops = step_flops(args, data)
    extra_s = extra_work_seconds(args, data)
    peak = matmul_flops_per_second()

    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "threads": args.threads,
        "model": f"FAE attention encoder + {args.decoder_layers}-block decoder, D={args.width}, L={args.grid ** 2}",
        "parameters": sum(p.numel() for p in build(args).parameters()),
        "batch": args.batch,
        "bare_ms": round(bare_s * 1e3, 2),
        "trainer_ms": round(trainer_s * 1e3, 2),
        "bare_over_trainer": round(bare_s / trainer_s, 3),
        "extra_work_ms": round(extra_s * 1e3, 3),
        "bare_over_bare_plus_extra": round(bare_s / (bare_s + extra_s), 4),
        "step_gflop": round(flops / 1e9, 3),
        "achieved_gflops": round(flops / bare_s / 1e9, 2),
        "trainer_gflops": round(flops / trainer_s / 1e9, 2),
        "matmul_gflops": round(peak / 1e9, 2),
        "bare_ms_all": [round(value * 1e3, 2) for value in bare],
        "trainer_ms_all": [round(value * 1e3, 2) for value in trained],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
