"""AdamW with weight-decay groups, and the learning-rate schedule of an `OptimConfig`."""

from __future__ import annotations

import math

import torch
from torch import nn

from fae_cli.recipe import OptimConfig


def build_adamw(model: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, biases and norm weights (1-D) do not.

    The fused CUDA kernel is used on GPUs. The LR is set per step by `lr_at`, so the value
    given here is only the starting point.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    return torch.optim.AdamW(
        groups,
        lr=optim.learning_rate,
        betas=tuple(optim.betas),
        fused=device.type == "cuda",
    )


def lr_factor(step: int, optim: OptimConfig) -> float:
    """Return the LR of optimiser update `step` (0-based) as a fraction of the peak LR.

    Warm-up rises linearly, reaching 1/warmup at the first update and 1 at update warmup - 1.
    After it, `constant` stays at 1 and `cosine` falls from 1 to `min_lr_ratio` at update `steps`.
    """
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    decay_steps = max(1, optim.steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine


def lr_at(step: int, optim: OptimConfig) -> float:
    """Return the learning rate of optimiser update `step` (0-based)."""
    return optim.learning_rate * lr_factor(step, optim)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
