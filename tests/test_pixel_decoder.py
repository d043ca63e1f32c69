"""Pixel decoder: shapes, patch layout, sizes, rebuild from config."""

from __future__ import annotations

import pytest
import torch

from fae_cli.errors import FaeError
from fae_cli.models.pixel_decoder import PixelDecoder, build_pixel_decoder
from fae_cli.recipe import DecoderConfig


def tiny_decoder(feature_width: int, grid, image_size) -> PixelDecoder:
    return PixelDecoder(feature_width, grid, image_size, "custom", layers=1, width=32, heads=2)


@pytest.mark.parametrize(
    ("grid", "image_size", "expected"),
    [
        (8, 128, (2, 3, 128, 128)),
        (16, 256, (2, 3, 256, 256)),
        (16, 224, (2, 3, 224, 224)),  # p = 14, as DINOv2's own patch size
        ((4, 8), (32, 64), (2, 3, 32, 64)),
    ],
)
def test_decoder_output_shape(grid, image_size, expected):
    torch.manual_seed(0)
    decoder = tiny_decoder(12, grid, image_size)
    rows, cols = (grid, grid) if isinstance(grid, int) else grid

    images = decoder(torch.randn(2, rows * cols, 12))

    assert images.shape == expected


def test_decoder_patch_size():
    assert tiny_decoder(12, 16, 224).patch == 14


def test_decoder_token_fills_its_own_patch():
    # With zeroed residual branches every block is the identity, so token (row 1, col 2) of a
    # 3 x 4 grid may change only the 4 x 4 pixel patch at rows 4-7, columns 8-11.
    torch.manual_seed(0)
    decoder = PixelDecoder(6, (3, 4), (12, 16), "custom", layers=1, width=16, heads=2, input_norm=False)
    with torch.no_grad():
        for block in decoder.blocks:
            for parameter in block.parameters():
                parameter.zero_()
        decoder.pos_embed.zero_()
    features = torch.randn(1, 12, 6)
    changed = features.clone()
    changed[0, 1 * 4 + 2] += 1.0

    with torch.no_grad():
        difference = (decoder(changed) - decoder(features)).abs().sum(dim=(0, 1))

    inside = difference[4:8, 8:12]
    outside = difference.clone()
    outside[4:8, 8:12] = 0
    assert bool((inside > 0).all())
    assert float(outside.max()) == 0.0


def test_decoder_rejects_uneven_patches():
    with pytest.raises(FaeError, match=r"invalid data.image_size 250x250: .* must be a multiple of 16, e.g. 256$"):
        tiny_decoder(12, 16, 250)


def test_decoder_rejects_wrong_feature_shape():
    decoder = tiny_decoder(12, 4, 32)
    with pytest.raises(ValueError, match="N x 16 x 12"):
        decoder(torch.randn(1, 16, 10))


def test_decoder_custom_needs_all_sizes():
    with pytest.raises(FaeError, match="needs layers, width and heads"):
        PixelDecoder(12, 4, 32, "custom", layers=2)


def test_decoder_heads_must_divide_width():
    with pytest.raises(FaeError, match="not divisible"):
        PixelDecoder(12, 4, 32, "custom", layers=1, width=36, heads=5)


def test_decoder_size_l_parameter_count():
    # Paper: 305.36M for ViT-L on DINOv2-g's 16 x 16 x 1536 grid at 256 px. fae's layout has
    # 304,918,240 (blocks 302,292,960 + input projection, positions, norm and head 2,625,280).
    with torch.device("meta"):
        decoder = PixelDecoder(1536, 16, 256, "L")
    total = sum(parameter.numel() for parameter in decoder.parameters())
    blocks = sum(parameter.numel() for parameter in decoder.blocks.parameters())

    assert total == 304_918_240
    assert blocks == 302_292_960
    assert abs(total / 305.36e6 - 1) < 0.002


def test_decoder_named_size_override():
    with torch.device("meta"):
        decoder = PixelDecoder(16, 4, 32, "S", layers=2)
    assert decoder.config["layers"] == 2
    assert decoder.config["width"] == 384
    assert decoder.config["heads"] == 6


def test_decoder_rebuilds_from_config():
    torch.manual_seed(0)
    decoder = tiny_decoder(12, (2, 4), (16, 32))
    rebuilt = PixelDecoder.from_config(decoder.config)
    rebuilt.load_state_dict(decoder.state_dict(), strict=True)
    features = torch.randn(2, 8, 12)

    with torch.no_grad():
        assert torch.equal(rebuilt(features), decoder(features))


def test_build_decoder_from_recipe():
    config = DecoderConfig(size="custom", layers=2, width=48, heads=3, mlp_ratio=2.0)

    decoder = build_pixel_decoder(config, feature_width=20, grid=4, image_size=64)

    assert decoder.config == {
        "feature_width": 20,
        "grid": [4, 4],
        "image_size": [64, 64],
        "size": "custom",
        "layers": 2,
        "width": 48,
        "heads": 3,
        "mlp_ratio": 2.0,
        "norm": "layernorm",
        "input_norm": True,
    }


def test_build_decoder_named_size_ignores_custom_fields():
    config = DecoderConfig(size="B", layers=2, width=48, heads=3)
    with torch.device("meta"):
        decoder = build_pixel_decoder(config, feature_width=20, grid=4, image_size=64)
    assert decoder.config["layers"] == 12
    assert decoder.config["width"] == 768
