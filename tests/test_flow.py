from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from fae_cli.errors import FaeError
from fae_cli.models.flow import (
    FlowGuidance,
    TransformerFlow,
    build_flow,
    flow_from_config,
    guide_gaussian,
)
from fae_cli.nn.causal_attention import CausalSelfAttention, KVCache
from fae_cli.nn.rope import Rope2d

# STARFlow's released options (the defaults) and TARFlow's choice for each of them.
VARIANTS = {
    "starflow": {},
    "tarflow": {"sos": False, "softplus": False, "soft_clip": 0.0, "rope": False, "final_norm": False, "conditioning": "all"},
}


def make_flow(variant: str = "starflow", *, channels: int = 2, size: int = 3, num_classes: int = 4, **options) -> TransformerFlow:
    """A debug-size flow whose output projections are random, so no block is the identity."""
    torch.manual_seed(0)
    model = build_flow(
        "STARFlow-debug", in_channels=channels, input_size=size, num_classes=num_classes, **{**VARIANTS[variant], **options}
    )
    for block in model.blocks:
        nn.init.normal_(block.proj_out.weight, std=0.05)
        nn.init.normal_(block.proj_out.bias, std=0.05)
    return model.eval()


def set_random_stats(model: TransformerFlow, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    channels = model.config.in_channels
    mean = torch.randn(channels, generator=generator) * scale
    std = (torch.rand(channels, generator=generator) + 0.5) * scale
    model.set_latent_stats(mean, std)
    return mean, std


LABELS = torch.tensor([0, 3, -1])


# ----------------------------------------------------------------------------------------------
# Invertibility and log-determinants


@pytest.mark.parametrize(("variant", "size", "patch"), [("starflow", 3, 1), ("tarflow", 3, 1), ("starflow", 4, 2), ("tarflow", 4, 2)])
def test_inverse_roundtrip(variant: str, size: int, patch: int) -> None:
    model = make_flow(variant, size=size, patch_size=patch)
    set_random_stats(model)
    x = torch.randn(3, 2, size, size)

    u = model.normalize(x)
    z, _ = model.encode(u, model.class_indices(LABELS, 3))
    restored = model.sample(z, LABELS, denoise=False)

    assert (z - u).abs().max() > 0.1
    assert (restored - x).abs().max() < 1e-5


@pytest.mark.parametrize("variant", ["starflow", "tarflow"])
def test_block_logdet_autograd(variant: str) -> None:
    model = make_flow(variant, channels=3, size=2)
    classes = model.class_indices(torch.tensor([2]), 1)
    tokens = torch.randn(1, 4, 3)

    for block in model.blocks:
        block_classes = classes if block.conditional else None

        def transform(flat: torch.Tensor, block=block, block_classes=block_classes) -> torch.Tensor:
            return block(flat.view(1, 4, 3), block_classes)[0].reshape(-1)

        _, expected = torch.linalg.slogdet(jacobian(transform, tokens.reshape(-1)))
        _, logdet = block(tokens, block_classes)
        assert abs(logdet[0].item() - expected.item()) < 1e-4


def test_model_logdet_autograd() -> None:
    model = make_flow("starflow", channels=3, size=2)
    classes = model.class_indices(torch.tensor([1]), 1)
    u = torch.randn(1, 3, 2, 2)

    def transform(flat: torch.Tensor) -> torch.Tensor:
        return model.encode(flat.view(1, 3, 2, 2), classes)[0].reshape(-1)

    _, expected = torch.linalg.slogdet(jacobian(transform, u.reshape(-1)))
    _, logdet = model.encode(u, classes)
    assert abs(logdet[0].item() - expected.item()) < 1e-4


# ----------------------------------------------------------------------------------------------
# Likelihood


@pytest.mark.parametrize("variant", ["starflow", "tarflow"])
def test_nll_identity_closed_form(variant: str) -> None:
    model = make_flow(variant)
    for block in model.blocks:
        nn.init.zeros_(block.proj_out.weight)
        nn.init.zeros_(block.proj_out.bias)
    x = torch.randn(5, 2, 3, 3)
    dims = x[0].numel()

    result = model.nll(x, torch.tensor([0, 1, 2, 3, -1]))
    expected = 0.5 * x.square().sum(dim=(1, 2, 3)) + 0.5 * dims * math.log(2 * math.pi)

    assert torch.allclose(result.nll, expected, atol=1e-4, rtol=0)
    assert torch.allclose(result.bits_per_dim, expected / (dims * math.log(2)), atol=1e-6, rtol=0)


def test_bits_per_dim_scale_invariant() -> None:
    model = make_flow()
    mean, std = set_random_stats(model)
    x = torch.randn(3, 2, 3, 3) * std[:, None, None] + mean[:, None, None]
    scale = 3.0

    before = model.nll(x, LABELS)
    model.set_latent_stats(mean * scale, std * scale)
    after = model.nll(x * scale, LABELS)

    assert torch.allclose(after.bits_per_dim, before.bits_per_dim, rtol=1e-5, atol=0)
    assert torch.allclose(after.nll - before.nll, torch.full((3,), x[0].numel() * math.log(scale)), atol=1e-3, rtol=0)


def test_loss_adds_training_noise() -> None:
    model = make_flow(noise_sigma=0.25)
    x = torch.randn(3, 2, 3, 3)
    noise = torch.randn(3, 2, 3, 3)

    metrics = model(x, LABELS, noise=noise)
    expected = model.nll(x + 0.25 * noise, LABELS).bits_per_dim.mean()

    assert torch.allclose(metrics["bits_per_dim"], expected, atol=1e-6, rtol=0)
    assert torch.allclose(metrics["loss"], expected * math.log(2), atol=1e-6, rtol=0)


def test_label_drop_null_class() -> None:
    model = make_flow()
    labels = torch.tensor([0, 2, -1, 1])
    drop = torch.tensor([False, True, False, False])
    x = torch.randn(4, 2, 3, 3)
    noise = torch.zeros_like(x)

    assert model.class_indices(labels, 4, drop).tolist() == [0, 4, 4, 1]
    dropped = model(x, labels, noise=noise, drop_mask=torch.ones(4, dtype=torch.bool))["loss"]
    unconditional = model(x, None, noise=noise)["loss"]
    assert torch.equal(dropped, unconditional)


# ----------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize(
    ("variant", "guidance"),
    [("starflow", None), ("tarflow", None), ("starflow", FlowGuidance(2.5, "gaussian")), ("tarflow", FlowGuidance(2.5, "linear", anneal=True))],
    ids=["starflow", "tarflow", "starflow-gaussian", "tarflow-linear"],
)
def test_sample_cache_matches_no_cache(variant: str, guidance: FlowGuidance | None) -> None:
    model = make_flow(variant)
    noise = torch.randn(3, 2, 3, 3)

    cached = model.sample(noise, LABELS, guidance=guidance, denoise=False)
    recomputed = model.sample(noise, LABELS, guidance=guidance, use_cache=False, denoise=False)

    assert (cached - recomputed).abs().max() < 1e-5


