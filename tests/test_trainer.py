"""The shared trainer: exact accumulation, exact resume, DDP equivalence, guard, schedule, EMA."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from fae_cli.errors import FaeError
from fae_cli.recipe import OptimConfig
from fae_cli.training.checkpoint import latest_checkpoint, load_weights, read_safetensors
from fae_cli.training.distributed import DistEnv, cleanup, init_distributed
from fae_cli.training.ema import EMA
from fae_cli.training.optim import lr_factor
from fae_cli.training.order import DataOrder, micro_batches
from fae_cli.training.trainer import Auxiliary, Trainer, TrainingInterrupted, TrainTask


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: a second thread only adds synchronisation, which is slow on a shared CPU.
    torch.set_num_threads(1)
    yield


class RegressionTask(TrainTask):
    """A two-layer MLP regressing fixed random targets; optional dropout, noise and auxiliary."""

    kind = "test"

    def __init__(self, samples: int = 40, noise: float = 0.0, dropout: float = 0.0, auxiliary_start: int | None = None, init_seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(123)
        self.x = torch.randn(samples, 6, generator=generator)
        self.y = torch.randn(samples, 2, generator=generator)
        torch.manual_seed(init_seed)
        self.model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 2))
        self.noise = noise
        self.seen: list[list[int]] = []
        self.stop_at: int | None = None
        self.nan_at: int | None = None
        self.evaluated_at: list[int] = []
        self.auxiliary_start = auxiliary_start
        if auxiliary_start is not None:
            self.critic = nn.Linear(2, 1)
            self.auxiliary = Auxiliary(self.critic, self.critic_loss, OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant"), auxiliary_start)

    def __len__(self) -> int:
        return len(self.x)

    def fetch(self, indices: torch.Tensor):
        self.seen.append(indices.tolist())
        return self.x[indices], self.y[indices]

    def loss(self, model, batch, step):
        if self.stop_at is not None and step == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        x, y = batch
        prediction = model(x) + self.noise * torch.randn_like(y)
        mse = (prediction - y).pow(2).mean()
        loss = mse
        if self.nan_at is not None and step == self.nan_at:
            mse = mse * float("nan")
            loss = mse
        if self.auxiliary_start is not None:
            self.fake = prediction.detach()
            if step >= self.auxiliary_start:
                loss = loss + 0.1 * self.critic(prediction).mean()
        return loss, {"mse": mse}

    def critic_loss(self, critic, batch, step):
        _, y = batch
        loss = (critic(self.fake) - critic(y)).pow(2).mean()
        return loss, {"critic": loss}

    def evaluate(self, model, ema, step):
        self.evaluated_at.append(step)
        return {"ema_mse": (ema(self.x) - self.y).pow(2).mean()}


def optim_config(**changes) -> OptimConfig:
    settings = dict(steps=20, batch_size=8, grad_accum=2, learning_rate=1e-2, warmup_steps=5, ema_decay=0.9,
                    checkpoint_every=100, log_every=5, grad_clip=1.0, weight_decay=0.01)
    settings.update(changes)
    return OptimConfig(**settings)


def make_trainer(tmp_path, task, **changes) -> Trainer:
    return Trainer(task, optim_config(**changes), tmp_path, seed=7, identity={"task": "regression"}, progress=False)


def gradients(model: nn.Module) -> list[torch.Tensor]:
    return [param.grad.clone() for param in model.parameters()]


# ----------------------------------------------------------------------------------------------
# Gradient accumulation


def test_accumulation_four_micro_batches_equal_one_batch(tmp_path):
    indices = torch.randperm(40, generator=torch.Generator().manual_seed(1))[:32]
    reference = RegressionTask()
    x, y = reference.fetch(indices)
    (reference.model(x) - y).pow(2).mean().backward()

    for batch_size, grad_accum in ((32, 1), (32, 4), (30, 4)):
        task = RegressionTask()
        trainer = make_trainer(tmp_path / f"{batch_size}-{grad_accum}", task, batch_size=batch_size, grad_accum=grad_accum)
        trainer.accumulate(indices[:batch_size])
        expected = reference if batch_size == 32 else None
        if expected is None:
            expected = RegressionTask()
            x30, y30 = expected.fetch(indices[:batch_size])
            (expected.model(x30) - y30).pow(2).mean().backward()
        for got, want in zip(gradients(task.model), gradients(expected.model)):
            assert (got - want).abs().max().item() < 1e-6, (batch_size, grad_accum)


def test_micro_batches_split_rank_share_evenly():
    batch = torch.arange(30)
    parts = [micro_batches(batch, rank, 2, 4) for rank in range(2)]
    sizes = [[len(part) for part in rank_parts] for rank_parts in parts]
    assert sizes == [[4, 4, 4, 3], [4, 4, 4, 3]]
    assert torch.equal(torch.cat([torch.cat(rank_parts) for rank_parts in parts]), batch)


# ----------------------------------------------------------------------------------------------
# Resume


def test_resume_after_sigterm_equals_straight_run(tmp_path):
    straight_task = RegressionTask(noise=0.01, dropout=0.2, auxiliary_start=3)
    straight = make_trainer(tmp_path / "straight", straight_task, eval_every=5)
    straight.fit()

    first_task = RegressionTask(noise=0.01, dropout=0.2, auxiliary_start=3)
    first_task.stop_at = 9
    first = make_trainer(tmp_path / "resumed", first_task, eval_every=5)
    with pytest.raises(TrainingInterrupted) as stopped:
        first.fit()
    assert "SIGTERM after step 10" in str(stopped.value)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-00000010"

    second_task = RegressionTask(noise=0.01, dropout=0.2, auxiliary_start=3, init_seed=99)
    second = make_trainer(tmp_path / "resumed", second_task, eval_every=5)
    result = second.fit()

    assert result.resumed_from == 10
    assert second_task.seen == straight_task.seen[2 * 10 :]
    for name, value in straight.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], value), name
    for name, value in straight.ema.module.state_dict().items():
        assert torch.equal(second.ema.module.state_dict()[name], value), name
    for name, value in straight_task.critic.state_dict().items():
        assert torch.equal(second_task.critic.state_dict()[name], value), name
    straight_state = straight.optimizer.state_dict()
    second_state = second.optimizer.state_dict()
    for param_id, moments in straight_state["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(second_state["state"][param_id][key], moments[key]), (param_id, key)
    assert second_state["param_groups"][0]["lr"] == straight_state["param_groups"][0]["lr"]

    lines = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [line["step"] for line in lines if "eval" not in line]
    eval_steps = [line["step"] for line in lines if "eval" in line]
    assert train_steps == [5, 10, 15, 20]
    assert eval_steps == [5, 10, 15, 20]


def test_resume_rejects_other_settings(tmp_path):
    make_trainer(tmp_path, RegressionTask(), steps=2).fit()
    with pytest.raises(FaeError) as error:
        make_trainer(tmp_path, RegressionTask(), steps=2, learning_rate=5e-3).fit()
    assert "train.learning_rate: 0.01 there, 0.005 now" in str(error.value)


def test_resume_accepts_operational_changes(tmp_path):
    make_trainer(tmp_path, RegressionTask(), steps=2).fit()
    result = make_trainer(tmp_path, RegressionTask(), steps=2, log_every=1, checkpoint_every=1).fit()
    assert result.resumed_from == 2


def test_loader_workers_give_same_result(tmp_path):
    in_process = make_trainer(tmp_path / "zero", RegressionTask(), steps=3, workers=0)
    in_process.fit()
    with_worker = make_trainer(tmp_path / "one", RegressionTask(), steps=3, workers=1)
    with_worker.fit()
    for name, value in in_process.model.state_dict().items():
        assert torch.equal(with_worker.model.state_dict()[name], value), name


def test_auxiliary_idle_before_start(tmp_path):
    task = RegressionTask(auxiliary_start=4)
    initial = copy.deepcopy(task.critic.state_dict())
    make_trainer(tmp_path, task, steps=4).fit()
    for name, value in initial.items():
        assert torch.equal(task.critic.state_dict()[name], value), name


def test_checkpoint_stores_data_position(tmp_path):
    make_trainer(tmp_path, RegressionTask(), steps=7).fit()
    _, metadata = read_safetensors(latest_checkpoint(tmp_path) / "state.safetensors")
    # 40 samples, batches of 8: 5 steps per epoch, so step 7 ends 2 batches into epoch 1.
    assert metadata["fae.extra"]["data"] == {"epoch": 1, "offset": 16}


# ----------------------------------------------------------------------------------------------
# Non-finite guard


def test_guard_names_step_and_term(tmp_path):
    task = RegressionTask()
    task.nan_at = 3
    trainer = make_trainer(tmp_path, task, checkpoint_every=2)
    with pytest.raises(FaeError) as error:
        trainer.fit()
    message = str(error.value)
    assert "step 4" in message
    assert "'mse' is nan" in message
    assert "step-00000002" in message


def test_guard_leaves_weights_unchanged(tmp_path):
    task = RegressionTask()
    task.nan_at = 3
    trainer = make_trainer(tmp_path, task, checkpoint_every=3)
    with pytest.raises(FaeError):
        trainer.fit()
    saved, _ = load_weights(latest_checkpoint(tmp_path) / "model.safetensors")
    for name, value in task.model.state_dict().items():
        assert torch.equal(saved[name], value), name


# ----------------------------------------------------------------------------------------------
# Two ranks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    try:
        trainer = Trainer(RegressionTask(), optim_config(steps=3, batch_size=16, grad_accum=2), run_dir, seed=7, env=env, progress=False)
        trainer.fit()
    finally:
        cleanup()


def test_two_ranks_match_one_rank(tmp_path):
    single = Trainer(RegressionTask(), optim_config(steps=3, batch_size=16, grad_accum=1), tmp_path / "one", seed=7, env=DistEnv(), progress=False)
    single.fit()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)

    two, _ = load_weights(latest_checkpoint(tmp_path / "two") / "model.safetensors")
    for name, value in single.model.state_dict().items():
        assert (two[name] - value).abs().max().item() < 1e-5, name


# ----------------------------------------------------------------------------------------------
# Schedule, EMA, data order


def test_lr_factor_warmup_then_cosine():
    optim = OptimConfig(steps=110, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, optim) == pytest.approx(0.1)
    assert lr_factor(9, optim) == pytest.approx(1.0)
    assert lr_factor(10, optim) == pytest.approx(1.0)
    assert lr_factor(60, optim) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, optim) == pytest.approx(0.1)


def test_lr_factor_constant_after_warmup():
    optim = OptimConfig(steps=100, warmup_steps=4, schedule="constant")
    assert lr_factor(1, optim) == pytest.approx(0.5)
    assert lr_factor(99, optim) == 1.0


def test_ema_update_is_weighted_average():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.75)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    expected = 0.75 * before + 0.25 * (before + 1.0)
    assert torch.allclose(ema.module.weight, expected, atol=1e-7)


def test_data_order_each_index_once_per_epoch():
    order = DataOrder(size=10, batch_size=3, seed=5)
    epoch0 = torch.cat([order.next_batch() for _ in range(3)])
    assert sorted(epoch0.tolist()) == sorted(set(epoch0.tolist()))
    assert order.state() == {"epoch": 0, "offset": 9}
    order.next_batch()
    assert order.state() == {"epoch": 1, "offset": 3}


def test_data_order_copy_continues_sequence():
    order = DataOrder(size=10, batch_size=3, seed=5)
    order.next_batch()
    copy_ = order.copy()
    assert torch.equal(copy_.next_batch(), order.next_batch())


def test_log_lines_without_a_progress_bar(tmp_path, caplog):
    # progress=False (as when output goes to a file): one line per log interval, with the same
    # loss that metrics.jsonl records for that step.
    caplog.set_level("INFO", logger="fae_cli")
    make_trainer(tmp_path, RegressionTask(), steps=10, log_every=5).fit()
    lines = [record.getMessage() for record in caplog.records if " step " in record.getMessage() and "loss" in record.getMessage()]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line.split(":")[0] for line in lines] == ["test step 5/10", "test step 10/10"]
    assert [float(line.split("loss ")[1].split(",")[0]) for line in lines] == pytest.approx(
        [record["loss"] for record in records if "loss" in record], rel=1e-3
    )


def test_stop_exit_status_follows_the_signal(tmp_path):
    task = RegressionTask()
    task.stop_at = 3
    with pytest.raises(TrainingInterrupted) as stopped:
        make_trainer(tmp_path, task, steps=10).fit()
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    requested = make_trainer(tmp_path / "requested", RegressionTask(), steps=10)
    requested.request_stop()
    with pytest.raises(TrainingInterrupted) as asked:
        requested.fit()
    assert asked.value.exit_code == 75
