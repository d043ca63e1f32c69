"""Losses of pixel-decoder training: reconstruction, perceptual, hinge GAN with LeCam, feature noise.

Images are in the pixel decoder's [-1, 1] scale everywhere in this module. The default weights
follow TiTok's second training stage (bytedance/1d-tokenizer): L2 reconstruction 1.0,
perceptual 0.1, generator hinge loss 0.01 from a start step on, LeCam 0.001 with logit EMAs of
decay 0.999.

Trainable parameters live only in the pixel decoder and in `AdversarialLoss` (the
discriminator). Perceptual networks are frozen: their parameters have requires_grad False,
stay in eval mode, and belong to no module that an optimizer is built from.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from fae_cli.errors import FaeError
from fae_cli.models.discriminator import PatchDiscriminator
from fae_cli.recipe import DecoderConfig

# Noise sigma on DINOv2 features in the Gaussian-noise phase (FAE, Gao et al., arXiv 2512.07829).
DINOV2_NOISE_SIGMA = 0.4

# ImageNet normalisation constants for [0, 1] images (torchvision VGG16 weights).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision VGG16 `features` indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (LPIPS taps).
VGG16_TAPS = (3, 8, 15, 22, 29)
VGG16_TAP_CHANNELS = (64, 128, 256, 512, 512)


# ----------------------------------------------------------------------------------------------
# Reconstruction


def reconstruction_loss(reconstructions: torch.Tensor, images: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Mean absolute ('l1') or mean squared ('l2') error over every pixel and channel."""
    if kind == "l1":
        return (reconstructions - images).abs().mean()
    if kind == "l2":
        return (reconstructions - images).pow(2).mean()
    raise FaeError(f"unknown reconstruction loss {kind!r}: use 'l1' or 'l2'")


# ----------------------------------------------------------------------------------------------
# Perceptual losses on frozen networks


