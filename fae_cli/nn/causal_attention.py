"""Causal self-attention with a key/value cache for token-by-token decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fae_cli.nn.attention import Attention
from fae_cli.nn.rope import apply_rope


class KVCache:
    """Keys and values of the tokens one attention layer has processed so far.

    Storage for `max_length` tokens is allocated on the first append, so decoding T tokens
    writes each key once instead of concatenating the whole cache T times.
    """

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.length = 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys and values (B, heads, l, head_dim) and return all stored so far."""
        batch, heads, length, head_dim = keys.shape
        if self.keys is None or self.values is None:
            shape = (batch, heads, self.max_length, head_dim)
            self.keys = keys.new_zeros(shape)
            self.values = values.new_zeros(shape)

        end = self.length + length
        if end > self.max_length:
            raise ValueError(f"KV cache of {self.max_length} tokens cannot take {end}")
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class CausalSelfAttention(Attention):
    """Causal attention whose RoPE angles come per call, with an optional `KVCache`.

    `cos` and `sin` (l, head_dim) hold the rotary tables of the l tokens in `x`, so a caller
    decoding one token at a time passes that token's row. With a cache, the keys of earlier
    calls are stored already rotated and each query attends to every cached key before it.
    """

    def __init__(self, dim: int, heads: int, head_dim: int | None = None, *, qkv_bias: bool = True, qk_norm: str = "none") -> None:
        super().__init__(dim, heads, head_dim, qkv_bias=qkv_bias, qk_norm=qk_norm, causal=True)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None and sin is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)

        # The l new queries sit at the end of the key sequence, so query i may see keys up to
        # index (keys - l + i); a single query sees every key and needs no mask.
        keys = k.shape[2]
        if keys == length:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif length == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            mask = torch.ones(length, keys, dtype=torch.bool, device=x.device).tril(diagonal=keys - length)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, self.inner_dim))
