"""`fae train-adapter` on a tiny synthetic feature cache: artefact, reload, metrics, SIGTERM resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from fae_cli.artifacts import read_manifest
from fae_cli.data.cache import CacheWriter, open_cache
from fae_cli.errors import FaeError
from fae_cli.recipe import load_recipe
from fae_cli.stages import adapter
from fae_cli.stages.adapter import AdapterTask, evaluate_reconstruction, load_adapter
from fae_cli.training.checkpoint import latest_checkpoint, load_weights

GRID = (4, 4)
WIDTH = 16
ROWS = 48

TINY = [
    "adapter.heads=2",
    "adapter.head_dim=8",
    "adapter.latent_channels=4",
    "adapter.decoder_layers=1",
    "adapter.decoder_head_dim=8",
    "adapter.holdout=8",
    "adapter.train.batch_size=8",
    "adapter.train.grad_accum=2",
    "adapter.train.warmup_steps=2",
    "adapter.train.learning_rate=0.003",
    "adapter.train.ema_decay=0.5",
    "adapter.train.log_every=2",
]


def write_cache(folder, flip: bool = True) -> None:
    """A feature cache of ROWS random rows in the layout `fae extract` writes."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(ROWS, GRID[0] * GRID[1], WIDTH, generator=generator)
    facts = {
        "encoder": "synthetic",
        "weights_hash": "0" * 16,
        "image_size": 32,
        "input_size": 32,
        "grid": list(GRID),
        "width": WIDTH,
        "dtype": "float32",
        "flip": flip,
        "num_classes": 0,
    }
    writer = CacheWriter(folder, kind="features", count=ROWS, identity=facts)
    writer.prepare()
    tensors = {"features": features, "labels": torch.full((ROWS,), -1), "index": torch.arange(ROWS)}
    if flip:
        # Mirror each 4 x 4 token grid left to right, as features of a flipped image would be.
        tensors["features_flip"] = features.unflatten(1, GRID).flip(2).flatten(1, 2).contiguous()
    writer.write(range(ROWS), tensors, [])
    writer.finish(recipe_hash="synthetic", **facts)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: a second thread only adds synchronisation, which is slow on a shared CPU.
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    write_cache(root / "features")
    recipe = load_recipe(None, [*TINY, "adapter.train.steps=6", "adapter.train.checkpoint_every=100", f"run.out_dir={json.dumps(str(root))}"])
    out = adapter.run(recipe, features=root / "features", out=root / "adapter")
    return root, out, recipe


def test_stage_writes_manifest_linking_cache(trained):
    root, out, _ = trained
    manifest = read_manifest(out, "adapter")
    assert manifest["parents"]["features"]["path"] == str((root / "features").resolve())
    assert manifest["parents"]["features"]["kind"] == "features"
    assert manifest["encoder"] == "synthetic"
    assert manifest["grid"] == list(GRID)
    assert manifest["latent_channels"] == 4
    assert manifest["step"] == 6
    assert manifest["checkpoint"] == "checkpoints/step-00000006"


def test_stage_metrics_match_reloaded_ema(trained):
    root, out, _ = trained
    metrics = json.loads((out / "metrics.json").read_text())
    model, _ = load_adapter(out)
    cache = open_cache(root / "features")
    # The 8 held-out rows are the middles of 8 bins of 6 rows: 3, 9, ..., 45.
    again = evaluate_reconstruction(model, cache, torch.arange(3, ROWS, 6), batch_size=5)
    assert metrics["split"] == "holdout"
    assert metrics["count"] == 8
    assert again["mse"] == pytest.approx(metrics["ema"]["mse"], rel=1e-5)
    assert again["cosine"] == pytest.approx(metrics["ema"]["cosine"], rel=1e-5)


