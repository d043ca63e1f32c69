"""Multi-head self-attention on torch's scaled_dot_product_attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fae_cli.nn.norm import make_norm
from fae_cli.nn.rope import Rope2d


class Attention(nn.Module):
    """Self-attention with a fused QKV projection, optional QK-norm, 2-D RoPE and causal mask.

    `inner_dim` (heads * head_dim) may differ from `dim`. With `out_proj=False` the output keeps
    the inner width (the FAE encoder adds its own skip projection instead).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int | None = None,
        *,
        qkv_bias: bool = True,
        out_proj: bool = True,
        out_bias: bool = True,
        qk_norm: str = "none",
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim or dim // heads
        inner = self.heads * self.head_dim
        self.inner_dim = inner
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.q_norm = make_norm(qk_norm, self.head_dim)
        self.k_norm = make_norm(qk_norm, self.head_dim)
        self.proj = nn.Linear(inner, dim, bias=out_bias) if out_proj else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Rope2d | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(batch, length, self.inner_dim))
