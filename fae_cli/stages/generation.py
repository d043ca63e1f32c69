"""A trained latent generator and the path from per-sample noise to uint8 images.

Shared by `train-generator` (its periodic sample grids) and `sample`:
- `build_generator` / `load_generator`: the model of a family ('diffusion': SiT/LightningDiT,
  'flow': STARFlow) with the latent statistics it was trained with, rebuilt from the facts in
  the checkpoint header (`fae.generator`), so no recipe is needed.
- `draw_inputs`: sample i's label and noise come from `sample_generator(seed, i)` alone.
- `LatentSampler`: the recipe's sampler, steps, shift and guidance applied to one batch.
- `ImageDecoder`: latents -> FAE feature decoder -> pixel decoder -> images in [-1, 1].
- `to_uint8`, `image_grid`, `png_bytes`.

Batch invariance: on CPU, a matrix product of 1 to 3 rows takes other kernels than a larger
one, so its float32 results differ in the last bits. `generate_images` therefore pads every
model call to the full batch size, and sample i comes out bit-identical for any batch size of
4 or more and any number of ranks (checked on CPU by tests/test_sample.py).
NOTE: GPU libraries choose kernels by shape as well; there, different batch sizes may change
a few pixel values by 1.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from fae_cli.diffusion.samplers import Guidance, guidance_schedule, sample
from fae_cli.diffusion.transport import LatentStats
from fae_cli.errors import FaeError
from fae_cli.models.dit import build_dit
from fae_cli.models.fae import FAE
from fae_cli.models.flow import FlowGuidance, build_flow, flow_from_config
from fae_cli.models.pixel_decoder import PixelDecoder
from fae_cli.recipe import GeneratorConfig, Recipe, SampleConfig
from fae_cli.stages.adapter import load_adapter
from fae_cli.stages.decoders import check_adapter, load_pixel_decoder
from fae_cli.stages.latents import adapter_identity
from fae_cli.stages.plan import RunPaths
from fae_cli.training.checkpoint import (
    EMA_FILE,
    MODEL_FILE,
    load_checkpoint,
    read_checkpoint_header,
    resolve_checkpoint,
)
from fae_cli.training.distributed import sample_generator

log = logging.getLogger(__name__)

KIND = "generator"
# Checkpoint header key of the facts that rebuild the model and check its latents.
MODEL_KEY = "fae.generator"
FAMILIES = ("diffusion", "flow")


# ----------------------------------------------------------------------------------------------
# Models


def build_generator(
    config: GeneratorConfig, channels: int, grid: tuple[int, int]
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the recipe's generator for latents `channels` x `grid`; return it and the spec that rebuilds it."""
    if config.family == "diffusion":
        spec = {
            "name": config.model,
            "in_channels": channels,
            "input_size": list(grid),
            "num_classes": config.num_classes,
            "label_drop": config.label_drop,
            "qk_norm": config.qk_norm,
        }
        return model_from_spec("diffusion", spec), spec

    if grid[0] != grid[1]:
        raise FaeError(
            f"the flow family needs a square latent grid, the latent cache has {grid[0]} x {grid[1]}; use generator.family='diffusion'"
        )
    model = build_flow(
        config.model,
        in_channels=channels,
        input_size=grid[0],
        num_classes=config.num_classes,
        label_drop=config.label_drop,
        noise_sigma=config.flow_noise_sigma,
    )
    return model, model.config.to_dict()


def model_from_spec(family: str, spec: dict[str, Any]) -> nn.Module:
    """Rebuild a generator from the spec `build_generator` returned."""
    if family == "diffusion":
        return build_dit(
            spec["name"],
            in_channels=spec["in_channels"],
            input_size=tuple(spec["input_size"]),
            num_classes=spec["num_classes"],
            label_drop=spec["label_drop"],
            qk_norm=spec["qk_norm"],
        )
    if family == "flow":
        return flow_from_config(spec)
    raise FaeError(f"unknown generator family {family!r}: use one of {', '.join(FAMILIES)}")