@pytest.mark.parametrize("form", ["gaussian", "linear"])
def test_guidance_scale_one_is_conditional(form: str) -> None:
    model = make_flow()
    noise = torch.randn(3, 2, 3, 3)

    conditional = model.sample(noise, LABELS, denoise=False)
    neutral = model.sample(noise, LABELS, guidance=FlowGuidance(1.0, form), denoise=False)
    guided = model.sample(noise, LABELS, guidance=FlowGuidance(3.0, form), denoise=False)

    assert (neutral - conditional).abs().max() < 1e-6
    assert (guided - conditional).abs().max() > 1e-3


def test_guide_gaussian_product() -> None:
    mean_c, std_c = torch.tensor([1.0, -0.5]), torch.tensor([0.8, 0.3])
    mean_u, std_u = torch.tensor([0.2, 0.4]), torch.tensor([1.5, 0.6])
    weight = 1.5

    mean, std = guide_gaussian(mean_c, std_c, mean_u, std_u, weight)

    # Complete the square of (1 + w) log N(mean_c, std_c) - w log N(mean_u, std_u).
    precision = (1 + weight) / std_c**2 - weight / std_u**2
    expected_mean = ((1 + weight) * mean_c / std_c**2 - weight * mean_u / std_u**2) / precision
    assert torch.allclose(std, precision.rsqrt(), atol=1e-6, rtol=0)
    assert torch.allclose(mean, expected_mean, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sigma_override", [None, 0.1])
def test_denoise_known_density(sigma_override: float | None) -> None:
    # Zero weights, exp scale and a start token: the deep block maps every element u to
    # z = (u - shift) * exp(-log_scale) and the shallow blocks are the identity, so
    # u ~ N(shift, exp(2 * log_scale)) and its score is -(u - shift) * exp(-2 * log_scale).
    model = make_flow(num_classes=0, sos=True, softplus=False, soft_clip=0.0, noise_sigma=0.3)
    for block in model.blocks:
        nn.init.zeros_(block.proj_out.weight)
        nn.init.zeros_(block.proj_out.bias)
    log_scale, shift = 0.4, -0.7
    with torch.no_grad():
        model.blocks[-1].proj_out.bias.copy_(torch.tensor([log_scale] * 2 + [shift] * 2))
    mean, std = set_random_stats(model)
    x = torch.randn(3, 2, 3, 3) * 3

    denoised = model.denoise(x, sigma_override=sigma_override)

    sigma = 0.3 if sigma_override is None else sigma_override
    u = (x - mean[:, None, None]) / std[:, None, None]
    expected_u = u - sigma**2 * (u - shift) * math.exp(-2 * log_scale)
    expected = expected_u * std[:, None, None] + mean[:, None, None]
    assert (denoised - expected).abs().max() < 1e-5
    assert bool((model.nll(denoised).nll < model.nll(x).nll).all())


# ----------------------------------------------------------------------------------------------
# Sizes and checkpoint config


def test_config_roundtrip() -> None:
    model = make_flow(noise_sigma=0.25)
    set_random_stats(model)
    stored = json.loads(json.dumps(model.config.to_dict()))

    rebuilt = flow_from_config(stored)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(3, 2, 3, 3)

    assert stored["noise_sigma"] == 0.25
    assert rebuilt.config == model.config
    assert torch.equal(rebuilt.eval().nll(x, LABELS).nll, model.nll(x, LABELS).nll)


def test_build_flow_xl_layout() -> None:
    with torch.device("meta"):
        model = build_flow("STARFlow-XL", in_channels=32, input_size=16, num_classes=1000)
    parameters = sum(p.numel() for p in model.parameters())

    assert [len(block.layers) for block in model.blocks] == [2, 2, 2, 2, 2, 18]
    assert model.blocks[-1].proj_in.out_features == 2048
    assert [block.conditional for block in model.blocks] == [False] * 5 + [True]
    assert 1.35e9 < parameters < 1.45e9


def test_build_flow_patch_suffix() -> None:
    model = build_flow("STARFlow-debug/2", in_channels=2, input_size=4, num_classes=0)
    assert model.config.patch_size == 2


def test_build_flow_unknown_name() -> None:
    with pytest.raises(FaeError, match="STARFlow-S"):
        build_flow("STARFlow-Q", in_channels=2, input_size=4, num_classes=0)


# ----------------------------------------------------------------------------------------------
# Cached causal attention


def test_cached_attention_chunks() -> None:
    torch.manual_seed(0)
    attention = CausalSelfAttention(32, 2, 16)
    rope = Rope2d(16, 2, 3)
    x = torch.randn(2, 6, 32)

    full = attention(x, rope.cos, rope.sin)
    cache = KVCache(6)
    parts = []
    for start, end in [(0, 1), (1, 4), (4, 5), (5, 6)]:
        parts.append(attention(x[:, start:end], rope.cos[start:end], rope.sin[start:end], cache))

    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-5
    with pytest.raises(ValueError, match="6 tokens"):
        cache.append(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16))
