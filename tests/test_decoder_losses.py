"""Decoder losses: hinge GAN signs, LeCam, frozen perceptual networks, LPIPS loading, noise sigma."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fae_cli.errors import FaeError
from fae_cli.models.discriminator import BlurDownsample, PatchDiscriminator
from fae_cli.models.pixel_decoder import PixelDecoder
from fae_cli.recipe import DecoderConfig
from fae_cli.training.decoder_losses import (
    AdversarialLoss,
    DecoderObjective,
    EncoderPerceptualLoss,
    LeCam,
    LpipsVgg,
    add_feature_noise,
    build_decoder_objective,
    feature_scale,
    hinge_discriminator_loss,
    hinge_generator_loss,
    noise_sigma,
    reconstruction_loss,
)


def channel_mean_discriminator() -> nn.Module:
    """A real 1x1 convolution whose logit is the mean of the three channels: ones -> 1, zeros -> 0."""
    conv = nn.Conv2d(3, 1, 1)
    with torch.no_grad():
        conv.weight.fill_(1 / 3)
        conv.bias.zero_()
    return conv


class PatchEncoder(nn.Module):
    """Small frozen-encoder stand-in: images in [0, 1] -> tokens N x L x D via a 4x4 patch conv."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(images).flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Reconstruction


def test_reconstruction_l1_by_hand():
    reconstructions = torch.tensor([[0.5, -0.5], [1.0, 0.0]])
    images = torch.zeros(2, 2)
    assert float(reconstruction_loss(reconstructions, images, "l1")) == pytest.approx(0.5)


def test_reconstruction_l2_by_hand():
    reconstructions = torch.tensor([[0.5, -0.5], [1.0, 0.0]])
    images = torch.zeros(2, 2)
    assert float(reconstruction_loss(reconstructions, images, "l2")) == pytest.approx(0.375)


# ----------------------------------------------------------------------------------------------
# Hinge GAN


def test_hinge_discriminator_real_one_fake_zero():
    # 0.5 * [relu(1 - 1) + relu(1 + 0)] = 0.5
    discriminator = channel_mean_discriminator()
    with torch.no_grad():
        real_logits = discriminator(torch.ones(2, 3, 4, 4))
        fake_logits = discriminator(torch.zeros(2, 3, 4, 4))

    assert float(hinge_discriminator_loss(real_logits, fake_logits)) == pytest.approx(0.5)


def test_hinge_discriminator_confident_is_zero():
    # Real logits >= 1 and fake logits <= -1 leave nothing to learn.
    real_logits = torch.full((2, 1, 2, 2), 1.5)
    fake_logits = torch.full((2, 1, 2, 2), -2.0)
    assert float(hinge_discriminator_loss(real_logits, fake_logits)) == 0.0


def test_hinge_generator_by_hand():
    # -mean D(fake): logits 0 -> 0, logits 0.5 -> -0.5.
    discriminator = channel_mean_discriminator().requires_grad_(False)
    assert float(hinge_generator_loss(discriminator(torch.zeros(1, 3, 4, 4)))) == 0.0
    assert float(hinge_generator_loss(discriminator(torch.full((1, 3, 4, 4), 0.5)))) == pytest.approx(-0.5)


def test_generator_loss_pushes_fakes_toward_real():
    # Real images score 1 and fakes 0, so descending the generator loss must raise every fake
    # pixel: its gradient is negative everywhere.
    adversarial = AdversarialLoss(channel_mean_discriminator())
    fakes = torch.zeros(2, 3, 4, 4, requires_grad=True)

    adversarial.generator_loss(fakes).backward()

    assert bool((fakes.grad < 0).all())


def test_generator_loss_leaves_discriminator_without_grad():
    adversarial = AdversarialLoss(channel_mean_discriminator())
    fakes = torch.zeros(2, 3, 4, 4, requires_grad=True)

    adversarial.generator_loss(fakes).backward()

    assert all(parameter.grad is None for parameter in adversarial.parameters())
    assert all(parameter.requires_grad for parameter in adversarial.parameters())


