"""FAE adapter: a one-attention-layer encoder (features -> latent) and a feature decoder.

Shapes: encoder features x are N x L x D token sequences (L = rows * cols, row-major), the
latent z is N x L x C (C = `latent_channels`), the reconstruction x_hat is N x L x D again.

Encoder (`kind = "attention"`, the paper's design): input norm, one self-attention layer with a
fused QKV projection D -> 3 * heads * head_dim and no output projection, plus a skip projection
D -> heads * head_dim added to the attention output, an activation, and a linear projection to
2C (mean and log-variance). At D = 1536, 24 heads x 256 and C = 32 this is 38.17M parameters,
the figure of Gao et al., "One Layer Is Enough" (arXiv 2512.07829). Ablation variants:
`linear` (input norm and one linear projection per token) and `transformer` (`layers` blocks of
the feature-decoder design, then a norm and the projection to 2C).

Feature decoder: linear C -> D, then pre-norm blocks with 2-D RoPE, RMSNorm and SwiGLU
(head width `decoder_head_dim`), and no output projection because the blocks already work at
the feature width. At D = 1536 with 6 blocks this is 170.03M parameters. The paper reports
170.43M; the 0.39M difference equals one 16 x 16 x 1536 position table, which fae leaves out
because RoPE already encodes positions.
"""

from __future__ import annotations

import torch
from torch import nn

from fae_cli.errors import FaeError
from fae_cli.nn.attention import Attention
from fae_cli.nn.block import Block
from fae_cli.nn.embed import sincos_2d
from fae_cli.nn.norm import RMSNorm, make_norm
from fae_cli.nn.rope import Rope2d
from fae_cli.recipe import AdapterConfig

# Log-variance bounds of the posterior: exp(20 / 2) and exp(-30 / 2) keep the standard deviation
# finite in float32 and bf16, as in the latent-diffusion autoencoders' diagonal Gaussian.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


# ----------------------------------------------------------------------------------------------
# Sizes derived from the feature width