def test_load_adapter_uses_ema_weights(trained):
    _, out, _ = trained
    model, manifest = load_adapter(out)
    ema, _ = load_weights(latest_checkpoint(out) / "ema.safetensors")
    for name, value in model.state_dict().items():
        assert torch.equal(value, ema[name]), name
    assert not model.training
    assert manifest["kind"] == "adapter"


def test_load_adapter_raw_weights(trained):
    _, out, _ = trained
    model, _ = load_adapter(latest_checkpoint(out), use_ema=False)
    raw, _ = load_weights(latest_checkpoint(out) / "model.safetensors")
    for name, value in model.state_dict().items():
        assert torch.equal(value, raw[name]), name


def test_stage_rejects_changed_recipe(trained):
    root, out, recipe = trained
    changed = recipe.model_copy(deep=True)
    changed.adapter.kl_weight = 1e-3
    with pytest.raises(FaeError) as error:
        adapter.run(changed, features=root / "features", out=out)
    assert "adapter.kl_weight: 1e-06 there, 0.001 now" in str(error.value)


def test_fetch_serves_flipped_rows(trained):
    root, _, _ = trained
    cache = open_cache(root / "features")
    train_rows = torch.cat([torch.arange(0, 48, 2), torch.arange(1, 33, 2)])  # 40 rows, not in order
    task = AdapterTask(nn.Identity(), cache, train_rows=train_rows, holdout_rows=torch.arange(33, 48, 2), kl_weight=0.0, eval_batch=8)
    batch = task.fetch(torch.tensor([3, 43, 30]))
    assert len(task) == 80
    assert torch.equal(batch[0], cache.get(torch.tensor([6]))[0])  # index 3 -> row train_rows[3] = 6
    assert torch.equal(batch[1], cache.get(torch.tensor([6]), flip=True)[0])  # 43 = 40 + 3: its mirror
    assert torch.equal(batch[2], cache.get(torch.tensor([13]))[0])  # index 30 -> row 1 + 2 * 6


class _Scaled(nn.Module):
    """encode = identity, decode = scale * z: a model with known reconstruction errors."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def encode(self, x):
        return x, torch.zeros_like(x)

    def decode(self, z):
        return self.scale * z


def test_evaluate_reconstruction_known_errors(trained):
    root, _, _ = trained
    cache = open_cache(root / "features")
    rows = torch.arange(10)
    x = cache.get(rows)
    exact = evaluate_reconstruction(_Scaled(1.0), cache, rows, batch_size=4)
    doubled = evaluate_reconstruction(_Scaled(2.0), cache, rows, batch_size=4)
    negated = evaluate_reconstruction(_Scaled(-1.0), cache, rows, batch_size=4)
    assert exact["mse"] == 0.0
    assert exact["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert doubled["mse"] == pytest.approx(float(x.pow(2).mean()), rel=1e-6)
    assert doubled["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert negated["cosine"] == pytest.approx(-1.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# A real signal to a real `fae train-adapter` process


def _command(features, out) -> list[str]:
    sets = [*TINY, "adapter.train.steps=300", "adapter.train.checkpoint_every=100000", "adapter.train.log_every=5"]
    command = [sys.executable, "-m", "fae_cli", "train-adapter", "--features", str(features), "--out", str(out)]
    for item in sets:
        command += ["--set", item]
    return command


def test_sigterm_checkpoints_and_rerun_resumes(tmp_path):
    write_cache(tmp_path / "features")
    out = tmp_path / "adapter"
    command = _command(tmp_path / "features", out)
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    deadline = time.monotonic() + 60
    while not (out / "metrics.jsonl").is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be signalled"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr  # 143, as a shell reports SIGTERM
    assert "stopped by SIGTERM" in stderr
    stopped_at = int(latest_checkpoint(out).name.split("-")[1])
    assert 0 < stopped_at < 300

    rerun = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from step {stopped_at} of 300" in rerun.stderr
    assert read_manifest(out, "adapter")["step"] == 300
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if "eval" not in line]
    assert steps == sorted(set(steps))