def test_discriminator_loss_detaches_fakes():
    adversarial = AdversarialLoss(channel_mean_discriminator())
    fakes = torch.zeros(2, 3, 4, 4, requires_grad=True)

    loss, metrics = adversarial(fakes, torch.ones(2, 3, 4, 4))  # forward = discriminator_loss
    loss.backward()

    assert float(loss.detach()) == pytest.approx(0.5)
    assert fakes.grad is None
    assert adversarial.discriminator.weight.grad is not None
    assert float(metrics["d_real_logit"]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# LeCam


def test_lecam_penalty_by_hand():
    lecam = LeCam(decay=0.9)
    real, fake = torch.ones(4), torch.zeros(4)

    # EMAs start at 0: relu(1 - 0)^2 + relu(0 - 0)^2 = 1.
    assert float(lecam.penalty(real, fake)) == pytest.approx(1.0)

    lecam.update(real, fake)
    assert float(lecam.real_ema) == pytest.approx(0.1)
    assert float(lecam.fake_ema) == pytest.approx(0.0)

    # relu(1 - 0)^2 + relu(0.1 - (-0.5))^2 = 1 + 0.36.
    assert float(lecam.penalty(real, torch.full((4,), -0.5))) == pytest.approx(1.36)


def test_lecam_adds_weighted_penalty():
    adversarial = AdversarialLoss(channel_mean_discriminator(), lecam_weight=0.25, lecam_decay=0.9)

    loss, metrics = adversarial.discriminator_loss(torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2))

    # hinge 0.5 + 0.25 * penalty 1.0; the EMAs move after the penalty.
    assert float(loss.detach()) == pytest.approx(0.75)
    assert float(metrics["d_lecam"]) == pytest.approx(1.0)
    assert float(adversarial.lecam.real_ema) == pytest.approx(0.1)


def test_lecam_state_is_checkpointed():
    adversarial = AdversarialLoss(channel_mean_discriminator(), lecam_weight=0.1, lecam_decay=0.5)
    adversarial.discriminator_loss(torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2))

    restored = AdversarialLoss(channel_mean_discriminator(), lecam_weight=0.1, lecam_decay=0.5)
    restored.load_state_dict(adversarial.state_dict(), strict=True)

    assert float(restored.lecam.real_ema) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------
# Discriminator


@pytest.mark.parametrize("size", [32, 64, 128])
def test_discriminator_logit_shape(size):
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(8, 3, norm_groups=4, logit_grid=4)
    assert discriminator(torch.randn(2, 3, size, size)).shape == (2, 1, 4, 4)


def test_discriminator_default_widths():
    discriminator = PatchDiscriminator()
    widths = [stage[0].out_channels for stage in discriminator.stages]
    assert widths == [128, 256, 512]


def test_blur_downsample_halves_and_keeps_constants():
    blurred = BlurDownsample()(torch.ones(1, 2, 8, 8))
    assert blurred.shape == (1, 2, 4, 4)
    # Away from the zero-padded border the normalised kernel keeps a constant image unchanged.
    assert torch.allclose(blurred[..., 1:3, 1:3], torch.ones(1, 2, 2, 2))


def test_discriminator_rejects_bad_groups():
    with pytest.raises(FaeError, match="GroupNorm"):
        PatchDiscriminator(12, 2, norm_groups=8)


# ----------------------------------------------------------------------------------------------
# Perceptual losses and frozen networks


def test_encoder_perceptual_identical_is_zero():
    loss = EncoderPerceptualLoss(PatchEncoder())
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    assert float(loss(images, images)) == pytest.approx(0.0, abs=1e-6)


def test_encoder_perceptual_opposite_tokens():
    # 2 * (1 - cos): tokens pointing the opposite way give 4. A linear patch embedding without
    # bias maps x and -x to opposite tokens, and images in [0, 1] are (x + 1) / 2.
    encoder = PatchEncoder()
    with torch.no_grad():
        encoder.embed.bias.zero_()
    loss = EncoderPerceptualLoss(encoder)
    positive = torch.rand(1, 3, 8, 8) * 0.5 + 0.25  # [0, 1] scale
    negative = -positive

    value = loss(positive * 2 - 1, negative * 2 - 1)

    assert float(value.detach()) == pytest.approx(4.0, abs=1e-5)


def test_perceptual_network_gets_no_gradient():
    torch.manual_seed(0)
    encoder = PatchEncoder()
    decoder = PixelDecoder(8, 2, 8, "custom", layers=1, width=16, heads=2)
    adversarial = AdversarialLoss(PatchDiscriminator(8, 1, norm_groups=4, logit_grid=2))
    objective = DecoderObjective(
        perceptual=EncoderPerceptualLoss(encoder), adversarial=adversarial, gan_weight=0.1, gan_start=0
    )
    images = torch.rand(2, 3, 8, 8) * 2 - 1

    total, _ = objective.generator_loss(decoder(torch.randn(2, 4, 8)), images, step=0)
    total.backward()

    assert all(parameter.grad is None for parameter in encoder.parameters())
    assert all(not parameter.requires_grad for parameter in encoder.parameters())
    assert all(parameter.grad is not None for parameter in decoder.parameters())


