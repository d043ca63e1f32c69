"""Stage `train-adapter`: the FAE encoder and feature decoder as a VAE on cached frozen features.

Steps: open the feature cache and hold out `adapter.holdout` evenly spaced rows (a cache of class
folders runs class by class, so even spacing keeps every class in the held-out rows). Build the model from
the recipe and the cache's width and grid, and train it with the shared trainer; flipped copies,
when the cache has them, count as extra training samples. Then evaluate the model and its EMA
on the held-out rows (feature MSE and mean cosine similarity between x_hat and x), and write
`metrics.json` and `manifest.json` beside the checkpoints.

Loss: ||x_hat - x||^2 averaged over elements + beta * KL(q(z|x) || N(0, I)) averaged over latent
elements, with beta = `adapter.kl_weight`; the two terms are logged as `mse` and `kl`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fae_cli.artifacts import MANIFEST, atomic_write_text, read_manifest, write_manifest
from fae_cli.data.cache import Cache, open_cache
from fae_cli.data.datasets import evenly_spaced
from fae_cli.errors import FaeError
from fae_cli.models.fae import FAE, build_fae, cosine_similarity, kl_divergence
from fae_cli.recipe import AdapterConfig, Recipe, to_toml
from fae_cli.stages.plan import Plan, RunPaths, stage_hash
from fae_cli.training.checkpoint import (
    CHECKPOINTS,
    load_checkpoint,
    read_checkpoint_header,
    resolve_checkpoint,
)
from fae_cli.training.distributed import barrier, distributed_session
from fae_cli.training.trainer import Trainer, TrainTask

log = logging.getLogger(__name__)

KIND = "adapter"
METRICS = "metrics.json"
# Checkpoint header key of the facts that rebuild the model without the recipe.
MODEL_KEY = "fae.adapter"
# Feature-cache manifest facts that every consumer of the adapter must match.
CACHE_FACTS = ("encoder", "weights_hash", "image_size", "input_size")


def plan(recipe: Recipe, features: Path | None = None, out: Path | None = None) -> Plan:
    paths = RunPaths.of(recipe)
    return Plan(
        "train-adapter",
        inputs={"feature cache": str(features or paths.features)},
        outputs={"adapter": str(out or paths.adapter)},
    )


# ----------------------------------------------------------------------------------------------
# The training task


class AdapterTask(TrainTask):
    """VAE training on the cache rows `train_rows`; with flips, indices from len(train_rows) on are mirrored copies."""

    kind = KIND

    def __init__(self, model: FAE, cache: Cache, train_rows: torch.Tensor, holdout_rows: torch.Tensor, kl_weight: float, eval_batch: int) -> None:
        self.model = model
        self.cache = cache
        self.train_rows = train_rows
        self.holdout_rows = holdout_rows
        self.kl_weight = kl_weight
        self.eval_batch = eval_batch

    def __len__(self) -> int:
        return len(self.train_rows) * (2 if self.cache.has_flip else 1)

    def fetch(self, indices: torch.Tensor) -> torch.Tensor:
        rows = self.train_rows[indices % len(self.train_rows)]
        if not self.cache.has_flip:
            return self.cache.get(rows)
        flipped = indices >= len(self.train_rows)
        out = torch.empty((len(indices), *self.cache.item_shape), dtype=torch.float32)
        if (~flipped).any():
            out[~flipped] = self.cache.get(rows[~flipped])
        if flipped.any():
            out[flipped] = self.cache.get(rows[flipped], flip=True)
        return out

    def loss(self, model: nn.Module, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        x_hat, mean, logvar = model(x)
        mse = F.mse_loss(x_hat.float(), x)
        kl = kl_divergence(mean.float(), logvar.float())
        return mse + self.kl_weight * kl, {"mse": mse, "kl": kl}

    def evaluate(self, model: nn.Module, ema: nn.Module, step: int) -> dict[str, float]:
        results = {}
        for prefix, network in (("", model), ("ema_", ema)):
            scores = evaluate_reconstruction(network, self.cache, self.holdout_rows, self.eval_batch)
            results.update({f"{prefix}{key}": value for key, value in scores.items()})
        return results


@torch.no_grad()
def evaluate_reconstruction(model: nn.Module, cache: Cache, rows: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Return feature MSE (per element) and mean per-token cosine similarity of x_hat vs x.

    Reconstructions decode the posterior mean, so the figures are deterministic.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    squared = 0.0
    cosine = 0.0
    elements = 0
    tokens = 0
    for start in range(0, len(rows), batch_size):
        x = cache.get(rows[start : start + batch_size]).to(device)
        mean, _ = model.encode(x)
        x_hat = model.decode(mean).float()
        squared += float((x_hat - x).pow(2).sum())
        elements += x.numel()
        similarity = cosine_similarity(x_hat, x)
        cosine += float(similarity.sum())
        tokens += similarity.numel()
    model.train(was_training)
    return {"mse": squared / elements, "cosine": cosine / tokens}


# ----------------------------------------------------------------------------------------------
# The stage


def run(recipe: Recipe, features: Path | None = None, out: Path | None = None) -> Path:
    """Train the adapter on a feature cache and return its artefact folder.

    Rerunning the same command resumes from the folder's latest checkpoint; a finished folder
    is only evaluated again.
    """
    paths = RunPaths.of(recipe)
    features = Path(features) if features is not None else paths.features
    out = Path(out) if out is not None else paths.adapter
    with distributed_session(recipe.run.device) as env:
        return _train(recipe, features, out, env)


def _train(recipe: Recipe, features: Path, out: Path, env: Any) -> Path:
    config = recipe.adapter
    cache = open_cache(features, kind="features")
    train_rows, holdout_rows, split = _split(cache, config, features)
    facts = adapter_facts(config, cache, features)

    torch.manual_seed(recipe.run.seed)
    model = build_fae(config, cache.width, cache.grid)
    counts = {"encoder": _count(model.encoder), "decoder": _count(model.decoder)}
    log.info(
        "adapter: %s encoder %.2fM + feature decoder %.2fM parameters; %d x %d tokens of width %d -> latent %d; "
        "%d training rows%s, %d %s rows for evaluation",
        config.kind, counts["encoder"] / 1e6, counts["decoder"] / 1e6, *cache.grid, cache.width, config.latent_channels,
        len(train_rows), " (+ flipped copies)" if cache.has_flip else "", len(holdout_rows), split,
    )

    eval_batch = max(1, min(256, config.train.batch_size))
    task = AdapterTask(model, cache, train_rows, holdout_rows, config.kl_weight, eval_batch)
    identity = {
        "adapter": config.model_dump(mode="json", exclude={"train"}),
        "features": {"recipe_hash": cache.manifest["recipe_hash"], "count": len(cache), "flip": cache.has_flip},
    }
    trainer = Trainer(
        task,
        config.train,
        out,
        seed=recipe.run.seed,
        env=env,
        identity=identity,
        metadata={MODEL_KEY: facts},
        recipe_toml=to_toml(recipe),
        recipe_key="adapter.train",
    )
    result = trainer.fit()

    if env.is_main:
        evaluation = {
            "split": split,
            "count": len(holdout_rows),
            "step": result.step,
            "ema": {"mse": result.evaluation["ema_mse"], "cosine": result.evaluation["ema_cosine"]},
            "model": {"mse": result.evaluation["mse"], "cosine": result.evaluation["cosine"]},
        }
        atomic_write_text(out / METRICS, json.dumps(evaluation, indent=2) + "\n")
        write_manifest(
            out,
            KIND,
            recipe_hash=stage_hash(recipe, "adapter"),
            parents={"features": features},
            recipe_toml=to_toml(recipe),
            **facts,
            parameters=counts,
            step=result.step,
            checkpoint=str(result.checkpoint.relative_to(out)),
            evaluation=evaluation,
        )
        log.info(
            "adapter written to %s: %s MSE %.4g, cosine %.4f (EMA weights, %d %s rows)",
            out, split, evaluation["ema"]["mse"], evaluation["ema"]["cosine"], len(holdout_rows), split,
        )
    barrier()
    return out


def _split(cache: Cache, config: AdapterConfig, features: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Return the training rows, the evaluation rows and the name of their split."""
    count = len(cache)
    if config.holdout >= count:
        raise FaeError(f"adapter.holdout = {config.holdout} leaves no training rows in {features} ({count} rows); lower it")
    every_row = torch.arange(count)
    if config.holdout == 0:
        # NOTE: with nothing held out, the final figures measure fit to training rows, not generalisation.
        log.warning("adapter.holdout = 0: the final evaluation uses training rows")
        return every_row, torch.from_numpy(evenly_spaced(count, min(count, 256))), "train"
    holdout_rows = torch.from_numpy(evenly_spaced(count, config.holdout))
    is_train = torch.ones(count, dtype=torch.bool)
    is_train[holdout_rows] = False
    return every_row[is_train], holdout_rows, "holdout"


