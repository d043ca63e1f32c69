"""Feed-forward blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """SwiGLU: one fused input projection split into (a, b), then out(silu(a) * b)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc_in = nn.Linear(dim, 2 * hidden, bias=bias)
        self.fc_out = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc_in(x).chunk(2, dim=-1)
        return self.fc_out(F.silu(a) * b)


class Mlp(nn.Module):
    """Two-layer MLP with GELU (tanh approximation optional)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True, approximate: str = "none") -> None:
        super().__init__()
        self.fc_in = nn.Linear(dim, hidden, bias=bias)
        self.fc_out = nn.Linear(hidden, dim, bias=bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate=self.approximate))


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """Hidden width of a SwiGLU with the parameter budget of a GELU MLP: int(2/3 * ratio * dim)."""
    return int(2 / 3 * mlp_ratio * dim)
