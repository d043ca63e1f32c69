"""Shared transformer layers: attention (torch SDPA), 2-D RoPE, RMSNorm, SwiGLU, embeddings."""

from fae_cli.nn.attention import Attention
from fae_cli.nn.embed import modulate, patchify, sincos_2d, timestep_embedding, unpatchify
from fae_cli.nn.mlp import Mlp, SwiGLU
from fae_cli.nn.norm import RMSNorm, make_norm
from fae_cli.nn.rope import Rope2d, apply_rope

__all__ = [
    "Attention",
    "Mlp",
    "RMSNorm",
    "Rope2d",
    "SwiGLU",
    "apply_rope",
    "make_norm",
    "modulate",
    "patchify",
    "sincos_2d",
    "timestep_embedding",
    "unpatchify",
]
