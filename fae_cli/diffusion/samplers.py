"""Samplers for velocity models: Euler and Heun ODE, Euler-Maruyama SDE, guidance schedules.

Every sampler integrates from pure noise at t = 1 down to data at t = 0 on a float64 time grid
(optionally shifted, see `transport.shift_time`) and calls the model through one function,
`velocity(x, t, y)`, so any generator with that signature works.

Guidance is a schedule of (t_from, t_to, scale) intervals. The guided velocity is
v_u + w * (v_c - v_u) on every latent channel. v_u comes from the null class (classifier-free
guidance) or from a weaker guide model called with the same labels (autoguidance, Karras et al.
2024). Where w = 1 the second pass is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fae_cli.diffusion.transport import Velocity, sde_diffusion, sde_drift, shift_time
from fae_cli.errors import FaeError

SamplerName = Literal["euler", "heun", "sde"]
SAMPLERS = ("euler", "heun", "sde")

# The SDE integrates down to this time, then takes one noise-free drift step to t = 0 (SiT's
# "Mean" last step, also used by REPA): the last stochastic steps only add noise the model
# cannot remove.
SDE_LAST_STEP = 0.04

BOUNDARY_TOLERANCE = 1e-9  # guidance interval ends, against float64 rounding of grid times


# ----------------------------------------------------------------------------------------------
# Guidance schedule


@dataclass(frozen=True)
class GuidanceInterval:
    """Guidance scale w for t in [t_to, t_from]; t_from is the end nearer the noise."""

    t_from: float
    t_to: float
    scale: float


def guidance_schedule(intervals: Iterable[Any] = (), cfg_scale: float | None = None) -> tuple[GuidanceInterval, ...]:
    """Build a validated schedule from intervals (objects with t_from, t_to, scale, or tuples).

    `cfg_scale` replaces the scale of every interval, or applies over [0, 1] when there are none.
    """
    schedule = []
    for item in intervals:
        interval = GuidanceInterval(*item) if isinstance(item, tuple) else GuidanceInterval(item.t_from, item.t_to, item.scale)
        if not 0 <= interval.t_to <= interval.t_from <= 1:
            raise FaeError(
                f"invalid guidance interval t_from={interval.t_from}, t_to={interval.t_to}: "
                "use 1 >= t_from >= t_to >= 0 (t = 1 is noise, t = 0 is data)"
            )
        schedule.append(interval)

    if cfg_scale is not None:
        if not schedule:
            return (GuidanceInterval(1.0, 0.0, cfg_scale),)
        return tuple(GuidanceInterval(interval.t_from, interval.t_to, cfg_scale) for interval in schedule)
    return tuple(schedule)


def scale_at(schedule: Sequence[GuidanceInterval], t: float) -> float:
    """Return the guidance scale at time t: the first interval containing t wins, else 1.

    Intervals are closed. A grid time within 1e-9 of an end counts as inside, so that a time
    that float64 rounding puts just past an end (a shifted grid point) still counts as inside.
    """
    for interval in schedule:
        if interval.t_to - BOUNDARY_TOLERANCE <= t <= interval.t_from + BOUNDARY_TOLERANCE:
            return interval.scale
    return 1.0


@dataclass(frozen=True)
class Guidance:
    """A guidance schedule and where the unguided velocity comes from.

    Set `null_class` for classifier-free guidance (the same model with the null label), or
    `guide` for autoguidance (a weaker model called with the same labels).
    """

    schedule: tuple[GuidanceInterval, ...]
    null_class: int | None = None
    guide: Velocity | None = None

    def __post_init__(self) -> None:
        if (self.null_class is None) == (self.guide is None):
            raise FaeError("guidance needs exactly one source of the unguided velocity: a null class (CFG) or a guide model (autoguidance)")


class GuidedField:
    """The velocity the solvers integrate: the model with guidance applied, counting evaluations.

    `nfe` counts velocity evaluations, one per solver stage. `guided_nfe` counts those that ran
    a second pass (unconditional or guide) because the scale there differs from 1.
    """

    def __init__(self, velocity: Velocity, labels: torch.Tensor | None, guidance: Guidance | None) -> None:
        if guidance is not None and guidance.null_class is not None and labels is None:
            raise FaeError("classifier-free guidance needs class labels: sample from a class-conditional generator or drop the guidance")
        self.velocity = velocity
        self.labels = labels
        self.guidance = guidance
        self.nfe = 0
        self.guided_nfe = 0

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        self.nfe += 1
        times = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
        scale = 1.0 if self.guidance is None else scale_at(self.guidance.schedule, t)
        if scale == 1.0:
            return self.velocity(x, times, self.labels).float()

        self.guided_nfe += 1
        guidance = self.guidance
        if guidance.guide is not None:
            conditional = self.velocity(x, times, self.labels).float()
            unguided = guidance.guide(x, times, self.labels).float()
        else:
            # One forward on the doubled batch [conditional; null] instead of two calls.
            null = torch.full_like(self.labels, guidance.null_class)
            both = self.velocity(torch.cat([x, x]), torch.cat([times, times]), torch.cat([self.labels, null])).float()
            conditional, unguided = both.chunk(2)
        return unguided + scale * (conditional - unguided)


# ----------------------------------------------------------------------------------------------
# Time grid and solvers


def time_grid(steps: int, shift: float = 1.0, end: float = 0.0) -> torch.Tensor:
    """Return steps + 1 float64 times from 1 down to `end`, uniform before the shift.

    The shift acts on the position u in [0, 1] along [end, 1], t = end + (1 - end) * shift(u),
    so both ends stay fixed and the SDE's final drift step keeps its size for any shift.
    """
    position = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return end + (1 - end) * shift_time(position, shift)


def sampler_nfe(sampler: SamplerName, steps: int) -> int:
    """Return the velocity evaluations per sample of a sampler run with `steps` steps."""
    if sampler == "heun":
        return 2 * steps - 1  # the last step, to t = 0, is a plain Euler step
    return steps


def euler(field: GuidedField, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Integrate dx/dt = v backwards along `grid` with explicit Euler steps."""
    for t_now, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        x = x + (t_next - t_now) * field(x, t_now)
    return x


