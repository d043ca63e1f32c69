"""`fae extract --latents`: latents equal the adapter's encoding, statistics, modes, resume, sources."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from generator_pipeline import GRID, LATENT_CHANNELS, ROWS, build_inputs
from safetensors.torch import load_file

from fae_cli.data.cache import open_cache
from fae_cli.diffusion.transport import LatentStats
from fae_cli.errors import FaeError
from fae_cli.recipe import load_recipe
from fae_cli.stages import adapter, extract
from fae_cli.stages.adapter import load_adapter
from fae_cli.stages.latents import run_latents
from fae_cli.stages.plan import RunPaths, stage_hash


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: a second thread only adds synchronisation, which is slow on a shared CPU.
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("latents")
    recipe = build_inputs(root)
    return root, recipe, RunPaths.of(recipe)


def encode_means(model, features):
    mean, _ = model.encode(features)
    return mean.transpose(1, 2).reshape(len(features), LATENT_CHANNELS, *GRID)


def test_latents_equal_adapter_means(inputs, tmp_path):
    _, recipe, paths = inputs
    out = run_latents(recipe, paths.adapter, out=tmp_path / "latents")
    cache = open_cache(out, kind="latents")
    features = open_cache(paths.features)
    model, _ = load_adapter(paths.adapter)
    with torch.no_grad():
        expected = encode_means(model, features.load_all())
        expected_flip = encode_means(model, features.load_all(flip=True))
    assert len(cache) == ROWS
    assert cache.grid == GRID
    assert cache.width == LATENT_CHANNELS
    assert torch.equal(cache.load_all(), expected)
    assert torch.equal(cache.load_all(flip=True), expected_flip)
    assert torch.equal(cache.labels, features.labels)


def test_manifest_statistics_cover_flips(inputs, tmp_path):
    _, recipe, paths = inputs
    out = run_latents(recipe, paths.adapter, out=tmp_path / "latents")
    cache = open_cache(out, kind="latents")
    values = torch.cat([cache.load_all(), cache.load_all(flip=True)]).double()
    per_channel = values.transpose(0, 1).reshape(LATENT_CHANNELS, -1)
    assert cache.manifest["mean"] == pytest.approx(per_channel.mean(dim=1).tolist(), rel=1e-9, abs=1e-12)
    assert cache.manifest["std"] == pytest.approx(per_channel.std(dim=1, correction=0).tolist(), rel=1e-9)
    assert cache.manifest["stats_rows"] == 2 * ROWS


def test_manifest_names_encoder_and_adapter(inputs, tmp_path):
    _, recipe, paths = inputs
    out = run_latents(recipe, paths.adapter, out=tmp_path / "latents")
    manifest = open_cache(out, kind="latents").manifest
    adapter_manifest = json.loads((paths.adapter / "manifest.json").read_text())
    stats = LatentStats.from_manifest(manifest)
    assert manifest["encoder"] == "synthetic"
    assert manifest["mode"] == "mean"
    assert manifest["latent_channels"] == LATENT_CHANNELS
    assert manifest["adapter"]["path"] == str(paths.adapter.resolve())
    assert manifest["adapter"]["step"] == 2
    assert manifest["source"]["kind"] == "features"
    assert manifest["recipe_hash"] == stage_hash(recipe, "latents")
    assert stats.adapter == adapter_manifest["recipe_hash"]
    assert stats.channels == LATENT_CHANNELS


def test_normalised_latents_have_unit_statistics(inputs, tmp_path):
    _, recipe, paths = inputs
    cache = open_cache(run_latents(recipe, paths.adapter, out=tmp_path / "latents"), kind="latents")
    stats = LatentStats.from_manifest(cache.manifest)
    latents = torch.cat([cache.load_all(), cache.load_all(flip=True)])
    normalised = stats.normalize(latents)
    assert normalised.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (normalised.std(dim=(0, 2, 3), correction=0) - 1).abs().max() < 1e-5
    assert (stats.denormalize(normalised) - latents).abs().max() < 1e-6


def test_sample_mode_independent_of_shards(inputs, tmp_path):
    _, recipe, paths = inputs
    sampled = recipe.model_copy(deep=True)
    sampled.extract.latent_mode = "sample"
    sampled.extract.shard_size = 7
    sampled.extract.batch_size = 5
    first = open_cache(run_latents(sampled, paths.adapter, out=tmp_path / "small-shards"), kind="latents")
    sampled.extract.shard_size = 64
    second = open_cache(run_latents(sampled, paths.adapter, out=tmp_path / "one-shard"), kind="latents")
    means = open_cache(run_latents(recipe, paths.adapter, out=tmp_path / "means"), kind="latents")
    assert len(first.manifest["shards"]) == 6
    assert torch.allclose(first.load_all(), second.load_all(), atol=1e-6)
    assert not torch.allclose(first.load_all(), means.load_all(), atol=1e-3)
    assert first.manifest["mode"] == "sample"


def test_rerun_rewrites_deleted_shard_only(inputs, tmp_path):
    _, recipe, paths = inputs
    sharded = recipe.model_copy(deep=True)
    sharded.extract.shard_size = 16
    out = run_latents(sharded, paths.adapter, out=tmp_path / "latents")
    shards = sorted(out.glob("part-*.safetensors"))
    before = {path.name: load_file(path) for path in shards}
    times = {path.name: path.stat().st_mtime_ns for path in shards}
    shards[1].unlink()
    (out / "manifest.json").unlink()

    run_latents(sharded, paths.adapter, out=out)

    after = sorted(out.glob("part-*.safetensors"))
    assert [path.name for path in after] == list(before)
    assert after[0].stat().st_mtime_ns == times[after[0].name]
    for name, tensors in before.items():
        again = load_file(out / name)
        for key, value in tensors.items():
            assert torch.equal(again[key], value), (name, key)


def test_rerun_with_other_mode_rejected(inputs, tmp_path):
    _, recipe, paths = inputs
    out = run_latents(recipe, paths.adapter, out=tmp_path / "latents")
    sampled = recipe.model_copy(deep=True)
    sampled.extract.latent_mode = "sample"
    with pytest.raises(FaeError) as error:
        run_latents(sampled, paths.adapter, out=out)
    assert "mode: 'mean' there, 'sample' now" in str(error.value)


def test_extract_command_delegates(inputs, tmp_path):
    _, recipe, paths = inputs
    out = extract.run_latents(recipe, adapter=paths.adapter, out=tmp_path / "latents")
    assert open_cache(out, kind="latents").manifest["kind"] == "latents"


# ----------------------------------------------------------------------------------------------
# From images: EfficientNet-Lite0 at 32 px (2 x 2 tokens of width 112)

SIZE = 32
IMAGES = 12
IMAGE_RECIPE = [
    f"data.image_size={SIZE}",
    f"encoder.input_size={SIZE}",
    "run.device='cpu'",
    "extract.batch_size=4",
    "extract.flip=true",
    "adapter.heads=2",
    "adapter.head_dim=8",
    "adapter.latent_channels=4",
    "adapter.decoder_layers=1",
    "adapter.decoder_head_dim=16",
    "adapter.holdout=0",
    "adapter.train.steps=1",
    "adapter.train.batch_size=4",
    "adapter.train.warmup_steps=0",
]


def test_images_source_matches_features_source(tmp_path):
    generator = np.random.default_rng(0)
    coarse = generator.uniform(0, 255, size=(IMAGES, 4, 4, 3))
    images = coarse.repeat(SIZE // 4, axis=1).repeat(SIZE // 4, axis=2).astype(np.uint8)
    np.savez(tmp_path / "images.npz", images=images, labels=np.arange(IMAGES) % 2)
    recipe = load_recipe(None, [*IMAGE_RECIPE, f"data.source={json.dumps(str(tmp_path / 'images.npz'))}", f"run.out_dir={json.dumps(str(tmp_path / 'runs'))}"])
    paths = RunPaths.of(recipe)
    extract.run(recipe)
    adapter.run(recipe)

    from_features = open_cache(run_latents(recipe, paths.adapter, out=tmp_path / "from-features"), kind="latents")
    from_images = open_cache(run_latents(recipe, paths.adapter, out=tmp_path / "from-images", features=tmp_path / "absent"), kind="latents")
    assert from_features.manifest["source"]["kind"] == "features"
    assert from_images.manifest["source"]["kind"] == "images"
    assert torch.allclose(from_images.load_all(), from_features.load_all(), atol=1e-5)
    assert torch.allclose(from_images.load_all(flip=True), from_features.load_all(flip=True), atol=1e-5)
    assert from_images.labels.tolist() == [i % 2 for i in range(IMAGES)]
    assert from_images.manifest["mean"] == pytest.approx(from_features.manifest["mean"], abs=1e-5)
