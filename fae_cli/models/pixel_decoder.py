"""ViT pixel decoder: a grid of encoder feature tokens -> an RGB image.

Each of the grid's tokens decodes one p x p RGB patch, p = image size / grid size (16 for
DINOv2-g's 16 x 16 grid at 256 px). Layout: optional LayerNorm (no affine) on the input
features, linear projection D -> width, learned positional embedding (initialised with 2-D
sin-cos), pre-norm blocks (`fae_cli.nn.block.Block`: attention and SwiGLU), final norm, linear
width -> p*p*3, unpatchify.

Size "L" is the decoder of FAE (Gao et al., arXiv 2512.07829): 24 layers, width 1024,
16 heads, MLP ratio 4, 305.36M parameters. On a 16 x 16 x 1536 grid at 256 px this layout has 304.92M: the
blocks hold 302.29M, and the input projection, positional table, final norm and output head add
2.63M. FAE does not list its other parameters, so 0.44M (0.14%) stays unexplained.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fae_cli.errors import FaeError
from fae_cli.nn import make_norm, sincos_2d, unpatchify
from fae_cli.nn.block import Block
from fae_cli.recipe import DecoderConfig

# (layers, width, heads) of the standard ViT sizes; the MLP ratio is a separate argument.
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
}


class PixelDecoder(nn.Module):
    """ViT decoder from feature tokens (N x L x D, row-major grid) to images N x 3 x H x W.

    `size` picks S, B or L; `layers`, `width` and `heads` replace single values of that size,
    and size "custom" needs all three. The output is in the [-1, 1] image scale but unbounded,
    so callers clamp before saving. `config` returns the keyword arguments that rebuild the
    decoder (see `from_config`).
    """

    def __init__(
        self,
        feature_width: int,
        grid: int | tuple[int, int],
        image_size: int | tuple[int, int],
        size: str = "L",
        *,
        layers: int | None = None,
        width: int | None = None,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        norm: str = "layernorm",
        input_norm: bool = True,
    ) -> None:
        super().__init__()
        rows, cols = (grid, grid) if isinstance(grid, int) else tuple(grid)
        height, image_width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        layers, width, heads = _resolve_size(size, layers, width, heads)
        patch = _patch_size((rows, cols), (height, image_width))

        self.feature_width = feature_width
        self.grid = (rows, cols)
        self.image_size = (height, image_width)
        self.patch = patch
        self._config: dict[str, Any] = {
            "feature_width": feature_width,
            "grid": [rows, cols],
            "image_size": [height, image_width],
            "size": size,
            "layers": layers,
            "width": width,
            "heads": heads,
            "mlp_ratio": mlp_ratio,
            "norm": norm,
            "input_norm": input_norm,
        }

        # A LayerNorm without affine makes the decoder indifferent to the encoder's feature
        # scale. FAE does not specify an input normalisation, so this is fae's choice.
        self.input_norm = make_norm("layernorm" if input_norm else "none", feature_width, affine=False)
        self.input_proj = nn.Linear(feature_width, width)
        self.pos_embed = nn.Parameter(sincos_2d(width, rows, cols)[None])
        self.blocks = nn.ModuleList(Block(width, heads, width // heads, mlp_ratio, norm) for _ in range(layers))
        self.norm = make_norm(norm, width)
        self.head = nn.Linear(width, patch * patch * 3)
        self.apply(_init_linear)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-compatible) that rebuild this decoder."""
        return dict(self._config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PixelDecoder:
        """Rebuild a decoder from `config` as stored in checkpoint metadata."""
        arguments = dict(config)
        arguments["grid"] = tuple(arguments["grid"])
        arguments["image_size"] = tuple(arguments["image_size"])
        return cls(**arguments)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, length, dim = features.shape
        rows, cols = self.grid
        if length != rows * cols or dim != self.feature_width:
            raise ValueError(
                f"pixel decoder expects features N x {rows * cols} x {self.feature_width} "
                f"(grid {rows}x{cols}), got {tuple(features.shape)}"
            )

        x = self.input_proj(self.input_norm(features)) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        patches = self.head(self.norm(x))
        return unpatchify(patches, self.patch, *self.image_size)


def build_pixel_decoder(
    config: DecoderConfig,
    feature_width: int,
    grid: int | tuple[int, int],
    image_size: int | tuple[int, int],
) -> PixelDecoder:
    """Build the pixel decoder that the recipe's [decoder] section describes."""
    custom = config.size == "custom"
    return PixelDecoder(
        feature_width,
        grid,
        image_size,
        config.size,
        layers=config.layers if custom else None,
        width=config.width if custom else None,
        heads=config.heads if custom else None,
        mlp_ratio=config.mlp_ratio,
        input_norm=config.input_norm,
    )


def _resolve_size(size: str, layers: int | None, width: int | None, heads: int | None) -> tuple[int, int, int]:
    if size == "custom":
        if layers is None or width is None or heads is None:
            raise FaeError("pixel decoder size 'custom' needs layers, width and heads")
        base = (layers, width, heads)
    elif size in SIZES:
        base = SIZES[size]
    else:
        raise FaeError(f"unknown pixel decoder size {size!r}: use one of {', '.join(SIZES)} or 'custom'")

    layers = base[0] if layers is None else layers
    width = base[1] if width is None else width
    heads = base[2] if heads is None else heads
    if width % heads != 0:
        raise FaeError(f"pixel decoder width {width} is not divisible by its {heads} heads: change width or heads")
    if width % 4 != 0:
        raise FaeError(f"pixel decoder width {width} must be a multiple of 4 for its 2-D sin-cos position table")
    return layers, width, heads


def _patch_size(grid: tuple[int, int], image_size: tuple[int, int]) -> int:
    """Return p such that each token decodes a p x p patch; both axes must agree."""
    (rows, cols), (height, width) = grid, image_size
    if height % rows != 0 or width % cols != 0 or height // rows != width // cols:
        nearest = max(1, round(height / rows)) * rows
        raise FaeError(
            f"invalid data.image_size {height}x{width}: each of the {rows}x{cols} feature tokens decodes one square "
            f"patch, so the size must be a multiple of {rows}, e.g. {nearest}"
        )
    return height // rows


def _init_linear(module: nn.Module) -> None:
    # Xavier-uniform weights and zero biases for every linear layer.
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