def adapter_facts(config: AdapterConfig, cache: Cache, features: Path) -> dict[str, Any]:
    """Facts that rebuild the model (config, width, grid) and tie it to its encoder."""
    facts: dict[str, Any] = {}
    for key in CACHE_FACTS:
        if key not in cache.manifest:
            raise FaeError(f"feature cache {features} has no '{key}' in its manifest; extract it again with this fae version")
        facts[key] = cache.manifest[key]
    return {
        **facts,
        "width": cache.width,
        "grid": list(cache.grid),
        "latent_channels": config.latent_channels,
        "adapter_kind": config.kind,
        "config": config.model_dump(mode="json", exclude={"train"}),
    }


def _count(module: nn.Module) -> int:
    return sum(param.numel() for param in module.parameters())


# ----------------------------------------------------------------------------------------------
# Loading


def load_adapter(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> tuple[FAE, dict[str, Any]]:
    """Load a trained adapter from its artefact folder or one of its checkpoint folders.

    The model is rebuilt from the facts in the checkpoint header, so no recipe is needed, and
    is returned in eval mode with gradients off. With `use_ema` the EMA weights are loaded (the
    raw weights when the checkpoint has no EMA). Returns (model, manifest); for a checkpoint of a
    run that has not finished, the manifest is built from the checkpoint header.
    """
    folder = resolve_checkpoint(path)
    header = read_checkpoint_header(folder)
    if header.get("fae.kind") != KIND:
        raise FaeError(f"{folder} is a {header.get('fae.kind')!r} checkpoint, expected 'adapter'")
    if MODEL_KEY not in header:
        raise FaeError(f"{folder} has no adapter description ({MODEL_KEY}) in its header; it was not written by fae train-adapter")
    facts = header[MODEL_KEY]
    config = AdapterConfig.model_validate(facts["config"])
    model = build_fae(config, int(facts["width"]), tuple(facts["grid"]))
    load_checkpoint(folder, expect_kind=KIND, model=model, use_ema_as_model=use_ema)
    model.to(device).eval().requires_grad_(False)

    artefact = folder.parent.parent if folder.parent.name == CHECKPOINTS else folder
    if (artefact / MANIFEST).is_file():
        manifest = read_manifest(artefact, expect_kind=KIND)
    else:
        manifest = {"kind": KIND, **facts, "step": int(header["fae.step"]), "checkpoint": str(folder)}
    return model, manifest
