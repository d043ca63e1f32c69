"""Frozen pretrained encoders: a registry name to a module that maps images to patch tokens."""

from fae_cli.encoders.build import build_encoder
from fae_cli.encoders.frozen import FrozenEncoder
from fae_cli.encoders.registry import EncoderSpec, encoder_names, encoder_spec

__all__ = ["EncoderSpec", "FrozenEncoder", "build_encoder", "encoder_names", "encoder_spec"]
