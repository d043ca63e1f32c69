"""SiT / LightningDiT: parameter counts, adaLN-zero start, label drop, guidance labels."""

from __future__ import annotations

import pytest
import torch

from fae_cli.errors import FaeError
from fae_cli.models.dit import build_dit, dit_names


def _count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


# Exact counts for a 16x16x32 latent and 1000 classes + null, from the LightningDiT and SiT layer
# shapes (2-D sin-cos table of 256 x 1152 = 294,912 entries not trainable, so not included).
@pytest.mark.parametrize(
    ("name", "trainable"),
    [("LightningDiT-XL/1", 674_961_824), ("SiT-XL/1", 674_853_152)],
)
def test_dit_xl_parameter_count(name, trainable):
    with torch.device("meta"):
        model = build_dit(name, in_channels=32, input_size=16, num_classes=1000)
    assert _count(model) == trainable
    assert _count(model) + model.pos_embed.numel() == trainable + 294_912
    assert abs(_count(model) / 675e6 - 1) < 0.01


def test_dit_names_all_build():
    with torch.device("meta"):
        for name in dit_names():
            model = build_dit(name, in_channels=4, input_size=8, num_classes=10)
            assert model.patch == int(name[-1])


def test_dit_unknown_name_rejected():
    with pytest.raises(FaeError, match="SiT-XXL/1"):
        build_dit("SiT-XXL/1", in_channels=4, input_size=8, num_classes=10)


def test_dit_odd_grid_rejected_for_patch_2():
    with pytest.raises(FaeError, match="7x7"):
        build_dit("SiT-debug/2", in_channels=4, input_size=7, num_classes=10)


@pytest.mark.parametrize("name", ["SiT-debug/1", "LightningDiT-debug/2"])
def test_dit_starts_at_zero_and_trains(name):
    torch.manual_seed(0)
    model = build_dit(name, in_channels=4, input_size=8, num_classes=10, qk_norm=True)
    x = torch.randn(3, 4, 8, 8)
    t = torch.rand(3)
    y = torch.tensor([0, 5, 9])

    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0

    loss = (out - torch.randn_like(x)).pow(2).mean()
    loss.backward()
    assert model.final.linear.weight.grad.abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert model(x, t, y).abs().sum() > 0


def test_lightning_dit_uses_rope_and_rmsnorm():
    model = build_dit("LightningDiT-debug/1", in_channels=4, input_size=8, num_classes=10, qk_norm=True)
    assert model.rope is not None
    assert type(model.blocks[0].norm1).__name__ == "RMSNorm"
    assert type(model.blocks[0].attn.q_norm).__name__ == "RMSNorm"


def test_sit_has_plain_layernorm_and_no_rope():
    model = build_dit("SiT-debug/1", in_channels=4, input_size=8, num_classes=10)
    assert model.rope is None
    assert isinstance(model.blocks[0].norm1, torch.nn.LayerNorm)
    assert model.blocks[0].norm1.weight is None


def test_label_drop_rate_in_train_mode():
    torch.manual_seed(0)
    model = build_dit("SiT-debug/1", in_channels=4, input_size=8, num_classes=10, label_drop=0.1)
    labels = torch.randint(0, 10, (10_000,))
    embedder = model.label_embed

    model.train()
    dropped = (embedder.drop_labels(labels, 10_000, labels.device) == model.null_class).float().mean().item()
    assert abs(dropped - 0.1) <= 0.01

    model.eval()
    eval_labels = embedder.drop_labels(labels, 10_000, labels.device)
    assert torch.equal(eval_labels, labels)


def test_label_null_paths():
    model = build_dit("SiT-debug/1", in_channels=4, input_size=8, num_classes=10).eval()
    embedder = model.label_embed
    labels = torch.tensor([3, -1, 10, 4])

    mapped = embedder.drop_labels(labels, 4, labels.device)
    assert mapped.tolist() == [3, 10, 10, 4]

    forced = embedder.drop_labels(labels, 4, labels.device, force_drop=torch.tensor([True, False, False, False]))
    assert forced.tolist() == [10, 10, 10, 4]

    assert embedder.drop_labels(None, 2, labels.device).tolist() == [10, 10]


def test_dit_force_drop_matches_null():
    torch.manual_seed(0)
    model = build_dit("LightningDiT-debug/1", in_channels=4, input_size=8, num_classes=10).eval()
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    x = torch.randn(2, 4, 8, 8)
    t = torch.full((2,), 0.5)
    y = torch.tensor([1, 2])

    conditional = model(x, t, y)
    null = model(x, t, torch.full((2,), model.null_class))
    forced = model(x, t, y, force_drop=torch.ones(2, dtype=torch.bool))
    assert not torch.allclose(conditional, null)
    assert torch.equal(forced, null)


def test_unconditional_dit_ignores_labels():
    model = build_dit("SiT-debug/1", in_channels=4, input_size=8, num_classes=0)
    assert model.label_embed.table.num_embeddings == 1
    assert model.null_class == 0
