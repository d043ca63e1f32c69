"""The linear interpolant, its training loss and latent normalisation.

This module is the only place that defines fae's time convention: t in [0, 1], t = 0 is data,
t = 1 is noise, x_t = (1 - t) * x + t * noise, and the network regresses the velocity
v = dx_t/dt = noise - x (the FAE paper's alpha_t = 1 - t, sigma_t = t). SiT and LightningDiT
write time the other way round (tau = 1 - t, velocity x - noise); their formulas enter here
translated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from fae_cli.artifacts import check_compatible
from fae_cli.errors import FaeError

# A velocity field: (x_t N x C x H x W, t (N,), labels (N,) or None) -> v N x C x H x W.
Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
TimeDistribution = Literal["uniform", "logit-normal"]


def _per_sample(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """Broadcast per-sample times (N,) against a batch (N, ...); a Python float passes through."""
    if isinstance(t, torch.Tensor) and t.dim() == 1:
        return t.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
    return t


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Return x_t = (1 - t) * x + t * noise for data x, noise and times t (N,) or a scalar."""
    t = _per_sample(t, x)
    return (1 - t) * x + t * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Return the regression target v = noise - x (the time derivative of x_t)."""
    return noise - x


def data_estimate(x_t: torch.Tensor, t: torch.Tensor | float, velocity: torch.Tensor) -> torch.Tensor:
    """Return the data estimate x_hat = x_t - t * v implied by a velocity at time t."""
    return x_t - _per_sample(t, x_t) * velocity


def noise_estimate(x_t: torch.Tensor, t: torch.Tensor | float, velocity: torch.Tensor) -> torch.Tensor:
    """Return the noise estimate eps_hat = x_t + (1 - t) * v implied by a velocity at time t."""
    return x_t + (1 - _per_sample(t, x_t)) * velocity


def sde_drift(x_t: torch.Tensor, t: float, velocity: torch.Tensor) -> torch.Tensor:
    """Return the reverse-time SDE drift v + eps_hat for the diffusion coefficient g(t)^2 = 2t.

    The reverse SDE dx = [v - g^2/2 * score] dt + g dW with score = -eps_hat / t gives the drift
    v + eps_hat; it never divides by t, so it is defined at t = 1 (SiT's "sigma" diffusion form
    with norm 1, translated to this time convention).
    """
    return velocity + noise_estimate(x_t, t, velocity)


def sde_diffusion(t: float) -> float:
    """Return g(t) = sqrt(2t), the noise scale of the reverse SDE whose drift is `sde_drift`."""
    return math.sqrt(2 * t)


def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Apply the timestep shift t' = s * t / (1 + (s - 1) * t); s > 1 moves times toward noise.

    The map fixes 0 and 1. LightningDiT's sampling shift 0.3 (its reversed time) is s = 1/0.3
    here, and the FAE paper's "shift 0.4" is s = 2.5.
    """
    if shift <= 0:
        raise FaeError(f"invalid timestep shift {shift}: use a value > 0 (1 = no shift)")
    if shift == 1:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_time(
    n: int,
    distribution: TimeDistribution = "uniform",
    *,
    shift: float = 1.0,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw n training times in [0, 1]: uniform or logit-normal(0, 1), then shifted.

    Logit-normal(0, 1) is t = sigmoid(n), n ~ N(0, 1) (LightningDiT's `use_lognorm`; it is
    symmetric about 1/2, so it is the same law in either time convention).
    """
    if distribution == "uniform":
        t = torch.rand(n, device=device, generator=generator)
    elif distribution == "logit-normal":
        t = torch.sigmoid(torch.randn(n, device=device, generator=generator))
    else:
        raise FaeError(f"unknown time distribution {distribution!r}: use 'uniform' or 'logit-normal'")
    return shift_time(t, shift)


@dataclass
class LossTerms:
    """Per-sample training losses (N,): `loss` = mse + cos_weight * cos, the one to minimise."""

    loss: torch.Tensor
    mse: torch.Tensor
    cos: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """Return batch means of the three terms as floats, for logging."""
        return {"loss": self.loss.mean().item(), "mse": self.mse.mean().item(), "cos": self.cos.mean().item()}


def velocity_loss(prediction: torch.Tensor, target: torch.Tensor, cos_weight: float = 0.0) -> LossTerms:
    """Return per-sample MSE over all non-batch dims and the cosine term along channels.

    The cosine term (LightningDiT's `use_cosine_loss`) is the mean over latent positions of
    1 - cos(prediction, target), the cosine taken across the C channels of each position. It
    is always reported; it enters `loss` only when `cos_weight` > 0.
    """
    prediction = prediction.float()
    target = target.float()
    dims = tuple(range(1, prediction.dim()))
    mse = (prediction - target).pow(2).mean(dim=dims)
    cos = (1 - F.cosine_similarity(prediction, target, dim=1)).flatten(1).mean(dim=1)
    loss = mse + cos_weight * cos if cos_weight > 0 else mse
    return LossTerms(loss=loss, mse=mse, cos=cos if cos_weight > 0 else cos.detach())


@dataclass(frozen=True)
class Transport:
    """Flow-matching training settings: time distribution, training shift and cosine weight."""

    time_distribution: TimeDistribution = "logit-normal"
    train_shift: float = 1.0
    cos_weight: float = 0.0

    @classmethod
    def from_config(cls, config: Any) -> Transport:
        """Build from a recipe's `[generator]` section (`time_dist`, `train_shift`, `cos_loss_weight`)."""
        return cls(time_distribution=config.time_dist, train_shift=config.train_shift, cos_weight=config.cos_loss_weight)

    def loss(
        self,
        model: Velocity,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> LossTerms:
        """Draw times and noise for data x (N x C x H x W), run the model, return the loss terms."""
        t = sample_time(x.shape[0], self.time_distribution, shift=self.train_shift, device=x.device, generator=generator)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        prediction = model(interpolate(x, noise, t), t, y)
        return velocity_loss(prediction, velocity_target(x, noise), self.cos_weight)


# ----------------------------------------------------------------------------------------------
# Latent normalisation


@dataclass(frozen=True)
class LatentStats:
    """Per-channel mean and std of a latent cache, with the encoder and adapter that produced it.

    A generator trains on (z - mean) / std and samples are mapped back with z * std + mean, so
    the statistics are stored beside the generator and must match the latents it meets later.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    encoder: str
    adapter: str

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise FaeError(f"invalid latent statistics: {len(self.mean)} means but {len(self.std)} stds")
        bad = [value for value in self.std if not (math.isfinite(value) and value > 0)]
        if bad:
            raise FaeError(f"invalid latent statistics: std {bad[0]} is not a positive number; re-extract the latent cache")

    @property
    def channels(self) -> int:
        return len(self.mean)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> LatentStats:
        """Read the statistics and the producer identity from a latent cache manifest."""
        missing = [key for key in ("encoder", "adapter", "latent_channels", "mean", "std") if key not in manifest]
        if missing:
            raise FaeError(f"latent cache manifest lacks {', '.join(missing)}: re-run `fae extract --latents`")
        stats = cls(
            mean=tuple(float(value) for value in manifest["mean"]),
            std=tuple(float(value) for value in manifest["std"]),
            encoder=str(manifest["encoder"]),
            adapter=_identity(manifest["adapter"]),
        )
        check_compatible("latent channels", manifest["latent_channels"], stats.channels, expected_from="manifest field", actual_from="its mean/std lists")
        return stats

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict, read back by `from_dict`."""
        return {"mean": list(self.mean), "std": list(self.std), "encoder": self.encoder, "adapter": self.adapter}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatentStats:
        return cls(mean=tuple(data["mean"]), std=tuple(data["std"]), encoder=data["encoder"], adapter=data["adapter"])

    def check_matches(self, other: LatentStats, *, expected_from: str, actual_from: str) -> None:
        """Raise FaeError naming both values when `other` comes from another encoder, adapter or width."""
        check_compatible("latent encoder", self.encoder, other.encoder, expected_from=expected_from, actual_from=actual_from)
        check_compatible("latent adapter", self.adapter, other.adapter, expected_from=expected_from, actual_from=actual_from)
        check_compatible("latent channels", self.channels, other.channels, expected_from=expected_from, actual_from=actual_from)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Map latents N x C x H x W to (z - mean) / std per channel."""
        mean, std = self._broadcast(z)
        return (z - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Invert `normalize`: z * std + mean per channel."""
        mean, std = self._broadcast(z)
        return z * std + mean

    def _broadcast(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_compatible("latent channels", self.channels, z.shape[1], expected_from="the statistics", actual_from="the latents")
        shape = (1, self.channels) + (1,) * (z.dim() - 2)
        mean = torch.tensor(self.mean, dtype=z.dtype, device=z.device).view(shape)
        std = torch.tensor(self.std, dtype=z.dtype, device=z.device).view(shape)
        return mean, std


def _identity(value: Any) -> str:
    """Return a comparable string for an adapter identity stored as a string or a mapping.

    A mapping (e.g. path and recipe hash) is reduced to its recipe hash when it has one, because
    the same adapter may be read from a moved folder.
    """
    if isinstance(value, dict):
        if "recipe_hash" in value:
            return str(value["recipe_hash"])
        return ",".join(f"{key}={value[key]}" for key in sorted(value))
    return str(value)