def encoder_heads(config: AdapterConfig, width: int) -> int:
    """Encoder attention heads: the recipe's value, else feature width / 64 (at least 1)."""
    if config.heads is not None:
        return config.heads
    return max(1, width // 64)


def encoder_head_dim(config: AdapterConfig, width: int) -> int:
    """Encoder head width: the recipe's value, else 4 * width / heads rounded down to a multiple of 4.

    The rounding keeps the default usable with 2-D RoPE, which rotates channel pairs per axis.
    """
    if config.head_dim is not None:
        return config.head_dim
    return max(4, (4 * width // encoder_heads(config, width)) // 4 * 4)


def decoder_heads(width: int, head_dim: int) -> int:
    """Heads of a block at `width` with heads of `head_dim` channels: the nearest whole number, at least 1."""
    return max(1, round(width / head_dim))


def _activation(name: str) -> nn.Module:
    modules = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU, "none": nn.Identity}
    return modules[name]()


def _check_rope(head_dim: int, key: str) -> None:
    if head_dim % 4 != 0:
        raise FaeError(f"invalid {key} = {head_dim}: 2-D RoPE needs a head width divisible by 4; change it or set adapter.pos_embed")


def _encoder_rope(config: AdapterConfig, head_dim: int, grid: tuple[int, int], key: str) -> Rope2d | None:
    """Build the encoder's RoPE tables when `pos_embed = "rope"`, else return None.

    `key` names the recipe field of the head width, for the error message.
    """
    if config.pos_embed != "rope":
        return None
    _check_rope(head_dim, key)
    return Rope2d(head_dim, *grid)


class _InputEmbedding(nn.Module):
    """Input norm, then the fixed 2-D sin-cos table when `pos_embed = "sincos"`."""

    def __init__(self, config: AdapterConfig, width: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.norm = make_norm(config.input_norm, width)
        if config.pos_embed == "sincos":
            if width % 4 != 0:
                raise FaeError(f"adapter.pos_embed = 'sincos' needs a feature width divisible by 4, got {width}; use 'rope' or 'none'")
            self.register_buffer("pos", sincos_2d(width, *grid), persistent=False)
        else:
            self.pos = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return x if self.pos is None else x + self.pos.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Encoders: features N x L x D -> moments N x L x 2C


class AttentionEncoder(nn.Module):
    """One self-attention layer plus a skip projection, an activation and a linear head."""

    def __init__(self, config: AdapterConfig, width: int, grid: tuple[int, int]) -> None:
        super().__init__()
        heads = encoder_heads(config, width)
        head_dim = encoder_head_dim(config, width)
        inner = heads * head_dim
        self.embed = _InputEmbedding(config, width, grid)
        self.attn = Attention(width, heads, head_dim, out_proj=False)
        self.skip = nn.Linear(width, inner)
        self.act = _activation(config.activation)
        self.head = nn.Linear(inner, 2 * config.latent_channels)
        self.rope = _encoder_rope(config, head_dim, grid, "adapter.head_dim")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = self.act(self.attn(h, self.rope) + self.skip(h))
        return self.head(h)


class LinearEncoder(nn.Module):
    """Input norm and one linear projection per token: the ablation without token mixing."""

    def __init__(self, config: AdapterConfig, width: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.embed = _InputEmbedding(config, width, grid)
        self.head = nn.Linear(width, 2 * config.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class TransformerEncoder(nn.Module):
    """`layers` feature-decoder blocks at the feature width, then RMSNorm and a linear head."""

    def __init__(self, config: AdapterConfig, width: int, grid: tuple[int, int]) -> None:
        super().__init__()
        head_dim = config.decoder_head_dim
        heads = decoder_heads(width, head_dim)
        self.embed = _InputEmbedding(config, width, grid)
        self.blocks = nn.ModuleList(Block(width, heads, head_dim, config.decoder_mlp_ratio) for _ in range(config.layers))
        self.norm = RMSNorm(width)
        self.head = nn.Linear(width, 2 * config.latent_channels)
        self.rope = _encoder_rope(config, head_dim, grid, "adapter.decoder_head_dim")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, self.rope)
        return self.head(self.norm(h))


ENCODERS: dict[str, type[nn.Module]] = {
    "attention": AttentionEncoder,
    "linear": LinearEncoder,
    "transformer": TransformerEncoder,
}


# ----------------------------------------------------------------------------------------------
# Feature decoder: latent N x L x C -> features N x L x D


class FeatureDecoder(nn.Module):
    """Linear C -> D, then `decoder_layers` blocks with 2-D RoPE; the output is the last residual stream."""

    def __init__(self, config: AdapterConfig, width: int, grid: tuple[int, int]) -> None:
        super().__init__()
        head_dim = config.decoder_head_dim
        _check_rope(head_dim, "adapter.decoder_head_dim")
        heads = decoder_heads(width, head_dim)
        self.proj_in = nn.Linear(config.latent_channels, width)
        self.blocks = nn.ModuleList(Block(width, heads, head_dim, config.decoder_mlp_ratio) for _ in range(config.decoder_layers))
        self.rope = Rope2d(head_dim, *grid)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(z)
        for block in self.blocks:
            h = block(h, self.rope)
        return h


# ----------------------------------------------------------------------------------------------
# The VAE wrapper


class FAE(nn.Module):
    """Encoder and feature decoder as a VAE with a diagonal Gaussian posterior per latent element."""

    def __init__(self, config: AdapterConfig, width: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.config = config
        self.width = int(width)
        self.grid = (int(grid[0]), int(grid[1]))
        self.latent_channels = config.latent_channels
        self.encoder = ENCODERS[config.kind](config, self.width, self.grid)
        self.decoder = FeatureDecoder(config, self.width, self.grid)

    def _check_tokens(self, x: torch.Tensor, channels: int, what: str) -> None:
        length = self.grid[0] * self.grid[1]
        if x.dim() != 3 or x.shape[1] != length or x.shape[2] != channels:
            raise ValueError(f"FAE expects {what} of shape N x {length} x {channels} (grid {self.grid}), got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the posterior mean and log-variance, each N x L x C, of features x (N x L x D)."""
        self._check_tokens(x, self.width, "features")
        mean, logvar = self.encoder(x).chunk(2, dim=-1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Return reconstructed features N x L x D of latents z (N x L x C)."""
        self._check_tokens(z, self.latent_channels, "latents")
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (x_hat, mean, logvar); z is a posterior sample in training mode, the mean in eval mode.

        Sampling draws from torch's global RNG, which the trainer seeds for every micro-batch.
        """
        mean, logvar = self.encode(x)
        if sample is None:
            sample = self.training
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
        return self.decode(z), mean, logvar


def build_fae(config: AdapterConfig, width: int, grid: tuple[int, int]) -> FAE:
    """Build the adapter for features of `width` channels on a `grid` of (rows, cols) tokens."""
    return FAE(config, width, grid)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Return KL(N(mean, exp(logvar)) || N(0, 1)) averaged over every latent element."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def cosine_similarity(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return the cosine similarity between x_hat and x along the channel axis, per token (N x L)."""
    return torch.nn.functional.cosine_similarity(x_hat.float(), x.float(), dim=-1, eps=1e-8)
