from __future__ import annotations

import copy
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from fae_cli.errors import FaeError
from fae_cli.training import checkpoint as ckpt
from fae_cli.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    read_safetensors,
    save_checkpoint,
    save_weights,
    write_safetensors,
)


class Tiny(nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
        self.head = nn.Linear(4, 5, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(x)))


def make_training(seed: int = 0):
    torch.manual_seed(seed)
    model = Tiny()
    ema = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
    return model, ema, optimizer, scheduler


def train_steps(model, ema, optimizer, scheduler, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 5, (6,))
        noise = torch.randn(6, 5) * 0.1 + float(np.random.rand())
        loss = (model(x) - noise).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            for target, source in zip(ema.parameters(), model.parameters()):
                target.lerp_(source, 0.1)
        losses.append(loss.item())
    return losses


def test_round_trip_continues_identically(tmp_path):
    np.random.seed(3)
    model, ema, optimizer, scheduler = make_training()
    train_steps(model, ema, optimizer, scheduler, 3)
    save_checkpoint(tmp_path, kind="adapter", step=3, model=model, ema=ema, optimizer=optimizer, scheduler=scheduler, extra={"epoch": 1, "position": 17})
    expected = train_steps(model, ema, optimizer, scheduler, 3)
    expected_state = {k: v.clone() for k, v in model.state_dict().items()}

    model2, ema2, optimizer2, scheduler2 = make_training(seed=99)
    loaded = load_checkpoint(tmp_path, expect_kind="adapter", model=model2, ema=ema2, optimizer=optimizer2, scheduler=scheduler2, restore_rng_state=True)
    assert loaded.step == 3
    assert loaded.extra == {"epoch": 1, "position": 17}
    assert scheduler2.last_epoch == 3
    got = train_steps(model2, ema2, optimizer2, scheduler2, 3)
    assert got == expected
    for name, tensor in model2.state_dict().items():
        assert torch.equal(tensor, expected_state[name]), name
    for a, b in zip(ema.parameters(), ema2.parameters()):
        assert torch.equal(a, b)
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(optimizer.state[p1]["exp_avg"], optimizer2.state[p2]["exp_avg"])
        assert torch.equal(optimizer.state[p1]["exp_avg_sq"], optimizer2.state[p2]["exp_avg_sq"])


def test_reloaded_tensors_identical(tmp_path):
    model, ema, optimizer, scheduler = make_training()
    train_steps(model, ema, optimizer, scheduler, 2)
    save_checkpoint(tmp_path, kind="adapter", step=2, model=model, ema=ema, optimizer=optimizer, scheduler=scheduler)
    model2, ema2, optimizer2, scheduler2 = make_training(seed=5)
    load_checkpoint(tmp_path, expect_kind="adapter", model=model2, ema=ema2, optimizer=optimizer2, scheduler=scheduler2)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, model2.state_dict()[name])
    assert optimizer.state_dict()["param_groups"][0]["lr"] == optimizer2.state_dict()["param_groups"][0]["lr"]
    assert optimizer2.state_dict()["param_groups"][0]["betas"] == (0.9, 0.99)


def test_rng_states_restored(tmp_path):
    model, ema, optimizer, scheduler = make_training()
    torch.manual_seed(11)
    np.random.seed(12)
    import random

    random.seed(13)
    save_checkpoint(tmp_path, kind="adapter", step=1, model=model)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    load_checkpoint(tmp_path, expect_kind="adapter", restore_rng_state=True)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, ema, optimizer, scheduler = make_training()
    save_checkpoint(tmp_path, kind="adapter", step=1, model=model, ema=ema, optimizer=optimizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pointer = (tmp_path / "checkpoints" / "latest").read_text()
    train_steps(model, ema, optimizer, scheduler, 2)

    calls = {"n": 0}
    original = ckpt.write_safetensors

    def failing(path, tensors, metadata):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (injected)")
        return original(path, tensors, metadata)

    monkeypatch.setattr(ckpt, "write_safetensors", failing)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, kind="adapter", step=2, model=model, ema=ema, optimizer=optimizer)
    monkeypatch.undo()

    assert (tmp_path / "checkpoints" / "latest").read_text() == pointer
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    fresh, _, fresh_optimizer, _ = make_training(seed=7)
    load_checkpoint(tmp_path, expect_kind="adapter", model=fresh, optimizer=fresh_optimizer)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_tied_weights_saved_once_and_load_strict(tmp_path):
    torch.manual_seed(0)
    model = Tiny(tied=True)
    save_weights(tmp_path / "w.safetensors", model, {"fae.kind": "adapter"})
    tensors, metadata = read_safetensors(tmp_path / "w.safetensors")
    assert ("head.weight" in tensors) != ("embed.weight" in tensors)
    assert metadata["fae.aliases"] in ({"head.weight": "embed.weight"}, {"embed.weight": "head.weight"})
    state, _ = load_weights(tmp_path / "w.safetensors")
    other = Tiny(tied=True)
    other.load_state_dict(state, strict=True)
    assert other.head.weight is other.embed.weight
    assert torch.equal(other.embed.weight, model.embed.weight)