def heun(field: GuidedField, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Integrate with Heun's second-order method; the final step to t = 0 has no correction.

    The corrector would evaluate the model at t = 0 exactly, where it is least reliable and
    the step is already short (REPA's ODE sampler does the same).
    """
    times = grid.tolist()
    for i, (t_now, t_next) in enumerate(zip(times[:-1], times[1:])):
        step = t_next - t_now
        slope = field(x, t_now)
        predicted = x + step * slope
        if i == len(times) - 2:
            x = predicted
        else:
            x = x + step * 0.5 * (slope + field(predicted, t_next))
    return x


def euler_maruyama(
    field: GuidedField,
    x: torch.Tensor,
    grid: torch.Tensor,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Integrate the reverse SDE down to grid[-1], then take one noise-free drift step to t = 0."""
    times = grid.tolist()
    for t_now, t_next in zip(times[:-1], times[1:]):
        step = t_now - t_next
        drift = sde_drift(x, t_now, field(x, t_now))
        x = x - step * drift + sde_diffusion(t_now) * step**0.5 * _standard_normal(x, generator)

    t_last = times[-1]
    return x - t_last * sde_drift(x, t_last, field(x, t_last))


def _standard_normal(like: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Draw N(0, I) like `like`; a sequence of generators gives one per sample (batch-independent)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)
    if len(generator) != like.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {like.shape[0]} samples")
    draws = [torch.randn(like.shape[1:], dtype=like.dtype, device=like.device, generator=g) for g in generator]
    return torch.stack(draws)


@dataclass
class SampleResult:
    """Sampled latents, the time grid used and the velocity evaluations per sample."""

    latents: torch.Tensor
    times: torch.Tensor
    nfe: int
    guided_nfe: int


@torch.no_grad()
def sample(
    velocity: Velocity,
    noise: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    sampler: SamplerName = "euler",
    steps: int = 250,
    shift: float = 1.0,
    guidance: Guidance | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> SampleResult:
    """Map noise at t = 1 (N x C x H x W) to latents at t = 0.

    `steps` is the number of solver steps: Euler takes `steps` evaluations, Heun 2 * steps - 1,
    and the SDE `steps` (steps - 1 stochastic steps on a grid from 1 to 0.04, then the final
    drift step). `generator` drives the SDE noise; pass one generator per sample to make each
    sample independent of how samples are batched.
    """
    if sampler not in SAMPLERS:
        raise FaeError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise FaeError(f"invalid number of sampling steps {steps}: use 1 or more")

    guided = GuidedField(velocity, labels, guidance)
    x = noise.float()
    if sampler == "sde":
        grid = time_grid(steps - 1, shift, end=SDE_LAST_STEP)
        x = euler_maruyama(guided, x, grid, generator)
    else:
        grid = time_grid(steps, shift)
        x = euler(guided, x, grid) if sampler == "euler" else heun(guided, x, grid)
    return SampleResult(latents=x, times=grid, nfe=guided.nfe, guided_nfe=guided.guided_nfe)
