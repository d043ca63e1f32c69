"""Speed of the diffusion generator: training step, achieved FLOP/s and sampling overhead.

Three comparisons, each against the cheapest loop that does the same arithmetic:

1. training step (time sampling, noise, interpolant, forward, MSE + cosine loss, backward,
   AdamW) against a bare loop of forward, MSE, backward and AdamW on fixed inputs;
   goal: bare / step >= 0.95.
2. FLOP/s of the bare loop (FLOPs counted by torch's FlopCounterMode) against the machine's
   dense matmul rate measured here; goal >= 50% on a GPU.
3. Euler sampling (with and without classifier-free guidance) against NFE x one forward of
   the same batch; goal: NFE x forward / sampling >= 0.95.

The EMA update and data loading belong to the shared trainer and are not part of the step here.

    python benchmarks/dit_step.py --threads 1              # CPU: LightningDiT-S/2, batch 2
    python benchmarks/dit_step.py --device cuda            # CUDA: LightningDiT-XL/1, batch 64, bf16
    python benchmarks/dit_step.py --device cuda --compile  # with torch.compile
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fae_cli.diffusion.samplers import Guidance, guidance_schedule, sample
from fae_cli.diffusion.transport import Transport
from fae_cli.models.dit import build_dit


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="compute device")
    parser.add_argument("--model", default=None, help="model name; default LightningDiT-XL/1 on CUDA, LightningDiT-S/2 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="training batch per step; default 64 on CUDA, 2 on CPU")
    parser.add_argument("--channels", type=int, default=32, help="latent channels")
    parser.add_argument("--size", type=int, default=16, help="latent grid side")
    parser.add_argument("--classes", type=int, default=1000, help="number of classes (plus the null class)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per measurement; default 20 on CUDA, 5 on CPU")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first; default 5 on CUDA, 2 on CPU")
    parser.add_argument("--sample-steps", type=int, default=None, help="Euler steps of the sampling test; default 50 on CUDA, 10 on CPU")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="autocast precision; default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch; default: torch's own choice")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(step: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """Return the median wall time (seconds) of one call of `step`."""
    return time_interleaved({"step": step}, device, iters, warmup)["step"]


def time_interleaved(steps: dict[str, Callable[[], object]], device: torch.device, iters: int, warmup: int) -> dict[str, float]:
    """Return the median wall time (seconds) of each step, timed in turns A B A B ...

    Taking turns keeps a slow drift of the machine (other jobs on a shared CPU, GPU clocks)
    from landing on one side of a comparison.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {key: [] for key in steps}
    for _ in range(iters):
        for key, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Return the dense matmul rate (FLOP/s) of square products on this device and dtype."""
    side = 8192 if device.type == "cuda" else 1024
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    seconds = time_loop(lambda: a @ b, device, iters=10, warmup=3)
    return 2 * side**3 / seconds


def main() -> None:
    args = parse_args()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    name = args.model or ("LightningDiT-XL/1" if on_cuda else "LightningDiT-S/2")
    batch = args.batch or (64 if on_cuda else 2)
    iters = args.iters or (20 if on_cuda else 5)
    warmup = args.warmup or (5 if on_cuda else 2)
    sample_steps = args.sample_steps or (50 if on_cuda else 10)
    precision = args.precision or ("bf16" if on_cuda else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        if precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    torch.manual_seed(0)
    model = build_dit(name, in_channels=args.channels, input_size=args.size, num_classes=args.classes).to(device)
    # Non-zero adaLN and output weights, so the timed arithmetic is that of a trained model.
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    network = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=on_cuda)
    transport = Transport(time_distribution="logit-normal", cos_weight=1.0)

    shape = (batch, args.channels, args.size, args.size)
    x = torch.randn(shape, device=device)
    y = torch.randint(0, args.classes, (batch,), device=device)
    t = torch.rand(batch, device=device)
    target = torch.randn(shape, device=device)

    def bare_step() -> None:
        with autocast():
            loss = F.mse_loss(network(x, t, y).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def training_step() -> None:
        with autocast():
            terms = transport.loss(network, x, y)
        terms.loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    train_times = time_interleaved({"bare": bare_step, "step": training_step}, device, iters, warmup)
    bare_seconds, step_seconds = train_times["bare"], train_times["step"]

    with FlopCounterMode(display=False) as counter:
        with autocast():
            loss = F.mse_loss(model(x, t, y).float(), target)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    peak = matmul_rate(device, dtype)

    # Sampling: one forward of the sampling batch, then Euler with and without guidance.
    model.eval()
    noise = torch.randn(shape, device=device)

    def velocity(latents, times, labels):
        with autocast():
            return network(latents, times, labels)

    guidance = Guidance(guidance_schedule(cfg_scale=1.5), null_class=model.null_class)
    doubled = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]))
    with torch.no_grad():
        sample_times = time_interleaved(
            {
                "forward": lambda: velocity(x, t, y),
                "forward_doubled": lambda: velocity(*doubled),
                "sample": lambda: sample(velocity, noise, y, steps=sample_steps),
                "sample_cfg": lambda: sample(velocity, noise, y, steps=sample_steps, guidance=guidance),
            },
            device,
            iters,
            1,
        )
    forward_seconds, forward_doubled_seconds = sample_times["forward"], sample_times["forward_doubled"]
    plain_seconds, guided_seconds = sample_times["sample"], sample_times["sample_cfg"]

    figures = {
        "device": torch.cuda.get_device_name(device) if on_cuda else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "latent": [args.channels, args.size, args.size],
        "batch": batch,
        "precision": precision,
        "compile": args.compile,
        "bare_step_ms": 1e3 * bare_seconds,
        "training_step_ms": 1e3 * step_seconds,
        "bare_over_step": bare_seconds / step_seconds,
        "flops_per_step": flops,
        "achieved_tflops": flops / bare_seconds / 1e12,
        "matmul_tflops": peak / 1e12,
        "achieved_over_matmul": flops / bare_seconds / peak,
        "forward_ms": 1e3 * forward_seconds,
        "sample_steps": sample_steps,
        "sample_ms": 1e3 * plain_seconds,
        "nfe_forward_over_sample": sample_steps * forward_seconds / plain_seconds,
        "forward_doubled_ms": 1e3 * forward_doubled_seconds,
        "sample_cfg_ms": 1e3 * guided_seconds,
        "nfe_forward_over_sample_cfg": sample_steps * forward_doubled_seconds / guided_seconds,
        "train_images_per_s": batch / step_seconds,
        "sample_images_per_s": batch / plain_seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else None,
    }
    width = max(len(key) for key in figures)
    for key, value in figures.items():
        formatted = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {formatted}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
