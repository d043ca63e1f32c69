"""`fae run` end to end at toy size: every stage runs, a rerun skips them all, changes are caught."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fae_cli.errors import FaeError
from fae_cli.recipe import load_recipe
from fae_cli.stages import pipeline

TOY = [
    "run.name=toy",
    "run.device='cpu'",
    "data.limit=24",
    "data.image_size=32",
    "encoder.input_size=32",
    "extract.batch_size=12",
    "adapter.heads=1",
    "adapter.head_dim=16",
    "adapter.latent_channels=4",
    "adapter.decoder_layers=1",
    "adapter.decoder_head_dim=16",
    "adapter.holdout=4",
    "adapter.train.steps=3",
    "adapter.train.batch_size=8",
    "adapter.train.warmup_steps=1",
    "decoder.size='custom'",
    "decoder.layers=1",
    "decoder.width=32",
    "decoder.heads=2",
    "decoder.perceptual='none'",
    "decoder.gan_start=1000",
    "decoder.train.steps=2",
    "decoder.train.batch_size=8",
    "decoder.train.warmup_steps=1",
    "decoder.finetune_train.steps=2",
    "decoder.finetune_train.batch_size=8",
    "decoder.finetune_train.warmup_steps=1",
    "generator.model='LightningDiT-debug/1'",
    "generator.num_classes=10",
    "generator.train.steps=3",
    "generator.train.batch_size=8",
    "sample.num_samples=4",
    "sample.batch_size=4",
    "sample.steps=2",
    "evaluate.num_reference=8",
    "evaluate.batch_size=8",
]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pipeline")
    recipe = load_recipe(None, [*TOY, f"run.out_dir={json.dumps(str(root))}"])
    results = pipeline.run(recipe)
    return recipe, root / "toy", results


def test_run_writes_every_artefact(first_run):
    _, folder, results = first_run
    for stage in ("features", "adapter", "decoder-noise", "decoder-finetune", "latents", "generator", "samples", "eval"):
        assert (folder / stage / "manifest.json").is_file(), stage
    with np.load(folder / "samples" / "samples.npz") as samples:
        assert samples["arr_0"].shape == (4, 32, 32, 3)
        assert samples["arr_0"].dtype == np.uint8
    assert Path(results["grid"]).is_file()
    metrics = json.loads((folder / "eval" / "metrics.json").read_text())
    assert metrics["metrics"]["fid"] >= 0.0
    assert results["metrics"]["fid"] == metrics["metrics"]["fid"]


def test_rerun_skips_every_stage(first_run, caplog):
    recipe, folder, _ = first_run
    before = {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}
    caplog.set_level("INFO", logger="fae_cli")
    pipeline.run(recipe)
    skipped = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert len(skipped) == 8
    after = {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}
    assert after == before


def test_changed_setting_stops_naming_folder(first_run):
    recipe, folder, _ = first_run
    changed = recipe.model_copy(deep=True)
    changed.adapter.kl_weight = 0.5
    with pytest.raises(FaeError) as error:
        pipeline.run(changed)
    assert str(folder / "adapter") in str(error.value)
    assert "other settings (adapter.kl_weight: 1e-06 there, 0.5 now)" in str(error.value)


def test_cli_dry_run_lists_stages_and_models():
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "imagenet256-dinov2g-lightningdit-xl.toml"
    result = subprocess.run(
        [sys.executable, "-m", "fae_cli", "run", str(recipe), "--dry-run"],
        capture_output=True, text=True, timeout=300, env={"COLUMNS": "200", **__import__("os").environ},
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert 'model = "LightningDiT-XL/1"' in output
    assert "steps = 2000000" in output
    assert "encoder 38.17M parameters" in output
    assert "674.96M parameters" in output
    for stage in ("extract", "train-adapter", "train-decoders (noise)", "train-decoders (finetune)", "train-generator", "sample"):
        assert stage in output


def test_invalid_model_stops_before_first_stage(tmp_path):
    recipe = load_recipe(None, [*TOY, f"run.out_dir={json.dumps(str(tmp_path))}", "generator.model='SiT-XXL/2'"])
    with pytest.raises(FaeError, match=r"unknown diffusion model 'SiT-XXL/2' \(generator.model\)"):
        pipeline.run(recipe)
    assert list(tmp_path.iterdir()) == []


def test_plan_notes_skips_and_first_conflict(first_run):
    recipe, folder, _ = first_run
    plans = pipeline.plan(recipe)
    assert plans[0].notes == [f"up to date in {folder / 'features'}: skipped"]
    assert all(not plan.warnings for plan in plans)
    changed = recipe.model_copy(deep=True)
    changed.adapter.kl_weight = 0.5
    warned = [(plan.stage, plan.warnings) for plan in pipeline.plan(changed) if plan.warnings]
    assert len(warned) == 1
    assert warned[0][0] == "train-adapter"
    assert warned[0][1][0].startswith(f"the run would stop here: {folder / 'adapter'} was produced by other settings")
