"""Linear interpolant, time sampling, shift, training loss and latent normalisation."""

from __future__ import annotations

import math

import pytest
import torch

from fae_cli.diffusion.transport import (
    LatentStats,
    Transport,
    data_estimate,
    interpolate,
    noise_estimate,
    sample_time,
    shift_time,
    velocity_loss,
    velocity_target,
)
from fae_cli.errors import FaeError


def test_interpolant_endpoints():
    x = torch.randn(2, 3, 4, 4)
    noise = torch.randn(2, 3, 4, 4)
    assert torch.equal(interpolate(x, noise, torch.zeros(2)), x)
    assert torch.equal(interpolate(x, noise, torch.ones(2)), noise)
    assert torch.equal(velocity_target(x, noise), noise - x)


def test_estimates_recover_data_and_noise():
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    noise = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.1, 0.4, 0.7, 1.0], dtype=torch.float64)
    x_t = interpolate(x, noise, t)
    v = velocity_target(x, noise)
    torch.testing.assert_close(data_estimate(x_t, t, v), x)
    torch.testing.assert_close(noise_estimate(x_t, t, v), noise)


def test_shift_fixes_ends_and_moves_toward_noise():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    shifted = shift_time(t, 3.0)
    assert shifted.tolist() == [0.0, 0.75, 1.0]
    torch.testing.assert_close(shift_time(shifted, 1 / 3.0), t)


def test_shift_rejects_nonpositive():
    with pytest.raises(FaeError, match="-1"):
        shift_time(0.5, -1.0)


def test_sample_time_uniform_and_logit_normal():
    generator = torch.Generator().manual_seed(0)
    uniform = sample_time(20_000, "uniform", generator=generator)
    assert abs(uniform.mean().item() - 0.5) < 0.01

    logit_normal = sample_time(20_000, "logit-normal", generator=generator)
    logits = torch.logit(logit_normal.double())
    assert abs(logits.mean().item()) < 0.03
    assert abs(logits.std().item() - 1.0) < 0.02


def test_sample_time_train_shift():
    generator = torch.Generator().manual_seed(0)
    shifted = sample_time(20_000, "uniform", shift=3.0, generator=generator)
    # For t' = 3t / (1 + 2t) with t ~ U(0, 1): E[t'] = 3/2 - 3 ln(3) / 4 = 0.6760.
    expected = 1.5 - 3 * math.log(3) / 4
    assert abs(shifted.mean().item() - expected) < 0.01


def test_velocity_loss_values():
    target = torch.randn(2, 4, 3, 3)
    perfect = velocity_loss(target, target, cos_weight=1.0)
    assert perfect.mse.abs().max().item() == 0
    assert perfect.cos.abs().max().item() < 1e-6

    flipped = velocity_loss(-target, target, cos_weight=0.5)
    expected_mse = (4 * target.pow(2)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(flipped.mse, expected_mse)
    torch.testing.assert_close(flipped.cos, torch.full((2,), 2.0))
    torch.testing.assert_close(flipped.loss, expected_mse + 1.0)


def test_velocity_loss_without_cos_weight_is_mse():
    prediction = torch.randn(2, 4, 3, 3, requires_grad=True)
    terms = velocity_loss(prediction, torch.randn(2, 4, 3, 3))
    assert torch.equal(terms.loss, terms.mse)
    assert not terms.cos.requires_grad


def test_transport_loss_zero_for_exact_velocity():
    x = torch.randn(8, 4, 2, 2)

    # The exact target follows from x_t alone when x is known: x_t - x = t * (noise - x).
    def oracle(x_t, t, y):
        return (x_t - x) / t.view(-1, 1, 1, 1)

    transport = Transport(time_distribution="uniform", train_shift=2.0, cos_weight=1.0)
    terms = transport.loss(oracle, x, generator=torch.Generator().manual_seed(0))
    assert terms.mse.max().item() < 1e-8
    assert terms.cos.max().item() < 1e-5


def _stats(channels=3, encoder="dinov2-b", adapter="adapter-1"):
    generator = torch.Generator().manual_seed(channels)
    mean = torch.randn(channels, generator=generator).tolist()
    std = (torch.rand(channels, generator=generator) * 2 + 0.5).tolist()
    return LatentStats(mean=tuple(mean), std=tuple(std), encoder=encoder, adapter=adapter)


def test_normalize_roundtrip_identity():
    stats = _stats()
    z = torch.randn(4, 3, 5, 5) * 3 + 1
    back = stats.denormalize(stats.normalize(z))
    torch.testing.assert_close(back, z, atol=1e-6, rtol=1e-6)


def test_normalize_gives_unit_channels():
    z = torch.randn(64, 3, 8, 8, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64).view(1, 3, 1, 1) + 4
    mean = z.mean(dim=(0, 2, 3))
    std = z.std(dim=(0, 2, 3))
    stats = LatentStats(mean=tuple(mean.tolist()), std=tuple(std.tolist()), encoder="e", adapter="a")
    normalized = stats.normalize(z)
    torch.testing.assert_close(normalized.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(normalized.std(dim=(0, 2, 3)), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize(
    ("other", "names"),
    [
        (dict(encoder="siglip2-b"), ("dinov2-b", "siglip2-b")),
        (dict(adapter="adapter-2"), ("adapter-1", "adapter-2")),
        (dict(channels=4), ("3", "4")),
    ],
)
def test_stats_mismatch_rejected(other, names):
    with pytest.raises(FaeError) as error:
        _stats().check_matches(_stats(**other), expected_from="generator", actual_from="latent cache")
    for name in names:
        assert name in str(error.value)


def test_normalize_rejects_wrong_channel_count():
    with pytest.raises(FaeError, match="latent channels"):
        _stats(channels=3).normalize(torch.zeros(1, 4, 2, 2))


def test_stats_from_manifest_and_dict():
    manifest = {
        "encoder": "dinov2-b",
        "adapter": {"path": "/runs/a/adapter", "recipe_hash": "abc123"},
        "latent_channels": 2,
        "mean": [0.5, -0.5],
        "std": [1.5, 2.0],
    }
    stats = LatentStats.from_manifest(manifest)
    assert stats.adapter == "abc123"
    assert stats.channels == 2
    assert LatentStats.from_dict(stats.to_dict()) == stats


def test_stats_from_manifest_missing_keys():
    with pytest.raises(FaeError, match="mean, std"):
        LatentStats.from_manifest({"encoder": "e", "adapter": "a", "latent_channels": 2})


def test_stats_reject_zero_std():
    with pytest.raises(FaeError, match="std 0.0"):
        LatentStats(mean=(0.0,), std=(0.0,), encoder="e", adapter="a")
