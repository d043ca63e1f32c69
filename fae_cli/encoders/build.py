"""build_encoder: a registry name to a ready FrozenEncoder."""

from __future__ import annotations

from pathlib import Path

import torch

from fae_cli.encoders.efficientnet import build_efficientnet
from fae_cli.encoders.frozen import FrozenEncoder
from fae_cli.encoders.registry import encoder_spec
from fae_cli.encoders.vit import build_vit

BUILDERS = {"vit": build_vit, "efficientnet": build_efficientnet}


def build_encoder(
    name: str,
    *,
    weights: str | Path | None = None,
    input_size: int | None = None,
    pretrained: bool = True,
    device: torch.device | str = "cpu",
) -> FrozenEncoder:
    """Build registry entry `name` with frozen parameters on `device`.

    weights: a local safetensors or .pth file (read with weights_only=True); it takes priority
    over the default source (hub or offline package). pretrained=False gives seeded random
    weights for tests. input_size: square input in pixels, default the registry entry's.
    """
    spec = encoder_spec(name)
    size = input_size if input_size is not None else spec.input_size
    weights = Path(weights) if weights is not None else None

    backbone, source, cfg = BUILDERS[spec.family](spec, weights=weights, input_size=size, pretrained=pretrained)
    encoder = FrozenEncoder(
        spec,
        backbone,
        input_size=size,
        mean=cfg["mean"],
        std=cfg["std"],
        interpolation=cfg["interpolation"],
        weights_source=source,
    )
    return encoder.to(device)