@dataclass
class Generator:
    """A generator in eval mode with the latent statistics and facts of its training."""

    family: str
    model: nn.Module
    stats: LatentStats
    facts: dict[str, Any]  # the checkpoint header entry MODEL_KEY
    checkpoint: Path | None = None
    step: int = 0
    ema: bool = False  # whether the EMA weights were loaded
    weights_hash: str = ""  # first 16 hex digits of sha256 over the loaded weights file

    @property
    def num_classes(self) -> int:
        return int(self.facts["spec"]["num_classes"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        rows, cols = self.facts["latents"]["grid"]
        return self.stats.channels, int(rows), int(cols)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_generator(
    path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True
) -> Generator:
    """Load a generator from its artefact folder or a checkpoint folder, EMA weights by default."""
    folder = resolve_checkpoint(path)
    header = read_checkpoint_header(folder)
    if header.get("fae.kind") != KIND:
        raise FaeError(
            f"{folder} is a {header.get('fae.kind')!r} checkpoint, expected {KIND!r} (a folder written by fae train-generator)"
        )
    if MODEL_KEY not in header:
        raise FaeError(
            f"{folder} has no generator description ({MODEL_KEY}) in its header; it was not written by fae train-generator"
        )
    facts = header[MODEL_KEY]
    model = model_from_spec(facts["family"], facts["spec"])
    checkpoint = load_checkpoint(folder, expect_kind=KIND, model=model, use_ema_as_model=use_ema)
    model.to(device).eval().requires_grad_(False)
    ema = use_ema and checkpoint.has_ema
    if use_ema and not ema:
        log.warning("%s has no EMA weights: sampling with the raw weights", folder)
    weights = folder / (EMA_FILE if ema else MODEL_FILE)
    return Generator(
        family=facts["family"],
        model=model,
        stats=LatentStats.from_dict(facts["latent_stats"]),
        facts=facts,
        checkpoint=folder,
        step=checkpoint.step,
        ema=ema,
        weights_hash=file_hash(weights),
    )


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Per-sample labels and noise


def sample_labels(seed: int, indices: Sequence[int], num_classes: int, mode: str) -> torch.Tensor:
    """Return the labels of samples `indices`: i mod num_classes ('balanced') or drawn ('random'); -1 when unconditional."""
    return torch.tensor(
        [_label(sample_generator(seed, i), i, num_classes, mode) for i in indices], dtype=torch.long
    )


def _label(generator: torch.Generator, index: int, num_classes: int, mode: str) -> int:
    # The random label is the first draw of the sample's generator, so labels can be recomputed
    # without drawing the noise.
    if num_classes == 0:
        return -1
    if mode == "balanced":
        return index % num_classes
    return int(torch.randint(num_classes, (1,), generator=generator))


def draw_inputs(
    seed: int, indices: Sequence[int], shape: tuple[int, int, int], num_classes: int, mode: str
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Generator]]:
    """Return noise N x C x H x W, labels N and each sample's generator (left after the draws) for `indices`."""
    generators = [sample_generator(seed, i) for i in indices]
    labels = torch.tensor(
        [_label(g, i, num_classes, mode) for g, i in zip(generators, indices)], dtype=torch.long
    )
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return noise, labels, generators


# ----------------------------------------------------------------------------------------------
# Sampling latents


class LatentSampler:
    """The sampling settings of a recipe applied to a generator: noise + labels -> raw latents.

    Diffusion: `samplers.sample` with the recipe's sampler, steps, shift and guidance schedule,
    where `cfg_scale` replaces every interval's scale. The unguided velocity comes from the null
    class, or from `guide` (autoguidance). Flow: `model.sample` with one guidance scale
    (`cfg_scale`, or the schedule when all its intervals share one scale) and the recipe's
    denoising step.
    """

    def __init__(
        self, generator: Generator, config: SampleConfig, guide: Generator | None = None
    ) -> None:
        self.generator = generator
        self.config = config
        self.guide = guide
        if generator.family == "diffusion":
            self._setup_diffusion()
        else:
            self._setup_flow()

    def _setup_diffusion(self) -> None:
        config, generator = self.config, self.generator
        self.schedule = guidance_schedule(config.guidance, config.cfg_scale)
        guided = any(interval.scale != 1 for interval in self.schedule)
        self.guidance: Guidance | None = None
        if guided and self.guide is not None:
            self.guidance = Guidance(self.schedule, guide=_velocity(self.guide.model))
        elif guided:
            if generator.num_classes == 0:
                raise FaeError(
                    "classifier-free guidance needs a class-conditional generator; this one has num_classes = 0: drop sample.guidance and sample.cfg_scale"
                )
            self.guidance = Guidance(self.schedule, null_class=generator.num_classes)
        elif self.guide is not None:
            log.warning(
                "sample.guide_checkpoint is set but every guidance scale is 1: the guide model is not used"
            )
        self.nfe, self.guided_nfe = self._count_evaluations()

    def _setup_flow(self) -> None:
        config = self.config
        if self.guide is not None:
            raise FaeError(
                "sample.guide_checkpoint (autoguidance) applies to the diffusion family only; unset it for a flow"
            )
        scale = config.cfg_scale
        if scale is None and config.guidance:
            scales = {interval.scale for interval in config.guidance}
            if len(scales) > 1:
                raise FaeError(
                    "the flow family takes one guidance scale, not a schedule over time: set sample.cfg_scale"
                )
            scale = scales.pop()
        self.flow_scale = 1.0 if scale is None else float(scale)
        if self.flow_scale != 1 and self.generator.num_classes == 0:
            raise FaeError(
                "guidance needs a class-conditional flow; this one has num_classes = 0: drop sample.cfg_scale"
            )
        self.flow_guidance = (
            FlowGuidance(self.flow_scale, config.flow_guidance_form, config.flow_guidance_anneal)
            if self.flow_scale != 1
            else None
        )
        self.flow_sigma = (
            config.flow_denoise_sigma
            if config.flow_denoise_sigma is not None
            else float(self.generator.facts["spec"]["noise_sigma"])
        )

    def _count_evaluations(self) -> tuple[int, int]:
        """Return (velocity evaluations, evaluations with a second pass) per sample, from a dry run on a 1-element stub."""
        stub = Guidance(self.schedule, null_class=0) if self.guidance is not None else None
        result = sample(
            lambda x, t, y: torch.zeros_like(x),
            torch.zeros(1, 1, 1, 1),
            torch.zeros(1, dtype=torch.long),
            sampler=self.config.sampler,
            steps=self.config.steps,
            shift=self.config.shift,
            guidance=stub,
        )
        return result.nfe, result.guided_nfe

    def __call__(
        self, noise: torch.Tensor, labels: torch.Tensor, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """Return raw (denormalised) latents N x C x H x W for noise, labels and per-sample generators."""
        generator = self.generator
        device = generator.device
        noise, labels = noise.to(device), labels.to(device)
        if generator.family == "flow":
            return generator.model.sample(
                noise,
                labels if generator.num_classes else None,
                guidance=self.flow_guidance,
                denoise=self.config.flow_denoise,
                sigma_override=self.config.flow_denoise_sigma,
            )
        result = sample(
            _velocity(generator.model),
            noise,
            labels if generator.num_classes else None,
            sampler=self.config.sampler,
            steps=self.config.steps,
            shift=self.config.shift,
            guidance=self.guidance,
            generator=generators,
        )
        return generator.stats.denormalize(result.latents)

    def describe(self) -> dict[str, Any]:
        """Return the settings that determine the samples, for `sampling.json`."""
        config, generator = self.config, self.generator
        if generator.family == "flow":
            tokens = generator.latent_shape[1] * generator.latent_shape[2]
            blocks = len(generator.facts["spec"]["layers"])
            return {
                "sampler": "flow-inverse",
                "steps": tokens * blocks,  # one causal-transformer step per token and block
                "nfe": tokens * blocks,
                "guidance": None
                if self.flow_guidance is None
                else {
                    "scale": self.flow_scale,
                    "form": config.flow_guidance_form,
                    "anneal": config.flow_guidance_anneal,
                },
                "denoise": config.flow_denoise,
                "denoise_sigma": self.flow_sigma if config.flow_denoise else None,
                "shift": None,
            }
        return {
            "sampler": config.sampler,
            "steps": config.steps,
            "nfe": self.nfe,
            "guided_nfe": self.guided_nfe,
            "forward_passes": self.nfe + self.guided_nfe,
            "shift": config.shift,
            "guidance": [
                {"t_from": i.t_from, "t_to": i.t_to, "scale": i.scale} for i in self.schedule
            ],
            "guidance_source": None
            if self.guidance is None
            else ("autoguidance" if self.guide is not None else "null class"),
            "guide_checkpoint": None
            if self.guide is None
            else {"path": str(self.guide.checkpoint), "weights_hash": self.guide.weights_hash},
        }


def _velocity(model: nn.Module):
    def velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return model(x, t, y)

    return velocity


# ----------------------------------------------------------------------------------------------
# Decoding to images


class ImageDecoder:
    """Raw latents N x C x H x W -> FAE feature decoder -> pixel decoder -> images N x 3 x S x S in [-1, 1] (unclamped)."""

    def __init__(self, adapter: FAE, pixel_decoder: PixelDecoder) -> None:
        if (
            tuple(pixel_decoder.grid) != tuple(adapter.grid)
            or pixel_decoder.feature_width != adapter.width
        ):
            raise FaeError(
                f"the pixel decoder reads {pixel_decoder.grid[0]}x{pixel_decoder.grid[1]} tokens of width {pixel_decoder.feature_width}, "
                f"the adapter writes {adapter.grid[0]}x{adapter.grid[1]} tokens of width {adapter.width}; use a decoder trained on this adapter's encoder"
            )
        self.adapter = adapter
        self.pixel_decoder = pixel_decoder

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        tokens = latents.float().flatten(2).transpose(1, 2)
        return self.pixel_decoder(self.adapter.decode(tokens))


def find_decoders(
    recipe: Recipe,
    facts: dict[str, Any],
    device: torch.device,
    *,
    adapter: Path | None = None,
    decoder: Path | None = None,
    required: bool = True,
) -> tuple[ImageDecoder, dict[str, Any]] | None:
    """Load the adapter and pixel decoder that turn this generator's latents into images.

    Defaults: the adapter recorded in the latent cache (else `<run>/adapter`), and the run's
    fine-tuned pixel decoder when `decoder.finetune` is set (else, or when it is missing, the
    noise-phase one). The adapter must be the one the latents came from (recipe hash and step),
    and the pixel decoder must read its encoder's features. Returns the decoder and the facts
    `sampling.json` records. When not `required`, a missing or mismatched part returns None
    with a log line instead of raising.
    """
    paths = RunPaths.of(recipe)
    recorded = facts["latents"]["adapter"]
    adapter_candidates = (
        [Path(adapter)] if adapter is not None else [Path(recorded["path"]), paths.adapter]
    )
    phases = (
        [paths.decoder_finetune, paths.decoder_noise]
        if recipe.decoder.finetune
        else [paths.decoder_noise]
    )
    decoder_candidates = [Path(decoder)] if decoder is not None else phases
    try:
        adapter_path = _first_checkpoint(adapter_candidates, "adapter")
        decoder_path = _first_checkpoint(decoder_candidates, "pixel decoder")
        model, adapter_manifest = load_adapter(adapter_path, device=device)
        identity = adapter_identity(adapter_path, adapter_manifest)
        if (identity["recipe_hash"], identity["step"]) != (
            recorded["recipe_hash"],
            recorded["step"],
        ):
            raise FaeError(
                f"adapter {adapter_path} (recipe hash {identity['recipe_hash']}, step {identity['step']}) is not the adapter the generator's "
                f"latents came from (recipe hash {recorded['recipe_hash']}, step {recorded['step']}, {recorded['path']}); pass that adapter"
            )
        pixel_decoder, decoder_manifest = load_pixel_decoder(decoder_path, device=device)
        check_adapter(
            decoder_manifest,
            adapter_manifest,
            decoder_from=f"pixel decoder {decoder_path}",
            adapter_from=f"adapter {adapter_path}",
        )
    except FaeError as error:
        if required:
            raise
        log.info("sample grids are skipped: %s", error)
        return None
    used = {
        "adapter": identity,
        "pixel_decoder": {
            "path": str(decoder_path.resolve()),
            "phase": decoder_manifest.get("phase"),
            "step": decoder_manifest.get("step"),
        },
    }
    return ImageDecoder(model, pixel_decoder), used


def _first_checkpoint(candidates: list[Path], what: str) -> Path:
    for path in candidates:
        try:
            resolve_checkpoint(path)
        except FaeError:
            continue
        return path
    raise FaeError(
        f"no {what} checkpoint found at {' or '.join(str(path) for path in candidates)}; train it first or pass its folder"
    )


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Map images N x 3 x H x W in [-1, 1] to uint8 N x H x W x 3: clamp, then round (x + 1) * 127.5 half up.

    -1 -> 0, 0 -> 128, 1 -> 255.
    """
    scaled = torch.floor((images.float().clamp(-1, 1) + 1) * 127.5 + 0.5)
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate_latents(
    sampler: LatentSampler, seed: int, indices: Sequence[int], batch_size: int, label_mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return raw latents and labels of `batch_size` rows: samples `indices` first, then padding.

    The padding rows (copies of the first sample) give every model call the same shape; see
    the module docstring.
    """
    count = len(indices)
    if not 0 < count <= batch_size:
        raise ValueError(f"a batch takes 1 to {batch_size} indices, got {count}")
    generator = sampler.generator
    noise, labels, generators = draw_inputs(
        seed, indices, generator.latent_shape, generator.num_classes, label_mode
    )
    pad = batch_size - count
    if pad:
        noise = torch.cat([noise, noise[:1].expand(pad, -1, -1, -1)])
        labels = torch.cat([labels, labels[:1].expand(pad)])
        generators = generators + [sample_generator(seed, indices[0]) for _ in range(pad)]
    return sampler(noise, labels, generators), labels


@torch.no_grad()
def generate_images(
    sampler: LatentSampler,
    decoder: ImageDecoder,
    seed: int,
    indices: Sequence[int],
    batch_size: int,
    label_mode: str,
) -> tuple[np.ndarray, torch.Tensor]:
    """Return uint8 images N x H x W x 3 and labels of samples `indices` (at most `batch_size` of them)."""
    latents, labels = generate_latents(sampler, seed, indices, batch_size, label_mode)
    count = len(indices)
    return to_uint8(decoder(latents)[:count]), labels[:count]


def image_grid(images: np.ndarray, columns: int, border: int = 2) -> np.ndarray:
    """Tile uint8 images N x H x W x 3 into rows of `columns`, separated by black borders of `border` px."""
    count, height, width, channels = images.shape
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    grid = np.zeros(
        (rows * (height + border) + border, columns * (width + border) + border, channels),
        dtype=np.uint8,
    )
    for i in range(count):
        top = border + (i // columns) * (height + border)
        left = border + (i % columns) * (width + border)
        grid[top : top + height, left : left + width] = images[i]
    return grid


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a uint8 H x W x 3 array as PNG (no metadata, so the bytes depend on the pixels alone)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
