"""Encoder registry, token shapes of the real architectures, packaged weights and local files."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from fae_cli.data.images import center_crop_adm
from fae_cli.encoders import build_encoder, encoder_names, encoder_spec
from fae_cli.encoders.efficientnet import efficientnet_lite0_classifier
from fae_cli.errors import FaeError

# ImageNet-1k classes 281-285: tabby, tiger cat, Persian cat, Siamese cat, Egyptian cat.
CAT_CLASSES = set(range(281, 286))


def test_registry_lists_every_family():
    names = encoder_names()
    for name in ("dinov2-s", "dinov2-g", "dinov2-b-reg", "dinov2-g-reg", "siglip2-b", "siglip2-so400m", "siglip2-g", "efficientnet-lite0"):
        assert name in names


def test_spec_without_building():
    spec = encoder_spec("dinov2-g")
    assert spec.width == 1536
    assert spec.grid == (16, 16)
    assert spec.timm_name == "vit_giant_patch14_dinov2.lvd142m"
    assert spec.mean == (0.485, 0.456, 0.406)


def test_spec_siglip_names_open_clip():
    spec = encoder_spec("siglip2-so400m")
    assert spec.width == 1152
    assert spec.open_clip == ("ViT-SO400M-16-SigLIP2-256", "webli")
    assert "open_clip" in spec.source


def test_spec_unknown_suggests():
    with pytest.raises(FaeError, match="did you mean 'dinov2-b'"):
        encoder_spec("dinov2b")


@pytest.mark.parametrize(("name", "prefix"), [("dinov2-b", 1), ("dinov2-b-reg", 5), ("siglip2-b", 0)])
def test_vit_patch_tokens_random_init(name, prefix):
    encoder = build_encoder(name, pretrained=False)
    model = encoder.backbone.model
    # The final norm's output is every token (prefix + patches); one forward serves both checks.
    captured = []
    model.norm.register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.no_grad():
        tokens = encoder(torch.rand(1, 3, encoder.input_size, encoder.input_size))
    assert tuple(tokens.shape) == (1, 256, 768)
    assert model.num_prefix_tokens == prefix
    assert captured[0].shape[1] == 256 + prefix
    assert torch.equal(tokens, captured[0][:, prefix:])
    assert encoder.mean == tuple(model.pretrained_cfg["mean"])
    assert encoder.std == tuple(model.pretrained_cfg["std"])
    assert encoder.mean == tuple(timm.models.get_pretrained_cfg(encoder.spec.timm_name).mean)


@pytest.fixture(scope="module")
def lite0():
    return build_encoder("efficientnet-lite0", input_size=128)


def test_efficientnet_grid_at_128(lite0):
    with torch.no_grad():
        tokens = lite0(torch.rand(2, 3, 50, 70))
    assert tuple(tokens.shape) == (2, 64, 112)
    assert lite0.grid == (8, 8)
    assert lite0.mean == (0.5, 0.5, 0.5)


def test_efficientnet_default_grid(lite0):
    with torch.no_grad():
        tokens = lite0.backbone(torch.rand(1, 3, 256, 256))
    assert encoder_spec("efficientnet-lite0").grid == (16, 16)
    assert tuple(tokens.shape) == (1, 256, 112)


def test_efficientnet_tokens_are_row_major_map(lite0):
    images = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        tokens = lite0(images)
        feature_map = lite0.backbone.model.forward_intermediates(
            lite0.preprocess(images), indices=[lite0.backbone.stage], intermediates_only=True
        )[0]
    assert torch.equal(tokens[0, 8 + 3], feature_map[0, :, 1, 3])


def test_efficientnet_packaged_weights_classify_cat():
    model = efficientnet_lite0_classifier()
    crop = center_crop_adm(Image.fromarray(_chelsea()), 224)
    x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        top5 = model((x - 0.5) / 0.5).topk(5).indices[0].tolist()
    assert CAT_CLASSES & set(top5)
    assert top5[0] in CAT_CLASSES


def _chelsea() -> np.ndarray:
    from skimage.data import chelsea

    return chelsea()


def test_efficientnet_wrong_file_named(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path))
    with pytest.raises(FaeError, match="has 1 tensors but timm tf_efficientnet_lite0 has 296"):
        build_encoder("efficientnet-lite0", weights=path)


def test_frozen_but_differentiable(lite0):
    lite0.train()
    images = torch.rand(1, 3, 40, 40, requires_grad=True)
    lite0(images).square().mean().backward()
    assert not lite0.training
    assert not any(parameter.requires_grad for parameter in lite0.parameters())
    assert images.grad is not None
    assert images.grad.abs().sum() > 0


def test_batchnorm_stats_unchanged_by_forward(lite0):
    before = lite0.backbone.model.bn1.running_mean.clone()
    lite0.train()
    with torch.no_grad():
        lite0(torch.rand(2, 3, 32, 32))
    assert torch.equal(lite0.backbone.model.bn1.running_mean, before)


def test_input_size_not_multiple():
    with pytest.raises(FaeError, match="not a multiple of dinov2-s's patch size 14; use 238 or 252"):
        build_encoder("dinov2-s", input_size=250, pretrained=False)


def test_resize_to_input_size(lite0):
    images = torch.rand(1, 3, 256, 256)
    resized = torch.nn.functional.interpolate(images, size=(128, 128), mode="bicubic", antialias=True).clamp(0, 1)
    assert torch.allclose(lite0.preprocess(images), (resized - 0.5) / 0.5)


def test_weights_file_with_open_clip_prefix(tmp_path):
    reference = build_encoder("dinov2-s", input_size=28, pretrained=False)
    state = {f"visual.trunk.{key}": value for key, value in reference.backbone.model.state_dict().items()}
    state["text.token_embedding.weight"] = torch.zeros(4, 4)
    path = tmp_path / "open_clip_model.safetensors"
    save_file(state, str(path))
    torch.manual_seed(123)
    loaded = build_encoder("dinov2-s", weights=path, input_size=28)
    images = torch.rand(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(images), reference(images))
    assert loaded.weights_hash == reference.weights_hash
    assert loaded.weights_source.startswith("file ")


def test_weights_file_pth_that_does_not_fit(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"model": {"pos_embed": torch.zeros(1, 5, 384)}}, path)
    with pytest.raises(FaeError, match="do not fit dinov2-s"):
        build_encoder("dinov2-s", weights=path)


def test_weights_file_missing(tmp_path):
    with pytest.raises(FaeError, match="encoder weights file not found"):
        build_encoder("dinov2-s", weights=tmp_path / "none.pth")


def test_hub_offline_names_both_ways_out(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FaeError) as error:
        build_encoder("dinov2-s")
    message = str(error.value)
    assert "\n" not in message
    assert "--weights FILE" in message
    assert "internet" in message
    assert "vit_small_patch14_dinov2.lvd142m" in message


def test_weights_hash_tracks_weights(lite0):
    random = build_encoder("efficientnet-lite0", input_size=32, pretrained=False)
    again = build_encoder("efficientnet-lite0", input_size=32, pretrained=False)
    assert lite0.weights_hash != random.weights_hash
    assert random.weights_hash == again.weights_hash
