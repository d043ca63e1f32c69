"""FAE encoder variants and feature decoder: parameter counts, shapes, token mixing, positions."""

from __future__ import annotations

import pytest
import torch

from fae_cli.errors import FaeError
from fae_cli.models.fae import build_fae, encoder_head_dim, encoder_heads, kl_divergence
from fae_cli.recipe import AdapterConfig

GRID = (4, 4)
WIDTH = 32


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: a second thread only adds synchronisation, which is slow on a shared CPU.
    torch.set_num_threads(1)
    yield


def tiny(**changes) -> AdapterConfig:
    settings = dict(heads=2, head_dim=8, latent_channels=4, decoder_layers=1, decoder_head_dim=8, layers=2)
    settings.update(changes)
    return AdapterConfig(**settings)


def count(module: torch.nn.Module) -> int:
    return sum(param.numel() for param in module.parameters())


def features(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, GRID[0] * GRID[1], WIDTH, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# The configuration of Gao et al. (arXiv 2512.07829), built on the meta device (no memory used)


def test_paper_encoder_parameter_count():
    with torch.device("meta"):
        model = build_fae(AdapterConfig(), 1536, (16, 16))
    assert count(model.encoder) == pytest.approx(38.17e6, rel=0.005)


def test_paper_decoder_parameter_count():
    with torch.device("meta"):
        model = build_fae(AdapterConfig(), 1536, (16, 16))
    assert count(model.decoder) == pytest.approx(170.4e6, rel=0.01)


def test_default_heads_from_width():
    assert encoder_heads(AdapterConfig(), 1536) == 24
    assert encoder_head_dim(AdapterConfig(), 1536) == 256
    assert encoder_heads(AdapterConfig(), 112) == 1
    assert encoder_head_dim(AdapterConfig(), 112) == 448
    assert encoder_head_dim(AdapterConfig(), 200) % 4 == 0


# ----------------------------------------------------------------------------------------------
# Shapes and behaviour at a tiny size


@pytest.mark.parametrize("kind", ["attention", "linear", "transformer"])
def test_shapes_per_kind(kind):
    model = build_fae(tiny(kind=kind), WIDTH, GRID)
    x_hat, mean, logvar = model(features())
    assert x_hat.shape == (2, 16, WIDTH)
    assert mean.shape == (2, 16, 4)
    assert logvar.shape == (2, 16, 4)


def other_tokens_before_after(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent means of tokens 1.. before and after replacing token 0 of the input."""
    model = build_fae(tiny(kind=kind), WIDTH, GRID)
    x = features()
    changed = x.clone()
    changed[:, 0] = features(seed=5)[:, 0]
    return model.encode(x)[0][:, 1:], model.encode(changed)[0][:, 1:]


def test_attention_encoder_mixes_tokens():
    before, after = other_tokens_before_after("attention")
    assert not torch.allclose(before, after)


def test_linear_encoder_keeps_tokens_apart():
    before, after = other_tokens_before_after("linear")
    assert torch.equal(before, after)


def test_encoder_without_positions_is_permutation_equivariant():
    model = build_fae(tiny(pos_embed="none"), WIDTH, GRID)
    x = features()
    order = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    mean, _ = model.encode(x)
    mean_permuted, _ = model.encode(x[:, order])
    assert torch.allclose(mean_permuted, mean[:, order], atol=1e-5)


def test_rope_encoder_depends_on_position():
    model = build_fae(tiny(pos_embed="rope"), WIDTH, GRID)
    x = features()
    order = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    mean, _ = model.encode(x)
    mean_permuted, _ = model.encode(x[:, order])
    assert not torch.allclose(mean_permuted, mean[:, order], atol=1e-3)


def test_eval_forward_decodes_mean():
    model = build_fae(tiny(), WIDTH, GRID).eval()
    x = features()
    x_hat, mean, _ = model(x)
    assert torch.equal(x_hat, model.decode(mean))


def test_train_forward_samples():
    model = build_fae(tiny(), WIDTH, GRID).train()
    x = features()
    torch.manual_seed(0)
    first, _, _ = model(x)
    second, _, _ = model(x)
    assert not torch.equal(first, second)


def test_kl_divergence_known_values():
    zeros = torch.zeros(3, 4)
    assert kl_divergence(zeros, zeros).item() == 0.0
    assert kl_divergence(torch.ones(3, 4), zeros).item() == pytest.approx(0.5)
    # KL(N(0, e) || N(0, 1)) = (e - 1 - 1) / 2 per element
    assert kl_divergence(zeros, torch.ones(3, 4)).item() == pytest.approx((torch.e - 2) / 2)


def test_wrong_feature_shape_rejected():
    model = build_fae(tiny(), WIDTH, GRID)
    with pytest.raises(ValueError, match="N x 16 x 32"):
        model.encode(torch.zeros(2, 9, WIDTH))


def test_rope_needs_head_width_multiple_of_four():
    with pytest.raises(FaeError, match="adapter.head_dim = 6"):
        build_fae(tiny(head_dim=6), WIDTH, GRID)