class PerceptualLoss(nn.Module):
    """Base of the perceptual losses: a frozen network that receives no gradient updates.

    `forward(reconstructions, images)` returns a scalar; gradients flow to the reconstructions
    only. `train()` leaves the frozen network in eval mode.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.network.eval()
        return self


class EncoderPerceptualLoss(PerceptualLoss):
    """Distance between a frozen encoder's token features of two images (works offline).

    `encoder` maps images in [0, 1] to tokens N x L x D (a `FrozenEncoder`, for instance). Each
    token is scaled to unit L2 norm, as LPIPS does per position, so the loss does not depend on
    the encoder's feature scale: loss = mean over tokens of |f(x_hat)/|f(x_hat)| - f(x)/|f(x)||^2,
    which equals 2 * (1 - cosine similarity) and lies in [0, 4].
    """

    def forward(self, reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = F.normalize(self.network((images + 1) / 2).float(), dim=-1)
        predicted = F.normalize(self.network((reconstructions + 1) / 2).float(), dim=-1)
        return (predicted - target).pow(2).sum(dim=-1).mean()


class LpipsVgg(PerceptualLoss):
    """LPIPS with a VGG16 backbone, loaded from local weight files.

    `weights` are one or more files (.safetensors or .pth) that together hold torchvision's
    VGG16 state dict (`features.<i>.weight/bias`, e.g. `vgg16-397923af.pth`) and the five
    LPIPS linear heads (`lin<k>.model.1.weight`, e.g. the LPIPS package's `v0.1/vgg.pth`).
    Extra keys such as VGG's classifier are ignored.
    """

    def __init__(self, weights: list[Path] | tuple[Path, ...]) -> None:
        from torchvision.models.vgg import cfgs, make_layers

        # VGG16's convolutional part ("D" configuration) up to relu5_3; no classifier.
        backbone = make_layers(cfgs["D"])[: VGG16_TAPS[-1] + 1]
        for layer in backbone:
            if isinstance(layer, nn.ReLU):
                layer.inplace = False  # tapped activations must survive for the backward pass
        heads = nn.ModuleList(nn.Conv2d(channels, 1, 1, bias=False) for channels in VGG16_TAP_CHANNELS)
        network = nn.ModuleDict({"features": backbone, "heads": heads})
        _load_lpips_weights(network, weights)
        super().__init__(network)

        # [-1, 1] input -> ImageNet-normalised input: (x - (2 mean - 1)) / (2 std).
        shift = torch.tensor([2 * mean - 1 for mean in IMAGENET_MEAN]).view(1, 3, 1, 1)
        scale = torch.tensor([2 * std for std in IMAGENET_STD]).view(1, 3, 1, 1)
        self.register_buffer("shift", shift, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    def forward(self, reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            targets = self._taps(images)
        predictions = self._taps(reconstructions)

        distance = reconstructions.new_zeros(reconstructions.shape[0])
        for head, predicted, target in zip(self.network["heads"], predictions, targets):
            difference = (_unit_channels(predicted) - _unit_channels(target)).pow(2)
            distance = distance + head(difference).mean(dim=(1, 2, 3))
        return distance.mean()

    def _taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.shift) / self.scale
        taps = []
        for index, layer in enumerate(self.network["features"]):
            x = layer(x)
            if index in VGG16_TAPS:
                taps.append(x)
        return taps


def _unit_channels(features: torch.Tensor) -> torch.Tensor:
    # LPIPS divides by the channel norm plus 1e-10 at every spatial position.
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)


def _load_lpips_weights(network: nn.ModuleDict, files: list[Path] | tuple[Path, ...]) -> None:
    if not files:
        raise FaeError(
            "perceptual = 'lpips-vgg' needs local weights: set decoder.perceptual_weights to the torchvision "
            "VGG16 file and the LPIPS linear-head file, or use perceptual = 'encoder'"
        )
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(_read_state_dict(Path(path)))

    # Module name -> key in the published files.
    key_map = {f"features.{key}": f"features.{key}" for key in network["features"].state_dict()}
    for k in range(len(VGG16_TAP_CHANNELS)):
        key_map[f"heads.{k}.weight"] = f"lin{k}.model.1.weight"
    missing = [source for source in key_map.values() if source not in state]
    if missing:
        listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FaeError(
            f"LPIPS-VGG weights in {', '.join(str(p) for p in files)} are missing {listed}: give both the "
            "torchvision VGG16 state dict and the LPIPS linear heads"
        )
    network.load_state_dict({name: state[source] for name, source in key_map.items()}, strict=True)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FaeError(f"perceptual weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, EOFError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FaeError(f"cannot read perceptual weights {path} (weights_only=True): {reason}") from None
    if not isinstance(state, dict):
        raise FaeError(f"perceptual weights {path} hold a {type(state).__name__}, expected a state dict")
    return state


def build_perceptual_loss(
    kind: str,
    *,
    encoder: nn.Module | None = None,
    weights: list[Path] | tuple[Path, ...] = (),
) -> PerceptualLoss | None:
    """Build the recipe's perceptual loss: 'encoder', 'lpips-vgg' or 'none' (returns None)."""
    if kind == "none":
        return None
    if kind == "encoder":
        if encoder is None:
            raise ValueError("perceptual = 'encoder' needs the frozen encoder")
        return EncoderPerceptualLoss(encoder)
    if kind == "lpips-vgg":
        return LpipsVgg(weights)
    raise FaeError(f"unknown perceptual loss {kind!r}: use 'encoder', 'lpips-vgg' or 'none'")


# ----------------------------------------------------------------------------------------------
# Hinge GAN with LeCam regularisation


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -mean D(x_hat). It falls as the discriminator rates fakes as real."""
    return -fake_logits.mean()


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * [mean relu(1 - D(x)) + mean relu(1 + D(x_hat))]."""
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


class LeCam(nn.Module):
    """LeCam regulariser in the one-sided form of TiTok (bytedance/1d-tokenizer).

    penalty = relu(mean D(x) - ema_fake)^2 + relu(ema_real - mean D(x_hat))^2, where ema_real
    and ema_fake are EMAs of the batch-mean logits. They start at 0 and are buffers, so
    checkpoints of the owning module keep them. `update` runs after the penalty, as in TiTok.
    """

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("real_ema", torch.zeros(()))
        self.register_buffer("fake_ema", torch.zeros(()))

    def penalty(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        real_term = F.relu(real_logits.mean() - self.fake_ema).pow(2)
        fake_term = F.relu(self.real_ema - fake_logits.mean()).pow(2)
        return real_term + fake_term

    @torch.no_grad()
    def update(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> None:
        means = torch.stack([real_logits.mean(), fake_logits.mean()]).float()
        if dist.is_available() and dist.is_initialized():
            # Averaging over ranks keeps the EMAs identical on every rank.
            dist.all_reduce(means)
            means /= dist.get_world_size()
        self.real_ema.lerp_(means[0].to(self.real_ema.dtype), 1 - self.decay)
        self.fake_ema.lerp_(means[1].to(self.fake_ema.dtype), 1 - self.decay)


class AdversarialLoss(nn.Module):
    """The discriminator and its LeCam state: the second trained model of decoder training.

    Its parameters are the discriminator's (give them to the discriminator's optimizer) and its
    state dict includes the LeCam EMAs. `generator_loss` gives no gradient to the discriminator.
    `forward` is `discriminator_loss`, which detaches the reconstructions, so a DDP wrapper of
    this module trains the discriminator through its normal call.
    """

    def __init__(self, discriminator: nn.Module, *, lecam_weight: float = 0.0, lecam_decay: float = 0.999) -> None:
        super().__init__()
        self.discriminator = discriminator
        self.lecam_weight = lecam_weight
        self.lecam = LeCam(lecam_decay)

    def generator_loss(self, reconstructions: torch.Tensor) -> torch.Tensor:
        with _frozen(self.discriminator):
            return hinge_generator_loss(self.discriminator(reconstructions))

    def discriminator_loss(self, reconstructions: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (hinge + weighted LeCam loss, detached metrics); then update the LeCam EMAs."""
        real_logits = self.discriminator(images.detach())
        fake_logits = self.discriminator(reconstructions.detach())
        hinge = hinge_discriminator_loss(real_logits, fake_logits)
        loss = hinge
        metrics = {
            "d_hinge": hinge.detach(),
            "d_real_logit": real_logits.detach().mean(),
            "d_fake_logit": fake_logits.detach().mean(),
        }
        if self.lecam_weight > 0:
            penalty = self.lecam.penalty(real_logits, fake_logits)
            loss = loss + self.lecam_weight * penalty
            metrics["d_lecam"] = penalty.detach()
            # NOTE: the EMAs move once per call, so with gradient accumulation once per
            # micro-batch, not once per optimiser step as in TiTok.
            self.lecam.update(real_logits, fake_logits)
        return loss, metrics

    def forward(self, reconstructions: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.discriminator_loss(reconstructions, images)


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Switch off requires_grad of a module's parameters inside the block, then restore it."""
    flags = [(parameter, parameter.requires_grad) for parameter in module.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


# ----------------------------------------------------------------------------------------------
# The weighted objective


class DecoderObjective:
    """Weighted sum of the decoder losses; the GAN term and discriminator start at `gan_start`.

    generator total = recon_weight * L_rec + perceptual_weight * L_perc + gan_weight * L_gan,
    with L_gan counted only from step `gan_start` on. A plain object, not a module, so its
    frozen perceptual network never shows up among trainable parameters.
    """

    def __init__(
        self,
        *,
        recon: str = "l2",
        recon_weight: float = 1.0,
        perceptual: PerceptualLoss | None = None,
        perceptual_weight: float = 0.1,
        adversarial: AdversarialLoss | None = None,
        gan_weight: float = 0.01,
        gan_start: int = 0,
    ) -> None:
        self.recon = recon
        self.recon_weight = recon_weight
        self.perceptual = perceptual
        self.perceptual_weight = perceptual_weight
        self.adversarial = adversarial
        self.gan_weight = gan_weight
        self.gan_start = gan_start

    def gan_active(self, step: int) -> bool:
        """Return whether step `step` (0-based optimiser step) trains with the GAN loss and the discriminator."""
        return self.adversarial is not None and step >= self.gan_start

    def generator_loss(self, reconstructions: torch.Tensor, images: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (weighted total, detached metrics) for the decoder's update at `step`."""
        recon = reconstruction_loss(reconstructions, images, self.recon)
        total = self.recon_weight * recon
        metrics = {"recon": recon.detach()}

        if self.perceptual is not None and self.perceptual_weight > 0:
            perceptual = self.perceptual(reconstructions, images)
            total = total + self.perceptual_weight * perceptual
            metrics["perceptual"] = perceptual.detach()

        if self.gan_active(step):
            gan = self.adversarial.generator_loss(reconstructions)
            total = total + self.gan_weight * gan
            metrics["gan"] = gan.detach()
        return total, metrics

    def discriminator_loss(self, reconstructions: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (discriminator loss, detached metrics); call only where `gan_active(step)`."""
        if self.adversarial is None:
            raise ValueError("this objective has no discriminator (gan_weight = 0)")
        return self.adversarial.discriminator_loss(reconstructions, images)


def build_decoder_objective(config: DecoderConfig, *, encoder: nn.Module | None = None) -> DecoderObjective:
    """Build the objective of the recipe's [decoder] section.

    `encoder` is the frozen feature encoder, needed when perceptual = 'encoder'. The
    discriminator exists only when gan_weight > 0; `objective.adversarial` is then the module
    to train with its own optimizer.
    """
    perceptual = None
    if config.perceptual_weight > 0:
        perceptual = build_perceptual_loss(config.perceptual, encoder=encoder, weights=config.perceptual_weights)
    adversarial = None
    if config.gan_weight > 0:
        # TiTok's 32 GroupNorm groups, fewer when disc_channels is not a multiple of 32.
        groups = math.gcd(32, config.disc_channels)
        discriminator = PatchDiscriminator(config.disc_channels, config.disc_stages, norm_groups=groups)
        adversarial = AdversarialLoss(discriminator, lecam_weight=config.lecam_weight, lecam_decay=config.lecam_decay)
    return DecoderObjective(
        recon=config.recon_loss,
        recon_weight=config.recon_weight,
        perceptual=perceptual,
        perceptual_weight=config.perceptual_weight,
        adversarial=adversarial,
        gan_weight=config.gan_weight,
        gan_start=config.gan_start,
    )


# ----------------------------------------------------------------------------------------------
# Gaussian feature noise of the noise phase


def feature_scale(features: torch.Tensor) -> float:
    """Return the mean token L2 norm of features N x L x D, divided by sqrt(width).

    Dividing by sqrt(D) makes encoders of different widths comparable: tokens with unit
    root-mean-square values (e.g. LayerNorm output without affine) have scale 1.
    """
    norms = features.float().norm(dim=-1)
    return float(norms.mean()) / math.sqrt(features.shape[-1])


def noise_sigma(encoder: str, scale: float, reference_scale: float) -> float:
    """Return the noise sigma of the Gaussian-noise phase for an encoder.

    DINOv2 encoders (names starting with 'dinov2') get 0.4, as in FAE. FAE scales sigma by
    feature norm for other encoders, so they get 0.4 * scale / reference_scale,
    where `scale` is their `feature_scale` and `reference_scale` the DINOv2 scale that 0.4 was
    chosen for (recipe: decoder.noise_reference_scale).
    """
    if encoder.startswith("dinov2"):
        return DINOV2_NOISE_SIGMA
    # NOTE: the recipe's default reference_scale 1.0 is an estimate (unit-RMS tokens, as after a
    # LayerNorm without affine). DINOv2-g's own feature scale has not been measured for fae.
    if reference_scale <= 0:
        raise FaeError(f"invalid noise reference scale {reference_scale}: it must be positive")
    return DINOV2_NOISE_SIGMA * scale / reference_scale


def add_feature_noise(features: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return features + sigma * eps with eps ~ N(0, I), drawn from `generator` when given."""
    if sigma == 0:
        return features
    noise = torch.randn(features.shape, generator=generator, device=features.device, dtype=features.dtype)
    return features + sigma * noise
