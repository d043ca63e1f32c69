"""Exponential moving average (EMA) of a model's weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fae_cli.training.checkpoint import unwrap_model


class EMA:
    """A frozen copy of a model whose parameters follow ema = decay * ema + (1 - decay) * param.

    The copy starts equal to the model (a decay-0 first update, as in DiT and SiT). Buffers
    (e.g. normalisation statistics) are copied, not averaged. Build it from the plain model
    before DDP or torch.compile wrap it; `update` accepts the wrapped model.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move every EMA parameter a fraction (1 - decay) of the way towards the model's."""
        source = unwrap_model(model)
        ema_params = list(self.module.parameters())
        params = [param.detach() for param in source.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("EMA and model have different parameter lists; build the EMA from this model")
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for ema_buffer, buffer in zip(self.module.buffers(), source.buffers()):
            ema_buffer.copy_(buffer)
