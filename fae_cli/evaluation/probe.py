"""Linear probe: how linearly separable the classes are in a token representation.

Tokens (N x L x D) are mean-pooled over L and standardised with the training split's
per-dimension mean and standard deviation, the role of the affine-free BatchNorm in MAE's linear
probe. A zero-initialised linear classifier is then trained with AdamW on cross-entropy, and the
result is the top-1 accuracy on the held-out split. Zero initialisation and a seeded generator
for the mini-batch order make a run deterministic on a given device.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from fae_cli.artifacts import MANIFEST, atomic_write_text, check_compatible
from fae_cli.errors import FaeError
from fae_cli.recipe import Recipe

log = logging.getLogger(__name__)


def pool_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Mean-pool N x L x D tokens to N x D float32; N x D input is taken as already pooled."""
    if tokens.dim() == 3:
        return tokens.float().mean(dim=1)
    if tokens.dim() == 2:
        return tokens.float()
    raise ValueError(f"expected N x L x D tokens or N x D vectors, got shape {tuple(tokens.shape)}")


def linear_probe(
    train_tokens: torch.Tensor,
    train_labels: torch.Tensor,
    test_tokens: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    steps: int,
    lr: float,
    seed: int,
    batch_size: int = 1024,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
) -> float:
    """Train a linear classifier on pooled training tokens; return top-1 test accuracy in [0, 1].

    Labels are integers 0 ... C − 1 (C = largest label + 1 over both splits). With `batch_size`
    at least the training size, every step is full-batch gradient descent with AdamW.
    """
    train = pool_tokens(train_tokens).to(device)
    test = pool_tokens(test_tokens).to(device)
    train_labels = train_labels.long().to(device)
    test_labels = test_labels.long().to(device)
    _check_split("train", train, train_labels)
    _check_split("test", test, test_labels)
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train width {train.shape[1]} differs from test width {test.shape[1]}")

    mean = train.mean(dim=0)
    std = train.std(dim=0, unbiased=False).clamp_min(1e-6)
    train = (train - mean) / std
    test = (test - mean) / std

    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    weight = torch.zeros(num_classes, train.shape[1], device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)

    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(train))
    order = torch.randperm(len(train), generator=generator)
    cursor = 0
    for _ in range(steps):
        if cursor + batch_size > len(train):
            order = torch.randperm(len(train), generator=generator)
            cursor = 0
        index = order[cursor : cursor + batch_size].to(device)
        cursor += batch_size
        loss = F.cross_entropy(F.linear(train[index], weight, bias), train_labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        predictions = F.linear(test, weight, bias).argmax(dim=1)
    return float((predictions == test_labels).float().mean())


def _check_split(name: str, vectors: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.dim() != 1 or len(labels) != len(vectors):
        raise ValueError(f"{name}: {len(vectors)} vectors but labels of shape {tuple(labels.shape)}")
    if len(labels) == 0:
        raise ValueError(f"{name} split is empty")
    if int(labels.min()) < 0:
        raise ValueError(f"{name} split has unlabelled items (label -1); a linear probe needs class labels")


def run_probe(recipe: Recipe, *, features: Path | None = None, adapter: Path | None = None, out: Path | None = None) -> dict:
    """Compare probe accuracies of features x, reconstructions x-hat and latents z (`fae evaluate probe`).

    The classifier trains on the training feature cache and is scored on the held-out one
    (`<run>/features-holdout`, extracted first when missing). x-hat and z come from the adapter's
    posterior mean; without an adapter checkpoint only x is probed. Writes `out/metrics.json`.
    """
    # The loaders belong to the stages that write these artefacts.
    from fae_cli.data.cache import open_cache
    from fae_cli.stages import extract
    from fae_cli.stages.adapter import load_adapter
    from fae_cli.stages.plan import RunPaths

    paths = RunPaths.of(recipe)
    train_folder = Path(features) if features is not None else paths.features
    if not (train_folder / MANIFEST).is_file():
        raise FaeError(f"no feature cache at {train_folder}: run `fae extract` first or pass --features")
    holdout_folder = paths.holdout_features
    if not (holdout_folder / MANIFEST).is_file():
        log.info("extracting held-out features into %s", holdout_folder)
        extract.run(recipe, out=holdout_folder, split="holdout")
    train_cache = open_cache(train_folder, "features")
    test_cache = open_cache(holdout_folder, "features")
    for fact in ("encoder", "input_size", "grid", "width"):
        check_compatible(
            fact, train_cache.manifest.get(fact), test_cache.manifest.get(fact),
            expected_from=str(train_folder), actual_from=str(holdout_folder),
        )

    train_x, test_x = train_cache.load_all(), test_cache.load_all()
    representations = {"x": (train_x, test_x)}
    adapter_path = Path(adapter) if adapter is not None else paths.adapter
    if (adapter_path / MANIFEST).is_file() or adapter is not None:
        model, manifest = load_adapter(adapter_path)
        check_compatible(
            "encoder", manifest.get("encoder"), train_cache.manifest.get("encoder"),
            expected_from=f"adapter {adapter_path}", actual_from=f"feature cache {train_folder}",
        )
        train_z, train_xhat = _encode(model, train_x, recipe.evaluate.batch_size)
        test_z, test_xhat = _encode(model, test_x, recipe.evaluate.batch_size)
        representations["x_hat"] = (train_xhat, test_xhat)
        representations["z"] = (train_z, test_z)

    settings = recipe.evaluate
    accuracies = {
        name: linear_probe(
            train, train_cache.labels, test, test_cache.labels,
            steps=settings.probe_steps, lr=settings.probe_lr, seed=recipe.run.seed,
        )
        for name, (train, test) in representations.items()
    }
    report = {
        "metrics": {f"probe_{name}": value for name, value in accuracies.items()},
        "train": {"folder": str(train_folder), "count": len(train_cache)},
        "test": {"folder": str(holdout_folder), "count": len(test_cache)},
        "adapter": str(adapter_path) if "z" in representations else None,
        "classifier_head": "unavailable: the registry encoders are used without a classification head on their token grid",
        "steps": settings.probe_steps,
        "lr": settings.probe_lr,
        "seed": recipe.run.seed,
    }
    target = Path(out) if out is not None else paths.evaluation / "probe"
    atomic_write_text(target / "metrics.json", json.dumps(report, indent=2) + "\n")
    for name, value in accuracies.items():
        log.info("linear probe on %s: %.2f%% top-1", name, 100 * value)
    log.info("wrote %s", target / "metrics.json")
    return report


@torch.no_grad()
def _encode(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the posterior means z and reconstructions x-hat of `tokens`, batch by batch."""
    latents, reconstructions = [], []
    for start in range(0, len(tokens), batch_size):
        mean, _ = model.encode(tokens[start : start + batch_size])
        latents.append(mean)
        reconstructions.append(model.decode(mean))
    return torch.cat(latents), torch.cat(reconstructions)
