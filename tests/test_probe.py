"""Linear probe on pooled tokens: separable data, shuffled labels, determinism and input checks."""

from __future__ import annotations

import pytest
import torch

from fae_cli.evaluation.probe import linear_probe, pool_tokens

TOKENS, WIDTH = 8, 32


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices: on a shared 2-core machine a second intra-op thread only adds waiting.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _separable(count: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Class means 8 standard deviations apart along distinct axes, plus unit noise per token:
    # after mean pooling the noise shrinks by sqrt(TOKENS), so the classes are linearly separable.
    labels = torch.arange(count) % classes
    means = torch.zeros(classes, WIDTH)
    means[torch.arange(classes), torch.arange(classes)] = 8.0
    tokens = means[labels][:, None, :] + torch.randn(count, TOKENS, WIDTH, generator=_generator(seed))
    return tokens, labels


def test_probe_separable_reaches_full_accuracy():
    train_tokens, train_labels = _separable(200, 4, seed=0)
    test_tokens, test_labels = _separable(200, 4, seed=1)

    accuracy = linear_probe(train_tokens, train_labels, test_tokens, test_labels, steps=100, lr=0.05, seed=0)

    assert accuracy == 1.0


def test_probe_shuffled_labels_near_chance():
    # Labels independent of the tokens: the probe can fit the training split but must stay near
    # chance (0.1 for 10 classes; 2,000 test items give a standard error of about 0.007).
    classes = 10
    train_tokens = torch.randn(500, TOKENS, WIDTH, generator=_generator(2))
    test_tokens = torch.randn(2000, TOKENS, WIDTH, generator=_generator(3))
    train_labels = torch.randint(0, classes, (500,), generator=_generator(4))
    test_labels = torch.randint(0, classes, (2000,), generator=_generator(5))

    accuracy = linear_probe(train_tokens, train_labels, test_tokens, test_labels, steps=200, lr=0.05, seed=0)

    assert abs(accuracy - 1 / classes) < 0.04


def test_probe_pools_before_classifying():
    # Every token carries a large per-item vector with alternating sign, which hides the class in
    # any single token but cancels exactly in the mean over the (even number of) tokens.
    signs = torch.tensor([(-1.0) ** index for index in range(TOKENS)])[None, :, None]
    splits = []
    for seed in (6, 7):
        tokens, labels = _separable(200, 4, seed=seed)
        nuisance = 50.0 * torch.randn(200, 1, WIDTH, generator=_generator(seed + 100))
        splits.append((tokens + signs * nuisance, labels))
    (train_tokens, train_labels), (test_tokens, test_labels) = splits

    accuracy = linear_probe(train_tokens, train_labels, test_tokens, test_labels, steps=100, lr=0.05, seed=0)

    assert accuracy == 1.0


def test_probe_deterministic_with_minibatches():
    train_tokens = torch.randn(300, TOKENS, WIDTH, generator=_generator(8))
    train_labels = torch.randint(0, 5, (300,), generator=_generator(9))
    test_tokens = torch.randn(300, TOKENS, WIDTH, generator=_generator(10))
    test_labels = torch.randint(0, 5, (300,), generator=_generator(11))
    arguments = (train_tokens, train_labels, test_tokens, test_labels)

    first = linear_probe(*arguments, steps=60, lr=0.05, seed=3, batch_size=32)
    second = linear_probe(*arguments, steps=60, lr=0.05, seed=3, batch_size=32)

    assert first == second


def test_pool_tokens_mean_over_tokens():
    tokens = torch.arange(12.0).reshape(1, 3, 4)

    assert torch.equal(pool_tokens(tokens), torch.tensor([[4.0, 5.0, 6.0, 7.0]]))


def test_pool_tokens_keeps_vectors():
    vectors = torch.ones(2, 5)

    assert torch.equal(pool_tokens(vectors), vectors)


def test_probe_unlabelled_rejected():
    tokens = torch.zeros(4, TOKENS, WIDTH)
    labels = torch.tensor([0, 1, -1, 0])

    with pytest.raises(ValueError, match="unlabelled"):
        linear_probe(tokens, labels, tokens, torch.zeros(4, dtype=torch.long), steps=1, lr=0.1, seed=0)


def test_probe_label_count_mismatch_rejected():
    tokens = torch.zeros(4, TOKENS, WIDTH)

    with pytest.raises(ValueError, match="labels of shape"):
        linear_probe(tokens, torch.zeros(3, dtype=torch.long), tokens, torch.zeros(4, dtype=torch.long), steps=1, lr=0.1, seed=0)
