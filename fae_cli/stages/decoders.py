"""Stage `train-decoders`: the pixel decoder, first on noisy frozen features, then on x_hat.

Data: a feature cache and the image dataset it was extracted from. Cache row r pairs its
features with image `index[r]` of the same split, decoded and cropped on access, so no image
copy is stored. When the cache has flips, rows len..2 len - 1 are mirrored copies: flipped
features with the mirrored image.

Phase `noise` (FAE stage Ib): inputs are the frozen features plus Gaussian noise of sigma
`decoder.noise_sigma`, or by default 0.4 scaled by the cache's feature scale
(`fae_cli.training.decoder_losses.noise_sigma`). No adapter is needed.
Phase `finetune` (FAE stage II): the noise-phase decoder's EMA weights are trained further on
x_hat = adapter.decode(adapter.encode(x).mean), without noise; the adapter stays frozen.

Loss: `DecoderObjective`: reconstruction, perceptual distance on the frozen encoder (or
LPIPS-VGG), and the hinge GAN loss from step `decoder.gan_start` on. The discriminator is the
trainer's auxiliary model. It reuses the phase's optimisation settings, with its own warm-up
counted from `gan_start`, because the recipe has no separate discriminator settings. Each
phase starts a new discriminator.

Output folder: checkpoints of kind 'pixel-decoder', `metrics.json` (PSNR on the first training
rows) and `manifest.json`. The checkpoint header entry `fae.pixel_decoder` contains the decoder
config and the encoder facts, so `load_pixel_decoder` needs no recipe.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fae_cli.artifacts import (
    MANIFEST,
    atomic_write_text,
    check_compatible,
    read_manifest,
    write_manifest,
)
from fae_cli.data.cache import Cache, open_cache
from fae_cli.data.datasets import ImageDataset, open_images
from fae_cli.encoders import FrozenEncoder, build_encoder
from fae_cli.errors import FaeError
from fae_cli.evaluation.recon import psnr
from fae_cli.models.fae import FAE
from fae_cli.models.pixel_decoder import PixelDecoder, build_pixel_decoder
from fae_cli.recipe import Recipe, to_toml
from fae_cli.stages.adapter import load_adapter
from fae_cli.stages.plan import Plan, RunPaths, stage_hash
from fae_cli.training.checkpoint import (
    CHECKPOINTS,
    load_checkpoint,
    read_checkpoint_header,
    resolve_checkpoint,
)
from fae_cli.training.decoder_losses import (
    DecoderObjective,
    add_feature_noise,
    build_decoder_objective,
    feature_scale,
    noise_sigma,
)
from fae_cli.training.distributed import DistEnv, barrier, cleanup, init_distributed
from fae_cli.training.trainer import Auxiliary, Trainer, TrainTask

log = logging.getLogger(__name__)

KIND = "pixel-decoder"
PHASES = ("noise", "finetune")
METRICS = "metrics.json"
# Checkpoint header key of the facts that rebuild the decoder without the recipe.
MODEL_KEY = "fae.pixel_decoder"
# Feature-cache manifest facts that the decoder records and that its inputs must match.
CACHE_FACTS = ("encoder", "weights_hash", "input_size", "image_size", "grid", "width")
# Facts an adapter must share with the decoder, in the order they are checked.
ADAPTER_FACTS = (("encoder", "encoder"), ("weights_hash", "encoder weights hash"), ("input_size", "encoder input size"), ("width", "feature width"), ("grid", "feature grid"))
# Dataset facts (`ImageDataset.describe`) that must equal those stored in the cache manifest.
DATA_FACTS = ("source", "layout", "split", "count", "rows_sha256", "total", "image_size")
SCALE_ROWS = 1024  # cache rows whose mean token norm sets the default noise sigma
EVAL_ROWS = 64  # training rows whose PSNR the trainer's evaluation reports
EVAL_BATCH = 16


def plan(
    recipe: Recipe,
    phase: str = "noise",
    features: Path | None = None,
    adapter: Path | None = None,
    out: Path | None = None,
    init: Path | None = None,
) -> Plan:
    paths = RunPaths.of(recipe)
    inputs = {"feature cache": str(features or paths.features)}
    if phase == "finetune":
        inputs["adapter"] = str(adapter or paths.adapter)
        inputs["noise-phase decoder"] = str(init or paths.decoder_noise)
    if recipe.decoder.perceptual == "lpips-vgg":
        for number, weights in enumerate(recipe.decoder.perceptual_weights, start=1):
            inputs[f"LPIPS weights {number}"] = str(weights)
    target = paths.decoder_noise if phase == "noise" else paths.decoder_finetune
    return Plan(f"train-decoders ({phase})", inputs=inputs, outputs={"pixel decoder": str(out or target)})


# ----------------------------------------------------------------------------------------------
# Data: (features, image) pairs


class FeatureImagePairs:
    """Cache rows paired with their dataset images; with flips, rows n..2n-1 are mirrored copies."""

    def __init__(self, cache: Cache, dataset: ImageDataset) -> None:
        self.cache = cache
        self.dataset = dataset
        self.rows = len(cache)

    def __len__(self) -> int:
        return self.rows * (2 if self.cache.has_flip else 1)

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return float32 features B x L x D and uint8 images B x 3 x S x S of `indices`."""
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        rows = indices % self.rows
        flipped = indices >= self.rows
        features = torch.empty((len(indices), *self.cache.item_shape), dtype=torch.float32)
        if (~flipped).any():
            features[~flipped] = self.cache.get(rows[~flipped])
        if flipped.any():
            features[flipped] = self.cache.get(rows[flipped], flip=True)

        images = torch.stack([self.dataset[int(index)][0] for index in self.cache.index[rows]])
        images[flipped] = images[flipped].flip(-1)
        return features, images


