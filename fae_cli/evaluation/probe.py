"""Linear probe: how linearly separable the classes are in a token representation.

Tokens (N x L x D) are mean-pooled over L and standardised with the training split's
per-dimension mean and standard deviation, the role of the affine-free BatchNorm in MAE's linear
probe. A zero-initialised linear classifier is then trained with AdamW on cross-entropy, and the
result is the top-1 accuracy on the held-out split. Zero initialisation and a seeded generator
for the mini-batch order make a run deterministic on a given device.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fae_cli.errors import FaeError
from fae_cli.recipe import Recipe


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
    """Compare probe accuracies of features x, reconstructions x-hat and latents z (`fae evaluate probe`)."""
    # TODO: read the labelled feature cache and the adapter once those artefacts exist.
    raise FaeError("fae evaluate probe is not implemented yet in this fae version")
