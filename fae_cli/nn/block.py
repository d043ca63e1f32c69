"""Pre-norm transformer block: attention and a SwiGLU feed-forward, each on a residual branch."""

from __future__ import annotations

import torch
from torch import nn

from fae_cli.nn.attention import Attention
from fae_cli.nn.mlp import SwiGLU, swiglu_hidden
from fae_cli.nn.norm import make_norm
from fae_cli.nn.rope import Rope2d


class Block(nn.Module):
    """x + attn(norm(x)), then x + swiglu(norm(x)), as in LightningDiT without adaLN.

    The SwiGLU hidden width is `swiglu_hidden(dim, mlp_ratio)`, so its parameter count equals a
    GELU MLP of ratio `mlp_ratio`.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0, norm: str = "rmsnorm") -> None:
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, heads, head_dim)
        self.norm2 = make_norm(norm, dim)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio))

    def forward(self, x: torch.Tensor, rope: Rope2d | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))