def test_perceptual_network_outside_trainable_parameters():
    encoder = PatchEncoder()
    objective = build_decoder_objective(DecoderConfig(disc_channels=8, disc_stages=1), encoder=encoder)
    decoder = PixelDecoder(8, 2, 8, "custom", layers=1, width=16, heads=2)
    trainable = {id(parameter) for parameter in decoder.parameters()}
    trainable |= {id(parameter) for parameter in objective.adversarial.parameters()}

    assert not any(id(parameter) in trainable for parameter in encoder.parameters())


def test_perceptual_network_stays_in_eval():
    loss = EncoderPerceptualLoss(PatchEncoder())
    loss.train()
    assert loss.training
    assert not loss.network.training


def test_lpips_without_weights_fails():
    with pytest.raises(FaeError, match="perceptual_weights"):
        LpipsVgg([])


def test_lpips_missing_file_fails(tmp_path):
    with pytest.raises(FaeError, match="not found"):
        LpipsVgg([tmp_path / "vgg16.pth"])


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random VGG16 features and LPIPS heads saved under their published key names, as two files."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("lpips")
    features = make_layers(cfgs["D"])
    vgg = {f"features.{key}": value for key, value in features.state_dict().items()}
    heads = {f"lin{k}.model.1.weight": torch.rand(1, channels, 1, 1) for k, channels in enumerate((64, 128, 256, 512, 512))}
    save_file(vgg, str(folder / "vgg16.safetensors"))
    torch.save(heads, folder / "lpips_vgg.pth")
    return folder / "vgg16.safetensors", folder / "lpips_vgg.pth"


def test_lpips_needs_heads(lpips_files):
    with pytest.raises(FaeError, match="lin0.model.1.weight"):
        LpipsVgg([lpips_files[0]])


def test_lpips_loads_and_stays_frozen(lpips_files):
    loss = LpipsVgg(list(lpips_files))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    reconstructions = (images + 0.3 * torch.randn_like(images)).requires_grad_(True)

    same = loss(images, images)
    different = loss(reconstructions, images)
    different.backward()

    assert float(same.detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(different.detach()) > 0
    assert reconstructions.grad is not None
    assert all(parameter.grad is None for parameter in loss.parameters())


# ----------------------------------------------------------------------------------------------
# Objective


def test_objective_gan_starts_at_step():
    torch.manual_seed(0)
    adversarial = AdversarialLoss(channel_mean_discriminator())
    objective = DecoderObjective(recon="l1", recon_weight=2.0, adversarial=adversarial, gan_weight=0.5, gan_start=10)
    reconstructions = torch.full((1, 3, 2, 2), 0.5)
    images = torch.zeros(1, 3, 2, 2)

    before, before_metrics = objective.generator_loss(reconstructions, images, step=9)
    after, after_metrics = objective.generator_loss(reconstructions, images, step=10)

    # 2.0 * L1 0.5 = 1.0; from step 10 on, + 0.5 * (-mean D = -0.5).
    assert "gan" not in before_metrics
    assert float(before.detach()) == pytest.approx(1.0)
    assert float(after.detach()) == pytest.approx(0.75)
    assert float(after_metrics["gan"]) == pytest.approx(-0.5)


def test_objective_without_gan():
    objective = build_decoder_objective(DecoderConfig(gan_weight=0.0, perceptual="none"))
    assert objective.adversarial is None
    assert not objective.gan_active(10**6)


# ----------------------------------------------------------------------------------------------
# Gaussian noise sigma


def test_noise_sigma_dinov2():
    assert noise_sigma("dinov2-g", scale=5.0, reference_scale=1.0) == 0.4


def test_noise_sigma_scaled_by_feature_scale():
    assert noise_sigma("efficientnet-lite0", scale=2.5, reference_scale=2.0) == pytest.approx(0.5)


def test_feature_scale_constant_tokens():
    # Every token is (3, 3, ..., 3) in 16 dims: norm 12, divided by sqrt(16) = 3.
    assert feature_scale(torch.full((2, 5, 16), 3.0)) == pytest.approx(3.0)


def test_feature_scale_layernorm_tokens():
    tokens = nn.functional.layer_norm(torch.randn(4, 64, 256), (256,))
    assert feature_scale(tokens) == pytest.approx(1.0, abs=1e-3)


def test_feature_noise_uses_generator():
    features = torch.ones(2, 4, 8)

    noisy = add_feature_noise(features, 0.5, torch.Generator().manual_seed(3))

    expected = features + 0.5 * torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(noisy, expected)


def test_feature_noise_zero_sigma():
    features = torch.ones(2, 4, 8)
    assert add_feature_noise(features, 0.0) is features
