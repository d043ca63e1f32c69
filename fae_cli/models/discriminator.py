"""Patch discriminator for the pixel decoder's GAN loss (TiTok's NLayerDiscriminator layout).

Input: images N x 3 x H x W in the pixel decoder's [-1, 1] scale. Output: patch logits
N x 1 x G x G (G = `logit_grid`, 16 in TiTok). Layout: "same" conv 5x5 3 -> C, LeakyReLU 0.1;
`stages` stages of [conv 3x3, blur downsample x2, GroupNorm, LeakyReLU 0.1] with widths
C, 2C, 4C, ... (C -> C in the first stage, then doubling); adaptive max pool to G x G; conv 1x1,
LeakyReLU 0.1; conv 5x5 -> 1 logit per cell. TiTok uses C = 128 and 3 stages.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fae_cli.errors import FaeError

NEGATIVE_SLOPE = 0.1


class BlurDownsample(nn.Module):
    """Depthwise low-pass filter with the binomial 1-3-3-1 kernel, then stride 2.

    Zero padding of 1 on each side, so an even size H becomes H / 2 (odd sizes round up).
    """

    def __init__(self) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        kernel = taps[:, None] * taps[None, :]
        self.register_buffer("kernel", (kernel / kernel.sum())[None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        height, width = x.shape[-2:]
        # One extra row/column on the bottom/right for odd sizes keeps "same"-style rounding up.
        x = F.pad(x, (1, 1 + width % 2, 1, 1 + height % 2))
        weight = self.kernel.to(x.dtype).expand(channels, 1, 4, 4)
        return F.conv2d(x, weight, stride=2, groups=channels)


class PatchDiscriminator(nn.Module):
    """Convolutional patch discriminator; `config` returns the arguments that rebuild it."""

    def __init__(
        self,
        channels: int = 128,
        stages: int = 3,
        *,
        norm_groups: int = 32,
        logit_grid: int = 16,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        widths = [channels] + [channels * 2**stage for stage in range(stages)]
        for width in widths:
            if width % norm_groups != 0:
                raise FaeError(
                    f"discriminator width {width} is not divisible by its {norm_groups} GroupNorm groups: "
                    "use a channel count that is a multiple of the group count"
                )
        self._config: dict[str, Any] = {
            "channels": channels,
            "stages": stages,
            "norm_groups": norm_groups,
            "logit_grid": logit_grid,
            "in_channels": in_channels,
        }

        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, 5, padding=2),
            nn.LeakyReLU(NEGATIVE_SLOPE),
        )
        self.stages = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Conv2d(widths[index], widths[index + 1], 3, padding=1),
                    BlurDownsample(),
                    nn.GroupNorm(norm_groups, widths[index + 1]),
                    nn.LeakyReLU(NEGATIVE_SLOPE),
                )
                for index in range(stages)
            )
        )
        self.pool = nn.AdaptiveMaxPool2d(logit_grid)
        self.to_logits = nn.Sequential(
            nn.Conv2d(widths[-1], widths[-1], 1),
            nn.LeakyReLU(NEGATIVE_SLOPE),
            nn.Conv2d(widths[-1], 1, 5, padding=2),
        )

    @property
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-compatible) that rebuild this discriminator."""
        return dict(self._config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(images))
        return self.to_logits(self.pool(x))
