"""2-D rotary position embedding (EVA-02 / LightningDiT layout).

For a head of width d, the first d/2 channels rotate with the token's row index and the last
d/2 with its column index. Inside each half, channels (2k, 2k+1) form a rotation pair with
frequency theta^(-2k / (d/2)).
"""

from __future__ import annotations

import torch
from torch import nn


def _axis_angles(half_dim: int, positions: torch.Tensor, theta: float) -> torch.Tensor:
    freqs = theta ** (-torch.arange(0, half_dim, 2, dtype=torch.float64) / half_dim)
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    return angles.repeat_interleave(2, dim=-1)  # each frequency drives one channel pair


class Rope2d(nn.Module):
    """Cos/sin tables for a grid of height x width tokens in row-major order."""

    def __init__(self, head_dim: int, height: int, width: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 4 != 0:
            raise ValueError(f"2-D RoPE needs a head width divisible by 4, got {head_dim}")
        rows = torch.arange(height).repeat_interleave(width)
        cols = torch.arange(width).repeat(height)
        half = head_dim // 2
        angles = torch.cat([_axis_angles(half, rows, theta), _axis_angles(half, cols, theta)], dim=-1)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x of shape (..., L, head_dim)."""
        return apply_rope(x, self.cos, self.sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (..., L, d) by the angles behind cos/sin (L, d)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).to(x.dtype)