def test_compiled_module_saves_without_prefix(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    compiled = torch.compile(model)
    save_checkpoint(tmp_path, kind="adapter", step=1, model=compiled, ema=compiled)
    tensors, _ = read_safetensors(tmp_path / "checkpoints" / "step-00000001" / "model.safetensors")
    assert all("_orig_mod" not in name for name in tensors)
    plain = Tiny()
    load_checkpoint(tmp_path, expect_kind="adapter", model=plain)
    assert torch.equal(plain.head.weight, model.head.weight)
    target = torch.compile(Tiny())
    load_checkpoint(tmp_path, expect_kind="adapter", model=target)
    assert torch.equal(target._orig_mod.head.weight, model.head.weight)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_module_saves_without_prefix(tmp_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = Tiny()
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        save_checkpoint(tmp_path, kind="adapter", step=1, model=wrapped)
        tensors, _ = read_safetensors(tmp_path / "checkpoints" / "step-00000001" / "model.safetensors")
        assert all(not name.startswith("module.") for name in tensors)
        target = torch.nn.parallel.DistributedDataParallel(Tiny())
        load_checkpoint(tmp_path, expect_kind="adapter", model=target)
        assert torch.equal(target.module.body[0].weight, model.body[0].weight)
    finally:
        dist.destroy_process_group()


def test_foreign_prefixed_keys_are_cleaned(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    prefixed = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    save_weights(tmp_path / "w.safetensors", prefixed, {})
    state, _ = load_weights(tmp_path / "w.safetensors")
    Tiny().load_state_dict(state, strict=True)


def test_metadata_non_string_values_round_trip(tmp_path):
    metadata = {"int": 3, "float": 0.25, "list": [1, 2, [3]], "dict": {"a": None, "b": True}, "text": "x"}
    write_safetensors(tmp_path / "m.safetensors", {"t": torch.zeros(2)}, metadata)
    _, got = read_safetensors(tmp_path / "m.safetensors")
    assert got == metadata


def test_wrong_kind_names_both(tmp_path):
    save_checkpoint(tmp_path, kind="generator", step=1, model=Tiny())
    with pytest.raises(FaeError) as error:
        load_checkpoint(tmp_path, expect_kind="adapter", model=Tiny())
    assert "'generator'" in str(error.value)
    assert "'adapter'" in str(error.value)


def test_shape_mismatch_is_user_error(tmp_path):
    save_checkpoint(tmp_path, kind="adapter", step=1, model=nn.Linear(3, 4))
    with pytest.raises(FaeError, match="does not match"):
        load_checkpoint(tmp_path, expect_kind="adapter", model=nn.Linear(3, 5))


def test_missing_checkpoint_is_user_error(tmp_path):
    with pytest.raises(FaeError, match="no checkpoint"):
        load_checkpoint(tmp_path, expect_kind="adapter")


def test_keep_prunes_old_checkpoints(tmp_path):
    model = Tiny()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, kind="adapter", step=step, model=model, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step-00000003", "step-00000004"]
    assert latest_checkpoint(tmp_path).name == "step-00000004"


def test_checkpoint_files_are_not_pickles(tmp_path):
    save_checkpoint(tmp_path, kind="adapter", step=1, model=Tiny(), ema=Tiny(), optimizer=torch.optim.AdamW(Tiny().parameters()))
    folder = latest_checkpoint(tmp_path)
    for path in folder.iterdir():
        header_len = int.from_bytes(path.read_bytes()[:8], "little")
        assert path.read_bytes()[8:9] == b"{", path.name
        assert header_len > 0