def open_pairs(recipe: Recipe, cache: Cache, features: Path) -> FeatureImagePairs:
    """Open the dataset split the cache was extracted from and check that it is the same data."""
    if "data" not in cache.manifest:
        raise FaeError(f"feature cache {features} does not record its dataset (manifest key 'data'); extract it again with this fae version")
    stored = cache.manifest["data"]
    dataset = open_images(recipe.data, stored["split"])
    current = dataset.describe()
    for key in DATA_FACTS:
        check_compatible(f"dataset {key}", stored[key], current[key], expected_from=f"feature cache {features}", actual_from="the recipe's [data]")
    if len(cache) and int(cache.index.max()) >= len(dataset):
        raise FaeError(f"feature cache {features} refers to image {int(cache.index.max())}, but the dataset has {len(dataset)}; extract it again")
    return FeatureImagePairs(cache, dataset)


# ----------------------------------------------------------------------------------------------
# The training task


class PixelDecoderTask(TrainTask):
    """Decoder training on (features, image) pairs; `adapter` set means the finetune phase."""

    kind = KIND

    def __init__(
        self,
        model: PixelDecoder,
        pairs: FeatureImagePairs,
        objective: DecoderObjective,
        *,
        sigma: float,
        adapter: FAE | None,
        device: torch.device,
    ) -> None:
        self.model = model
        self.pairs = pairs
        self.objective = objective
        self.sigma = sigma
        self.adapter = adapter
        self.device = device
        self.eval_rows = torch.arange(min(EVAL_ROWS, pairs.rows))
        # Detached tensors of the last main-loss call, for the discriminator's loss.
        self.fake: torch.Tensor | None = None
        self.real: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def fetch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pairs.get(indices)

    @torch.no_grad()
    def clean_inputs(self, features: torch.Tensor) -> torch.Tensor:
        """Return the decoder input without noise: x, or x_hat through the frozen adapter."""
        if self.adapter is None:
            return features
        mean, _ = self.adapter.encode(features)
        return self.adapter.decode(mean).float()

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        features, images = batch
        target = images.float() / 127.5 - 1
        inputs = self.clean_inputs(features)
        if self.adapter is None:
            inputs = add_feature_noise(inputs, self.sigma)

        reconstructions = model(inputs).float()
        total, metrics = self.objective.generator_loss(reconstructions, target, step)
        if self.objective.gan_active(step):
            self.fake = reconstructions.detach()
            self.real = target
        return total, metrics

    def discriminator_loss(self, adversarial: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.fake is None or self.real is None:
            raise RuntimeError("the discriminator loss runs after the decoder loss of the same micro-batch")
        fake, real = self.fake, self.real
        self.fake = self.real = None
        return adversarial(fake, real)

    def evaluate(self, model: nn.Module, ema: nn.Module, step: int) -> dict[str, float]:
        results = {}
        for prefix, network in (("", model), ("ema_", ema)):
            results[f"{prefix}psnr"] = self._psnr(network)
        return results

    def _psnr(self, network: nn.Module) -> float:
        """Mean PSNR (dB, images in [0, 1]) on the first training rows, without input noise."""
        values = []
        for start in range(0, len(self.eval_rows), EVAL_BATCH):
            features, images = self.pairs.get(self.eval_rows[start : start + EVAL_BATCH])
            inputs = self.clean_inputs(features.to(self.device))
            reconstructions = (network(inputs).float().clamp(-1, 1) + 1) / 2
            values.append(psnr(images.to(self.device).float() / 255, reconstructions))
        return float(torch.cat(values).mean())


# ----------------------------------------------------------------------------------------------
# Compatibility checks


def cache_facts(cache: Cache, features: Path) -> dict[str, Any]:
    """Return the cache facts the decoder records (encoder, weights hash, sizes, grid, width)."""
    facts = {}
    for key in CACHE_FACTS:
        if key not in cache.manifest:
            raise FaeError(f"feature cache {features} has no '{key}' in its manifest; extract it again with this fae version")
        facts[key] = cache.manifest[key]
    facts["grid"] = list(facts["grid"])
    return facts


def check_adapter(decoder_facts: dict[str, Any], adapter_manifest: dict[str, Any], *, decoder_from: str, adapter_from: str) -> None:
    """Raise a FaeError naming both values when the adapter's encoder or features differ from the decoder's."""
    for key, label in ADAPTER_FACTS:
        expected = decoder_facts[key]
        actual = adapter_manifest[key]
        if key == "grid":
            expected, actual = list(expected), list(actual)
        check_compatible(label, expected, actual, expected_from=decoder_from, actual_from=adapter_from)


def check_cache(decoder_facts: dict[str, Any], facts: dict[str, Any], *, decoder_from: str, cache_from: str) -> None:
    """Raise a FaeError naming both values when a feature cache differs from the decoder's training features."""
    for key in CACHE_FACTS:
        check_compatible(f"feature cache {key}", decoder_facts[key], facts[key], expected_from=decoder_from, actual_from=cache_from)


# ----------------------------------------------------------------------------------------------
# The stage


@dataclass
class DecoderRun:
    """A prepared phase: the task, its trainer, and what the manifest records."""

    phase: str
    task: PixelDecoderTask
    trainer: Trainer
    facts: dict[str, Any]
    parents: dict[str, Path]
    out: Path


def run(
    recipe: Recipe,
    phase: str = "noise",
    features: Path | None = None,
    adapter: Path | None = None,
    out: Path | None = None,
    init: Path | None = None,
) -> Path:
    """Train one phase of the pixel decoder and return its artefact folder.

    `features` defaults to the run's feature cache, `out` to `<run>/decoder-noise` or
    `<run>/decoder-finetune`. Phase 'finetune' needs `adapter` (default `<run>/adapter`) and
    starts from the noise-phase decoder `init` (default `<run>/decoder-noise`). Rerunning the
    same command resumes from the folder's latest checkpoint.
    """
    group_existed = dist.is_available() and dist.is_initialized()
    env = init_distributed(recipe.run.device)
    try:
        prepared = prepare(recipe, phase, features=features, adapter=adapter, out=out, init=init, env=env)
        return _train(recipe, prepared, env)
    finally:
        if not group_existed:
            cleanup()


def prepare(
    recipe: Recipe,
    phase: str,
    *,
    features: Path | None = None,
    adapter: Path | None = None,
    out: Path | None = None,
    init: Path | None = None,
    env: DistEnv | None = None,
) -> DecoderRun:
    """Check the inputs and build the model, task and trainer of a phase, without training."""
    if phase not in PHASES:
        raise FaeError(f"invalid decoder phase {phase!r}: use 'noise' or 'finetune'")
    env = env or DistEnv()
    paths = RunPaths.of(recipe)
    features = Path(features) if features is not None else paths.features
    if out is None:
        out = paths.decoder_noise if phase == "noise" else paths.decoder_finetune
    out = Path(out)
    config = recipe.decoder
    parents: dict[str, Path] = {"features": features}

    cache = open_cache(features, kind="features")
    facts = cache_facts(cache, features)
    identity: dict[str, Any] = {
        "decoder": config.model_dump(mode="json", exclude={"train", "finetune_train", "finetune"}),
        "features": {"recipe_hash": cache.manifest["recipe_hash"], "count": len(cache), "flip": cache.has_flip},
    }

    torch.manual_seed(recipe.run.seed)
    decoder = build_pixel_decoder(config, facts["width"], tuple(facts["grid"]), facts["image_size"])
    feature_adapter = None
    if phase == "finetune":
        adapter = Path(adapter) if adapter is not None else paths.adapter
        init = Path(init) if init is not None else paths.decoder_noise
        feature_adapter, adapter_identity = _finetune_inputs(decoder, facts, features, adapter, init, env.device)
        identity.update(adapter_identity)
        parents.update(adapter=adapter, init=init)

    sigma = _noise_sigma(recipe, cache, facts) if phase == "noise" else 0.0
    facts.update(phase=phase, noise_sigma=sigma, config=decoder.config)
    identity["noise_sigma"] = sigma

    pairs = open_pairs(recipe, cache, features)
    encoder = _perceptual_encoder(recipe, facts, features, env.device)
    objective = build_decoder_objective(config, encoder=encoder)
    task = PixelDecoderTask(decoder, pairs, objective, sigma=sigma, adapter=feature_adapter, device=env.device)

    optim = config.train if phase == "noise" else config.finetune_train
    if objective.adversarial is not None:
        # The discriminator reuses the phase's AdamW settings and schedule (see the module doc).
        task.auxiliary = Auxiliary(objective.adversarial, task.discriminator_loss, optim, start_step=config.gan_start)
        if config.gan_start >= optim.steps:
            log.info("decoder.gan_start = %d is not below the phase's %d steps: the GAN loss stays off", config.gan_start, optim.steps)

    recipe_key = "decoder.train" if phase == "noise" else "decoder.finetune_train"
    trainer = Trainer(
        task,
        optim,
        out,
        seed=recipe.run.seed,
        env=env,
        identity=identity,
        metadata={MODEL_KEY: facts},
        recipe_toml=to_toml(recipe),
        recipe_key=recipe_key,
    )
    return DecoderRun(phase, task, trainer, facts, parents, out)


def _finetune_inputs(
    decoder: PixelDecoder, facts: dict[str, Any], features: Path, adapter: Path, init: Path, device: torch.device
) -> tuple[FAE, dict[str, Any]]:
    """Check the noise-phase decoder, cache and adapter against each other; load the weights.

    Loads the noise-phase EMA weights into `decoder` and returns the frozen adapter and the
    identity entries of the phase.
    """
    init_folder = resolve_checkpoint(init)
    init_facts = _decoder_facts(init_folder)
    init_from = f"noise-phase decoder {init}"
    check_compatible("decoder phase", "noise", init_facts["phase"], expected_from="phase 'finetune' (its starting point)", actual_from=init_from)

    feature_adapter, adapter_manifest = load_adapter(adapter, device=device)
    check_adapter(init_facts, adapter_manifest, decoder_from=init_from, adapter_from=f"adapter {adapter}")
    check_cache(init_facts, facts, decoder_from=init_from, cache_from=f"feature cache {features}")
    check_compatible("pixel decoder architecture", init_facts["config"], decoder.config, expected_from=init_from, actual_from="the recipe's [decoder]")

    checkpoint = load_checkpoint(init_folder, expect_kind=KIND, model=decoder, use_ema_as_model=True)
    log.info("finetune starts from %s weights of %s (step %d)", "EMA" if checkpoint.has_ema else "raw", init_folder, checkpoint.step)
    identity = {
        "init": {"step": checkpoint.step, "identity": checkpoint.metadata["fae.identity"]},
        "adapter": {"step": adapter_manifest["step"], "config": adapter_manifest["config"]},
    }
    return feature_adapter, identity


def _decoder_facts(folder: Path) -> dict[str, Any]:
    header = read_checkpoint_header(folder)
    if header.get("fae.kind") != KIND:
        raise FaeError(f"{folder} is a {header.get('fae.kind')!r} checkpoint, expected {KIND!r}")
    if MODEL_KEY not in header:
        raise FaeError(f"{folder} has no pixel decoder description ({MODEL_KEY}) in its header; it was not written by fae train-decoders")
    return header[MODEL_KEY]


def _noise_sigma(recipe: Recipe, cache: Cache, facts: dict[str, Any]) -> float:
    if recipe.decoder.noise_sigma is not None:
        return float(recipe.decoder.noise_sigma)
    scale = feature_scale(cache.get(torch.arange(min(SCALE_ROWS, len(cache)))))
    sigma = noise_sigma(facts["encoder"], scale, recipe.decoder.noise_reference_scale)
    log.info("noise sigma %.4g for %s (feature scale %.4g over %d rows, reference scale %.4g)", sigma, facts["encoder"], scale, min(SCALE_ROWS, len(cache)), recipe.decoder.noise_reference_scale)
    return sigma


def _perceptual_encoder(recipe: Recipe, facts: dict[str, Any], features: Path, device: torch.device) -> FrozenEncoder | None:
    """Build the frozen encoder of the features when the perceptual loss uses it."""
    config = recipe.decoder
    if config.perceptual != "encoder" or config.perceptual_weight == 0:
        return None
    cache_from = f"feature cache {features}"
    check_compatible("encoder", facts["encoder"], recipe.encoder.name, expected_from=cache_from, actual_from="recipe encoder.name")
    encoder = build_encoder(facts["encoder"], weights=recipe.encoder.weights, input_size=facts["input_size"], device=device)
    check_compatible("encoder weights hash", facts["weights_hash"], encoder.weights_hash, expected_from=cache_from, actual_from=f"encoder {encoder.name} ({encoder.weights_source})")
    return encoder


def _train(recipe: Recipe, prepared: DecoderRun, env: DistEnv) -> Path:
    trainer, out, facts = prepared.trainer, prepared.out, prepared.facts
    decoder = prepared.task.model
    parameters = {"decoder": _count(decoder)}
    if prepared.task.auxiliary is not None:
        parameters["discriminator"] = _count(prepared.task.auxiliary.model)
    log.info(
        "pixel decoder (%s phase): %.2fM parameters, %dx%d tokens of width %d -> %dx%d images, patch %d; %d training pairs%s; noise sigma %.4g",
        prepared.phase, parameters["decoder"] / 1e6, *decoder.grid, decoder.feature_width, *decoder.image_size, decoder.patch,
        len(prepared.task), " (with flipped copies)" if prepared.task.pairs.cache.has_flip else "", facts["noise_sigma"],
    )
    result = trainer.fit()

    if env.is_main:
        evaluation = {
            "split": "train",
            "rows": len(prepared.task.eval_rows),
            "inputs": "x_hat" if prepared.phase == "finetune" else "features without noise",
            "step": result.step,
            "psnr": result.evaluation["psnr"],
            "ema_psnr": result.evaluation["ema_psnr"],
        }
        atomic_write_text(out / METRICS, json.dumps(evaluation, indent=2) + "\n")
        stage = "decoder-noise" if prepared.phase == "noise" else "decoder-finetune"
        write_manifest(
            out,
            KIND,
            recipe_hash=stage_hash(recipe, stage),
            parents=prepared.parents,
            recipe_toml=to_toml(recipe),
            **facts,
            parameters=parameters,
            step=result.step,
            checkpoint=str(result.checkpoint.relative_to(out)),
            evaluation=evaluation,
        )
        log.info("pixel decoder written to %s: PSNR %.2f dB (EMA) on %d training rows", out, evaluation["ema_psnr"], evaluation["rows"])
    barrier()
    return out


def _count(module: nn.Module) -> int:
    return sum(param.numel() for param in module.parameters())


# ----------------------------------------------------------------------------------------------
# Loading


def load_pixel_decoder(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> tuple[PixelDecoder, dict[str, Any]]:
    """Load a trained pixel decoder from its artefact folder or one of its checkpoint folders.

    The decoder is rebuilt from the config in the checkpoint header, so no recipe is needed,
    and is returned in eval mode with gradients off. With `use_ema` the EMA weights are loaded
    (the raw weights when the checkpoint has no EMA). Returns (decoder, manifest). The manifest contains the facts
    of the header (encoder, weights_hash, input_size, image_size, grid, width, phase,
    noise_sigma, config); for a checkpoint of an unfinished run it is built from the header.
    """
    folder = resolve_checkpoint(path)
    facts = _decoder_facts(folder)
    decoder = PixelDecoder.from_config(facts["config"])
    checkpoint = load_checkpoint(folder, expect_kind=KIND, model=decoder, use_ema_as_model=use_ema)
    decoder.to(device).eval().requires_grad_(False)

    artefact = folder.parent.parent if folder.parent.name == CHECKPOINTS else folder
    if (artefact / MANIFEST).is_file():
        manifest = read_manifest(artefact, expect_kind=KIND)
    else:
        manifest = {"kind": KIND, **facts, "step": checkpoint.step, "checkpoint": str(folder)}
    return decoder, manifest
