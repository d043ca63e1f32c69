"""Samplers against an exact velocity field, time grids, NFE and guidance with stub models."""

from __future__ import annotations

import pytest
import torch

from fae_cli.diffusion.samplers import (
    SDE_LAST_STEP,
    Guidance,
    GuidedField,
    guidance_schedule,
    sample,
    sampler_nfe,
    scale_at,
    time_grid,
)
from fae_cli.diffusion.transport import shift_time
from fae_cli.errors import FaeError

# 1-D Gaussian data N(MU, SIGMA^2). Normalised latents have unit std per channel; the mean sits
# two noise stds away so that reaching it takes real transport.
MU, SIGMA = 2.0, 1.0


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Exact E[noise - data | x_t] for data N(MU, SIGMA^2) under x_t = (1 - t) x + t noise.

    With a = 1 - t and var = a^2 SIGMA^2 + t^2, E[noise | x_t] = t / var * r and
    E[data | x_t] = MU + a SIGMA^2 / var * r, where r = x_t - a MU. Every sample shares one t.
    """
    time = float(t[0])
    a = 1 - time
    variance = a**2 * SIGMA**2 + time**2
    return (time - a * SIGMA**2) / variance * (x - a * MU) - MU


def _standard_noise(n: int) -> torch.Tensor:
    # Exactly zero mean and unit std, so ODE results carry no Monte-Carlo error.
    noise = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return ((noise - noise.mean()) / noise.std()).float()


@pytest.mark.parametrize("shift", [1.0, 2.5])
@pytest.mark.parametrize("sampler", ["euler", "heun", "sde"])
def test_sampler_reaches_gaussian_target(sampler, shift):
    # The ODE map of this affine field is affine, so standardised noise gives exact moments at
    # any sample count. The SDE draws fresh noise and needs many samples (std error ~0.2%).
    count = 100_000 if sampler == "sde" else 2_000
    result = sample(
        gaussian_velocity,
        _standard_noise(count),
        sampler=sampler,
        steps=100,
        shift=shift,
        generator=torch.Generator().manual_seed(1),
    )
    samples = result.latents.double()
    assert abs(samples.mean().item() / MU - 1) < 0.02
    assert abs(samples.std().item() / SIGMA - 1) < 0.02


def test_one_euler_step_moves_to_data_mean():
    noise = _standard_noise(1000)
    result = sample(gaussian_velocity, noise, sampler="euler", steps=1)
    # At t = 1 the exact velocity is x - MU, so one step of size 1 lands on E[data] = MU.
    assert ((result.latents - MU).abs() < (noise - MU).abs()).all()
    torch.testing.assert_close(result.latents, torch.full_like(noise, MU))


@pytest.mark.parametrize(("sampler", "nfe"), [("euler", 10), ("heun", 19), ("sde", 10)])
def test_sampler_nfe(sampler, nfe):
    result = sample(gaussian_velocity, torch.zeros(2, 1, 1, 1), sampler=sampler, steps=10)
    assert result.nfe == nfe
    assert sampler_nfe(sampler, 10) == nfe


def test_time_grid_float64_and_shifted():
    grid = time_grid(8, shift=2.5)
    assert grid.dtype == torch.float64
    assert grid[0].item() == 1.0
    assert grid[-1].item() == 0.0
    assert (grid[1:] < grid[:-1]).all()
    uniform = torch.linspace(1, 0, 9, dtype=torch.float64)
    torch.testing.assert_close(grid, shift_time(uniform, 2.5))


def test_sde_grid_ends_at_last_step():
    result = sample(gaussian_velocity, torch.zeros(1, 1, 1, 1), sampler="sde", steps=5, shift=2.5)
    assert result.times.numel() == 5
    assert result.times[0].item() == 1.0
    assert result.times[-1].item() == pytest.approx(SDE_LAST_STEP)


def test_sde_per_sample_generators_independent_of_batching():
    noise = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(3))

    def generators(indices):
        return [torch.Generator().manual_seed(100 + i) for i in indices]

    whole = sample(gaussian_velocity, noise, sampler="sde", steps=6, generator=generators(range(4))).latents
    first = sample(gaussian_velocity, noise[:2], sampler="sde", steps=6, generator=generators(range(2))).latents
    second = sample(gaussian_velocity, noise[2:], sampler="sde", steps=6, generator=generators(range(2, 4))).latents
    assert torch.equal(whole, torch.cat([first, second]))


# ----------------------------------------------------------------------------------------------
# Guidance with stub models: conditional output 1, unconditional (null class) output 0.

NULL = 10


class StubModel:
    """Stub velocity: 1 on every channel for labelled rows, 0 for null rows, with a call log."""

    def __init__(self, value: float = 1.0) -> None:
        self.value = value
        self.calls = 0
        self.null_rows = 0
        self.labels: list[torch.Tensor] = []

    def __call__(self, x, t, y):
        self.calls += 1
        self.labels.append(y.clone())
        is_null = (y == NULL).view(-1, 1, 1, 1)
        self.null_rows += int(is_null.sum())
        return torch.where(is_null, torch.zeros_like(x), torch.full_like(x, self.value))


@pytest.mark.parametrize("scale", [0.5, 2.5, 4.0])
def test_cfg_every_channel_equals_scale(scale):
    model = StubModel()
    labels = torch.tensor([0, 3, 7])
    field = GuidedField(model, labels, Guidance(guidance_schedule(cfg_scale=scale), null_class=NULL))
    velocity = field(torch.zeros(3, 5, 2, 2), 0.5)
    assert torch.equal(velocity, torch.full((3, 5, 2, 2), scale))


def test_cfg_sample_integrates_scale():
    model = StubModel()
    guidance = Guidance(guidance_schedule(cfg_scale=2.0), null_class=NULL)
    result = sample(model, torch.zeros(2, 4, 2, 2), torch.tensor([1, 2]), steps=5, guidance=guidance)
    # dx/dt = 2 integrated from t = 1 to t = 0 gives -2.
    torch.testing.assert_close(result.latents, torch.full((2, 4, 2, 2), -2.0))
    assert result.guided_nfe == 5


def test_cfg_scale_one_makes_no_unconditional_call():
    model = StubModel()
    guidance = Guidance(guidance_schedule(cfg_scale=1.0), null_class=NULL)
    result = sample(model, torch.zeros(2, 4, 2, 2), torch.tensor([1, 2]), steps=7, guidance=guidance)
    assert model.calls == 7
    assert model.null_rows == 0
    assert result.guided_nfe == 0


def test_guidance_schedule_intervals():
    # FAE paper's guided schedule: 0.9 on [1, 0.9], none on (0.9, 0.7), 2.5 on [0.7, 0].
    schedule = guidance_schedule([(1.0, 0.9, 0.9), (0.7, 0.0, 2.5)])
    assert scale_at(schedule, 0.95) == 0.9
    assert scale_at(schedule, 0.8) == 1.0
    assert scale_at(schedule, 0.3) == 2.5
    assert scale_at(schedule, 0.7 + 1e-12) == 2.5

    model = StubModel()
    result = sample(model, torch.zeros(1, 2, 1, 1), torch.tensor([4]), steps=10, guidance=Guidance(schedule, null_class=NULL))
    # Of the grid times 1.0, 0.9, ..., 0.1, only 0.8 lies between the intervals.
    assert result.guided_nfe == 9
    assert model.null_rows == 9


def test_guidance_first_interval_wins_at_shared_end():
    schedule = guidance_schedule([(1.0, 0.5, 2.0), (0.5, 0.0, 3.0)])
    assert scale_at(schedule, 0.5) == 2.0
    assert scale_at(schedule, 0.5 + 1e-12) == 2.0


def test_guidance_outside_intervals_is_unguided():
    schedule = guidance_schedule([(0.5, 0.2, 3.0)])
    assert scale_at(schedule, 0.7) == 1.0
    assert scale_at(schedule, 0.1) == 1.0


def test_cfg_scale_replaces_interval_scales():
    schedule = guidance_schedule([(1.0, 0.9, 0.9), (0.7, 0.0, 2.5)], cfg_scale=1.5)
    assert [interval.scale for interval in schedule] == [1.5, 1.5]
    assert [interval.t_from for interval in schedule] == [1.0, 0.7]


def test_cfg_scale_alone_covers_whole_range():
    schedule = guidance_schedule(cfg_scale=3.0)
    assert scale_at(schedule, 1.0) == 3.0
    assert scale_at(schedule, 0.0) == 3.0


def test_guidance_interval_order_checked():
    with pytest.raises(FaeError, match="t_from=0.2"):
        guidance_schedule([(0.2, 0.7, 2.0)])


def test_autoguidance_uses_guide_with_same_labels():
    main = StubModel(value=1.0)
    guide = StubModel(value=0.0)
    labels = torch.tensor([2, 5])
    field = GuidedField(main, labels, Guidance(guidance_schedule(cfg_scale=1.7), guide=guide))
    velocity = field(torch.zeros(2, 3, 2, 2), 0.4)
    torch.testing.assert_close(velocity, torch.full((2, 3, 2, 2), 1.7))
    assert torch.equal(guide.labels[0], labels)
    assert main.null_rows == 0


def test_guidance_needs_one_source():
    with pytest.raises(FaeError, match="exactly one"):
        Guidance(guidance_schedule(cfg_scale=2.0))


def test_cfg_without_labels_rejected():
    with pytest.raises(FaeError, match="labels"):
        sample(StubModel(), torch.zeros(1, 1, 1, 1), None, steps=2, guidance=Guidance(guidance_schedule(cfg_scale=2.0), null_class=NULL))


def test_unknown_sampler_rejected():
    with pytest.raises(FaeError, match="rk4"):
        sample(gaussian_velocity, torch.zeros(1, 1, 1, 1), sampler="rk4")
