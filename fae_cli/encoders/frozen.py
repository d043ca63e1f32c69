"""FrozenEncoder: images in [0, 1] to patch tokens, with the encoder's own resize and normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fae_cli.encoders.registry import EncoderSpec
from fae_cli.encoders.weights import hash_state_dict


class FrozenEncoder(nn.Module):
    """A pretrained encoder with frozen parameters that returns float32 tokens N x L x D.

    `backbone` maps normalised images N x 3 x S x S (S = `input_size`) to tokens N x L x D,
    L = rows * cols in row-major order. The parameters never train and the module stays in
    eval mode even inside a parent that calls `.train()`, but the forward is differentiable with
    respect to the images, so a pixel decoder can use it as a perceptual network.
    """

    def __init__(
        self,
        spec: EncoderSpec,
        backbone: nn.Module,
        *,
        input_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        interpolation: str,
        weights_source: str,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.width = spec.width
        self.input_size = input_size
        self.grid = spec.grid_at(input_size)
        self.mean = tuple(float(value) for value in mean)
        self.std = tuple(float(value) for value in std)
        self.interpolation = interpolation
        self.weights_source = weights_source
        self.backbone = backbone
        self.register_buffer("mean_tensor", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std_tensor", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self._weights_hash: str | None = None

        self.requires_grad_(False)
        self.eval()

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def weights_hash(self) -> str:
        """First 16 hex digits of sha256 over the backbone's weights (computed once, on first use)."""
        if self._weights_hash is None:
            self._weights_hash = hash_state_dict(self.backbone)
        return self._weights_hash

    def train(self, mode: bool = True) -> FrozenEncoder:
        # Batch-norm statistics and dropout must stay as pretrained whatever the parent does.
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize images in [0, 1] to the input size and normalise them with the model's constants."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images N x 3 x H x W, got shape {tuple(images.shape)}")
        x = images.float()
        size = (self.input_size, self.input_size)
        if tuple(x.shape[-2:]) != size:
            # Antialiasing matches the PIL resize that timm's own preprocessing uses for downscaling.
            antialias = self.interpolation in ("bilinear", "bicubic")
            x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=antialias)
            # Bicubic overshoots; 8-bit images resized by PIL cannot leave [0, 1] either.
            x = x.clamp(0.0, 1.0)
        return (x - self.mean_tensor) / self.std_tensor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(self.preprocess(images))
        return tokens.float()

    def extra_repr(self) -> str:
        return f"name={self.name}, input_size={self.input_size}, grid={self.grid}, width={self.width}"
