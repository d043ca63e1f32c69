"""Diffusion transformers on latents: SiT and LightningDiT.

Both are DiT-style transformers conditioned by adaLN-zero on c = time embedding + class
embedding. SiT (Ma et al. 2024) keeps DiT's block: LayerNorm without affine, a GELU (tanh) MLP
and a fixed 2-D sin-cos position table. LightningDiT (Yao et al. 2025) swaps in RMSNorm, a
SwiGLU MLP and 2-D RoPE in every attention layer (the sin-cos table is still added), with
optional QK-norm. Names follow "<family>-<size>/<patch>", e.g. "SiT-XL/1" or "LightningDiT-B/2".

The network takes fae's time t in [0, 1] (0 = data, 1 = noise) as a raw scalar fed to a 256-d
sinusoidal embedding, and returns the velocity v = noise - data of the linear interpolant
(`fae_cli.diffusion.transport`).

Parameter counts on a 16x16x32 latent (trainable; the sin-cos table adds 294,912 frozen
entries): LightningDiT-XL/1 674,961,824 and SiT-XL/1 674,853,152, i.e. 675M as in the FAE paper.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from fae_cli.errors import FaeError
from fae_cli.nn import (
    Attention,
    Mlp,
    Rope2d,
    SwiGLU,
    make_norm,
    modulate,
    patchify,
    sincos_2d,
    timestep_embedding,
    unpatchify,
)
from fae_cli.nn.mlp import swiglu_hidden

TIME_FREQUENCIES = 256  # width of the sinusoidal time embedding before its MLP (DiT, SiT)


@dataclass(frozen=True)
class DiTSize:
    """Depth, token width and attention heads of one model size."""

    depth: int
    width: int
    heads: int


# DiT/SiT sizes (Peebles & Xie 2023, table 1); "debug" is a tiny size for tests and CPU runs.
DIT_SIZES = {
    "debug": DiTSize(depth=2, width=64, heads=4),
    "S": DiTSize(depth=12, width=384, heads=6),
    "B": DiTSize(depth=12, width=768, heads=12),
    "L": DiTSize(depth=24, width=1024, heads=16),
    "XL": DiTSize(depth=28, width=1152, heads=16),
}
DIT_FAMILIES = ("SiT", "LightningDiT")
DIT_PATCHES = (1, 2)
_NAME = re.compile(r"^(?P<family>[A-Za-z]+)-(?P<size>[A-Za-z]+)/(?P<patch>\d+)$")


def dit_names() -> list[str]:
    """Return every valid model name, e.g. "SiT-S/1" ... "LightningDiT-XL/2"."""
    return [f"{family}-{size}/{patch}" for family in DIT_FAMILIES for size in DIT_SIZES for patch in DIT_PATCHES]


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, the null class, used for dropped labels.

    The null id is `num_classes`; negative labels (unlabelled images) also map to it. In train
    mode each label is replaced by the null id with probability `drop_prob`, one Bernoulli draw
    per sample. With `num_classes = 0` the model is unconditional and every label is null.
    """

    def __init__(self, num_classes: int, width: int, drop_prob: float) -> None:
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise FaeError(f"invalid label drop probability {drop_prob}: use a value in [0, 1]")
        self.num_classes = num_classes
        self.drop_prob = drop_prob
        self.table = nn.Embedding(num_classes + 1, width)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def drop_labels(self, y: torch.Tensor | None, batch: int, device: torch.device, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Return the labels the table reads: null where unlabelled, dropped or forced.

        `force_drop` (bool, one per sample) replaces the random mask, so guidance can ask for
        the unconditional output in eval mode.
        """
        if y is None or self.num_classes == 0:
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        y = y.to(device=device, dtype=torch.long)
        if force_drop is not None:
            drop = force_drop.to(device=device, dtype=torch.bool)
        elif self.training and self.drop_prob > 0:
            drop = torch.rand(y.shape[0], device=device) < self.drop_prob
        else:
            drop = torch.zeros_like(y, dtype=torch.bool)
        return torch.where(drop | (y < 0), torch.full_like(y, self.null_class), y)

    def forward(self, y: torch.Tensor | None, batch: int, device: torch.device, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        return self.table(self.drop_labels(y, batch, device, force_drop))


class TimestepEmbedder(nn.Module):
    """Scalar time t -> 256-d sinusoid -> Linear -> SiLU -> Linear (width)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQUENCIES, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        embedding = timestep_embedding(t, TIME_FREQUENCIES)
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-zero: shift, scale and gate for attention and MLP."""

    def __init__(self, width: int, heads: int, *, lightning: bool, qk_norm: bool, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        norm = "rmsnorm" if lightning else "layernorm"
        # SiT's LayerNorms carry no affine parameters because adaLN supplies scale and shift.
        self.norm1 = make_norm(norm, width, affine=lightning)
        self.attn = Attention(width, heads, qkv_bias=True, qk_norm=norm if qk_norm else "none")
        self.norm2 = make_norm(norm, width, affine=lightning)
        if lightning:
            self.mlp: nn.Module = SwiGLU(width, swiglu_hidden(width, mlp_ratio))
        else:
            self.mlp = Mlp(width, int(width * mlp_ratio), approximate="tanh")
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: Rope2d | None) -> torch.Tensor:
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = self.ada(c).chunk(6, dim=-1)
        x = x + gate_attn[:, None] * self.attn(modulate(self.norm1(x), shift_attn, scale_attn), rope)
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Norm, adaLN shift/scale, then a linear map from each token to its p*p*C output values."""

    def __init__(self, width: int, out_values: int, *, lightning: bool) -> None:
        super().__init__()
        self.norm = make_norm("rmsnorm" if lightning else "layernorm", width, affine=lightning)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_values)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional diffusion transformer on N x C x H x W latents, predicting velocity."""

    def __init__(
        self,
        *,
        in_channels: int,
        input_size: tuple[int, int],
        patch: int,
        size: DiTSize,
        lightning: bool,
        num_classes: int,
        label_drop: float = 0.1,
        qk_norm: bool = False,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        height, width = input_size
        if height % patch or width % patch:
            raise FaeError(f"latent grid {height}x{width} is not divisible by patch size {patch}: use patch 1")
        self.in_channels = in_channels
        self.input_size = (height, width)
        self.patch = patch
        self.num_classes = num_classes
        self.grid = (height // patch, width // patch)
        head_dim = size.width // size.heads

        self.patch_embed = nn.Linear(patch * patch * in_channels, size.width)
        # Fixed 2-D sin-cos table, added in both families (LightningDiT keeps it next to RoPE).
        self.register_buffer("pos_embed", sincos_2d(size.width, *self.grid)[None], persistent=False)
        self.rope = Rope2d(head_dim, *self.grid) if lightning else None
        self.time_embed = TimestepEmbedder(size.width)
        self.label_embed = LabelEmbedder(num_classes, size.width, label_drop)
        self.blocks = nn.ModuleList(
            DiTBlock(size.width, size.heads, lightning=lightning, qk_norm=qk_norm, mlp_ratio=mlp_ratio) for _ in range(size.depth)
        )
        self.final = FinalLayer(size.width, patch * patch * in_channels, lightning=lightning)
        self.reset_parameters()

    @property
    def null_class(self) -> int:
        """Label id of the unconditional (null) class, used by classifier-free guidance."""
        return self.label_embed.null_class

    def reset_parameters(self) -> None:
        """Initialise as DiT: xavier-uniform linears, N(0, 0.02) embeddings, zero adaLN and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.label_embed.table.weight, std=0.02)
        for layer in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)

        # adaLN-zero: every gate starts at 0, so each block is the identity at initialisation
        # and the network's output starts at exactly zero.
        for block in self.blocks:
            nn.init.zeros_(block.ada[1].weight)
            nn.init.zeros_(block.ada[1].bias)
        for layer in (self.final.ada[1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        force_drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the predicted velocity (N x C x H x W) at latents x (N x C x H x W), times t (N,).

        y contains class ids (N,). The null id `num_classes`, a negative id or y = None gives the
        unconditional output. In train mode labels are dropped with the label-drop probability;
        `force_drop` (bool, N) drops the chosen labels in any mode.
        """
        batch, channels, height, width = x.shape
        if (channels, height, width) != (self.in_channels, *self.input_size):
            raise ValueError(
                f"expected latents of shape N x {self.in_channels} x {self.input_size[0]} x {self.input_size[1]}, got {tuple(x.shape)}"
            )
        t = t.expand(batch) if t.dim() == 0 else t

        tokens = self.patch_embed(patchify(x, self.patch)) + self.pos_embed
        c = self.time_embed(t) + self.label_embed(y, batch, x.device, force_drop)
        for block in self.blocks:
            tokens = block(tokens, c, self.rope)
        return unpatchify(self.final(tokens, c), self.patch, height, width)


def parse_dit_name(name: str) -> tuple[str, str, int]:
    """Split "LightningDiT-XL/1" into (family, size, patch), raising FaeError on an unknown name."""
    match = _NAME.match(name)
    valid = ", ".join(f"{family}-{{{'|'.join(DIT_SIZES)}}}/{{1|2}}" for family in DIT_FAMILIES)
    if match is None or match["family"] not in DIT_FAMILIES or match["size"] not in DIT_SIZES or int(match["patch"]) not in DIT_PATCHES:
        raise FaeError(f"unknown diffusion model {name!r} (generator.model): use one of {valid}")
    return match["family"], match["size"], int(match["patch"])


def build_dit(
    name: str,
    *,
    in_channels: int,
    input_size: int | tuple[int, int],
    num_classes: int,
    label_drop: float = 0.1,
    qk_norm: bool = False,
    mlp_ratio: float = 4.0,
) -> DiT:
    """Build a SiT or LightningDiT by name for latents of `in_channels` x `input_size`.

    `input_size` is the latent grid (an int for a square grid). `num_classes` = 0 builds an
    unconditional model (its label table holds only the null class).
    """
    family, size, patch = parse_dit_name(name)
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    return DiT(
        in_channels=in_channels,
        input_size=input_size,
        patch=patch,
        size=DIT_SIZES[size],
        lightning=family == "LightningDiT",
        num_classes=num_classes,
        label_drop=label_drop,
        qk_norm=qk_norm,
        mlp_ratio=mlp_ratio,
    )
