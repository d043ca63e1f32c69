"""Decoding any Pillow mode to RGB, extension matching, and the ADM resize + centre crop."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fae_cli.data.images import (
    center_crop_adm,
    is_image_file,
    list_images,
    load_rgb,
    to_rgb,
    try_load_rgb,
)
from fae_cli.errors import FaeError


def test_to_rgb_grey_replicates_channels():
    image = Image.fromarray(np.array([[0, 128], [200, 255]], dtype=np.uint8), mode="L")
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (2, 2, 3)
    assert (rgb == np.array([[0, 128], [200, 255]])[..., None]).all()


def test_to_rgb_alpha_dropped_not_composited():
    # A fully transparent red pixel stays red: alpha is dropped, nothing is blended on white.
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)
    rgba[0, 1] = (0, 0, 255, 255)
    rgb = np.asarray(to_rgb(Image.fromarray(rgba, mode="RGBA")))
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb[0, 1].tolist() == [0, 0, 255]


def test_to_rgb_grey_alpha_keeps_grey():
    la = Image.fromarray(np.array([[[90, 0]]], dtype=np.uint8), mode="LA")
    assert np.asarray(to_rgb(la))[0, 0].tolist() == [90, 90, 90]


def test_to_rgb_palette_uses_palette_colours():
    palette = Image.new("P", (1, 1))
    palette.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    palette.putpixel((0, 0), 0)
    assert np.asarray(to_rgb(palette))[0, 0].tolist() == [10, 20, 30]


def test_to_rgb_sixteen_bit_keeps_top_byte():
    image = Image.fromarray(np.array([[0x1234, 0xFF00]], dtype="<u2"))
    assert image.mode == "I;16"
    rgb = np.asarray(to_rgb(image))
    assert rgb[0, 0].tolist() == [0x12, 0x12, 0x12]
    assert rgb[0, 1].tolist() == [0xFF, 0xFF, 0xFF]


def test_to_rgb_cmyk_black_and_white():
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 0, 0, 255))
    rgb = np.asarray(to_rgb(cmyk))
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == [0, 0, 0]


def test_extensions_match_any_case(tmp_path):
    for name in ("a.JPEG", "b.Png", "c.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    names = [path.name for path in list_images(tmp_path)]
    assert names == ["a.JPEG", "b.Png", "c.jpg"]
    assert not is_image_file(tmp_path / "notes.txt")


def test_list_images_missing_folder(tmp_path):
    with pytest.raises(FaeError, match="image folder not found"):
        list_images(tmp_path / "nowhere")


def test_try_load_truncated_reports_reason(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    image, reason = try_load_rgb(path)
    assert image is None
    assert reason == "truncated"


def test_try_load_not_an_image(tmp_path):
    path = tmp_path / "fake.jpg"
    path.write_text("not pixels")
    assert try_load_rgb(path) == (None, "not an image")


def test_load_rgb_png_round_trip(tmp_path):
    array = np.random.default_rng(1).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "x.png")
    assert (np.asarray(load_rgb(tmp_path / "x.png")) == array).all()


def test_center_crop_takes_middle_columns():
    # Short side already equals the target: no resampling, only the centre crop.
    array = np.tile(np.arange(64, dtype=np.uint8)[None, :, None], (32, 1, 3))
    cropped = center_crop_adm(Image.fromarray(array), 32)
    assert cropped.shape == (32, 32, 3)
    assert (cropped == array[:, 16:48]).all()


def test_center_crop_box_halving_is_exact():
    # 256 x 128 (W x H) to 32: two box halvings (128 >= 64, 64 >= 64) give 64 x 32, then no
    # bicubic change; a 4 x 4 block pattern averages to its block values exactly.
    blocks = np.random.default_rng(2).integers(0, 255, (32, 64, 3), dtype=np.uint8)
    array = blocks.repeat(4, axis=0).repeat(4, axis=1)
    cropped = center_crop_adm(Image.fromarray(array), 32)
    assert (cropped == blocks[:, 16:48]).all()


def test_center_crop_upscales_small_images():
    grey = Image.fromarray(np.full((28, 28), 77, dtype=np.uint8), mode="L")
    cropped = center_crop_adm(grey, 64)
    assert cropped.shape == (64, 64, 3)
    assert (cropped == 77).all()


def test_center_crop_is_writable():
    cropped = center_crop_adm(Image.new("RGB", (40, 30)), 16)
    assert cropped.flags.writeable
