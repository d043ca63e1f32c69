"""`fae train-generator`: diffusion and flow training, exact resume, latent checks, grids, loading."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from generator_pipeline import (
    CLASSES,
    IMAGE_SIZE,
    LATENT_CHANNELS,
    ROWS,
    build_inputs,
    tiny_recipe,
    write_feature_cache,
)
from PIL import Image

from fae_cli.artifacts import read_manifest
from fae_cli.data.cache import CacheWriter, open_cache
from fae_cli.diffusion.transport import LatentStats, Transport
from fae_cli.errors import FaeError
from fae_cli.recipe import load_recipe
from fae_cli.stages import generator
from fae_cli.stages.generation import load_generator
from fae_cli.stages.generator import GeneratorTask
from fae_cli.stages.latents import run_latents
from fae_cli.stages.plan import RunPaths, stage_hash
from fae_cli.training.checkpoint import CHECKPOINTS, LATEST, load_weights

FLOW = ["generator.family='flow'", "generator.model='STARFlow-debug'", "generator.flow_noise_sigma=0.2"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: a second thread only adds synchronisation, which is slow on a shared CPU.
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("generator")
    recipe = build_inputs(root)
    paths = RunPaths.of(recipe)
    run_latents(recipe, paths.adapter)
    return root, recipe, paths


@pytest.fixture(scope="module")
def diffusion(inputs):
    root, recipe, paths = inputs
    return generator.run(recipe, out=root / "diffusion")


@pytest.fixture(scope="module")
def flow(inputs):
    root, _, _ = inputs
    recipe = tiny_recipe(root, *FLOW)
    return recipe, generator.run(recipe, out=root / "flow")


def step_folder(out, step):
    return out / CHECKPOINTS / f"step-{step:08d}"


def resume_from_step_two(finished, copy):
    """Copy a finished 4-step run, drop its step-4 checkpoint and point `latest` at step 2."""
    shutil.copytree(finished, copy)
    shutil.rmtree(step_folder(copy, 4))
    (copy / "manifest.json").unlink()
    (copy / CHECKPOINTS / LATEST).write_text("step-00000002\n")


def assert_same_weights(first, second):
    for name in ("model.safetensors", "ema.safetensors"):
        a, _ = load_weights(first / name)
        b, _ = load_weights(second / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


def test_diffusion_resume_is_exact(inputs, diffusion, tmp_path):
    _, recipe, _ = inputs
    resume_from_step_two(diffusion, tmp_path / "resumed")
    generator.run(recipe, out=tmp_path / "resumed")
    assert_same_weights(step_folder(diffusion, 4), step_folder(tmp_path / "resumed", 4))


def test_flow_resume_is_exact(flow, tmp_path):
    recipe, out = flow
    resume_from_step_two(out, tmp_path / "resumed")
    generator.run(recipe, out=tmp_path / "resumed")
    assert_same_weights(step_folder(out, 4), step_folder(tmp_path / "resumed", 4))


def test_training_changes_weights(diffusion):
    start, _ = load_weights(step_folder(diffusion, 2) / "model.safetensors")
    end, _ = load_weights(step_folder(diffusion, 4) / "model.safetensors")
    assert not torch.equal(start["final.linear.weight"], end["final.linear.weight"])


def test_flow_metrics_report_bits_per_dim(flow):
    _, out = flow
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if "loss" in line]
    assert [line["step"] for line in train] == [1, 2, 3, 4]
    for line in train:
        assert line["bits_per_dim"] == pytest.approx(line["loss"] / np.log(2), rel=1e-5)


def test_manifest_records_stage_and_latents(inputs, diffusion):
    _, recipe, paths = inputs
    manifest = read_manifest(diffusion, "generator")
    latents = open_cache(paths.latents, kind="latents").manifest
    assert manifest["recipe_hash"] == stage_hash(recipe, "generator")
    assert manifest["family"] == "diffusion"
    assert manifest["model"] == "LightningDiT-debug/1"
    assert manifest["step"] == 4
    assert manifest["latent_stats"]["mean"] == latents["mean"]
    assert manifest["latents"]["adapter"] == latents["adapter"]
    assert manifest["parents"]["latents"]["kind"] == "latents"


def test_load_generator_rebuilds_diffusion(inputs, diffusion):
    _, _, paths = inputs
    loaded = load_generator(diffusion)
    ema, _ = load_weights(step_folder(diffusion, 4) / "ema.safetensors")
    stats = LatentStats.from_manifest(open_cache(paths.latents, kind="latents").manifest)
    assert loaded.ema
    assert loaded.step == 4
    assert loaded.stats == stats
    assert loaded.latent_shape == (LATENT_CHANNELS, 4, 4)
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, ema[name]), name


def test_flow_stores_sigma_and_statistics(inputs, flow):
    _, _, paths = inputs
    _, out = flow
    loaded = load_generator(out)
    stats = LatentStats.from_manifest(open_cache(paths.latents, kind="latents").manifest)
    assert loaded.facts["spec"]["noise_sigma"] == 0.2
    assert loaded.model.config.noise_sigma == 0.2
    assert loaded.model.latent_mean.tolist() == pytest.approx(list(stats.mean), rel=1e-6)
    assert loaded.model.latent_std.tolist() == pytest.approx(list(stats.std), rel=1e-6)


def test_grid_written_for_fixed_classes(diffusion):
    grid = np.asarray(Image.open(diffusion / "grids" / "step-00000004.png"))
    border = 2
    assert grid.shape == (2 * (IMAGE_SIZE + border) + border, CLASSES * (IMAGE_SIZE + border) + border, 3)


def test_fetch_normalises_diffusion_latents(inputs):
    _, _, paths = inputs
    cache = open_cache(paths.latents, kind="latents")
    stats = LatentStats.from_manifest(cache.manifest)
    task = GeneratorTask(torch.nn.Linear(1, 1), "diffusion", cache, stats, Transport(), None, conditional=True)
    latents, labels = task.fetch(torch.arange(2 * ROWS))
    assert len(task) == 2 * ROWS
    assert latents.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (latents.std(dim=(0, 2, 3), correction=0) - 1).abs().max() < 1e-5
    assert torch.equal(latents[ROWS + 3], stats.normalize(cache.get(torch.tensor([3]), flip=True))[0])
    assert labels.tolist() == [i % CLASSES for i in range(ROWS)] * 2


def test_resume_rejects_other_statistics(inputs, diffusion, tmp_path):
    root, recipe, paths = inputs
    write_feature_cache(tmp_path / "features", seed=1, scale=3.0)
    other = run_latents(recipe, paths.adapter, out=tmp_path / "latents", features=tmp_path / "features")
    with pytest.raises(FaeError) as error:
        generator.run(recipe, latents=other, out=diffusion)
    assert "latent statistics mismatch" in str(error.value)


def write_latent_cache(folder, manifest, channels):
    """A latent cache with another channel count that claims the same encoder and adapter as `manifest`."""
    facts = {key: manifest[key] for key in ("encoder", "adapter", "grid", "num_classes", "flip", "mode")}
    facts.update(latent_channels=channels, mean=[0.0] * channels, std=[1.0] * channels)
    writer = CacheWriter(folder, kind="latents", count=ROWS, identity={"channels": channels})
    writer.prepare()
    tensors = {"latents": torch.randn(ROWS, channels, 4, 4), "labels": torch.arange(ROWS) % CLASSES, "index": torch.arange(ROWS)}
    if facts["flip"]:
        tensors["latents_flip"] = tensors["latents"].flip(-1)
    writer.write(range(ROWS), tensors, [])
    writer.finish(recipe_hash="synthetic", **facts)


def test_resume_rejects_other_channels(inputs, diffusion, tmp_path):
    _, recipe, paths = inputs
    write_latent_cache(tmp_path / "latents", open_cache(paths.latents, kind="latents").manifest, channels=2)
    with pytest.raises(FaeError) as error:
        generator.run(recipe, latents=tmp_path / "latents", out=diffusion)
    assert "latent channels mismatch" in str(error.value)


def test_num_classes_mismatch_rejected(inputs, tmp_path):
    root, _, _ = inputs
    recipe = tiny_recipe(root, "generator.num_classes=5")
    with pytest.raises(FaeError) as error:
        generator.run(recipe, out=tmp_path / "generator")
    assert "generator.num_classes=3" in str(error.value)


def test_flow_rejects_diffusion_model_name(inputs, tmp_path):
    root, _, _ = inputs
    recipe = tiny_recipe(root, "generator.family='flow'")
    with pytest.raises(FaeError) as error:
        generator.run(recipe, out=tmp_path / "generator")
    assert "unknown flow model 'LightningDiT-debug/1'" in str(error.value)


def test_train_table_keeps_constant_schedule():
    recipe = load_recipe(None, ["generator.train.steps=10"])
    assert recipe.generator.train.schedule == "constant"
    assert recipe.generator.train.warmup_steps == 0
    assert load_recipe(None, ["generator.train.warmup_steps=5"]).generator.train.warmup_steps == 5
