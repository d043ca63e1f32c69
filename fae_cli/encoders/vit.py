"""timm Vision Transformers (DINOv2 with and without registers, SigLIP2) as token backbones."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fae_cli.encoders.registry import EncoderSpec
from fae_cli.encoders.weights import describe_load_error, read_state_dict, strip_prefix
from fae_cli.errors import FaeError

# open_clip keeps the timm image tower under this prefix next to its text tower.
OPEN_CLIP_TRUNK = "visual.trunk."


class VitTokens(nn.Module):
    """Patch tokens after the final norm; prefix tokens (class, registers) dropped by the model's own count."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)[:, self.model.num_prefix_tokens :]


def build_vit(spec: EncoderSpec, *, weights: Path | None, input_size: int, pretrained: bool) -> tuple[VitTokens, str, dict]:
    """Create the timm model at `input_size`: from a file, the hub, or seeded random weights.

    timm resamples the position embedding of loaded weights to the new grid (bicubic), so any
    multiple of the patch size works. Returns (backbone, weights source, pretrained config).

    NOTE: timm resamples with antialiasing, while Meta's DINOv2 code interpolates without it,
    so DINOv2 tokens at 224 are close to, not bit-identical with, the official model's.
    """
    import timm

    spec.grid_at(input_size)  # raises unless the stride divides the input size
    options = {"num_classes": 0, "img_size": input_size}

    if weights is not None:
        state = strip_prefix(read_state_dict(weights), OPEN_CLIP_TRUNK)
        try:
            model = timm.create_model(spec.timm_name, pretrained=True, pretrained_cfg_overlay={"state_dict": state}, **options)
        except RuntimeError as error:
            raise FaeError(f"encoder weights {weights} do not fit {spec.name} (timm {spec.architecture}): {describe_load_error(error)}") from None
        source = f"file {Path(weights).expanduser().resolve()}"
    elif pretrained:
        try:
            model = timm.create_model(spec.timm_name, pretrained=True, **options)
        except OSError as error:
            raise FaeError(
                f"cannot download the weights of {spec.name} from the {spec.source}: {_first_line(error)}. "
                "Connect to the internet once (the hub cache keeps them), or pass a local file with --weights FILE "
                "(safetensors or .pth)"
            ) from None
        source = f"hub timm/{spec.timm_name}"
    else:
        # Seeded, so that two builds (two ranks, two runs) hold identical random weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(spec.timm_name, pretrained=False, **options)
        source = "random init (seed 0)"

    return VitTokens(model), source, dict(model.pretrained_cfg)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
