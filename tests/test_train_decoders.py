"""`fae train-decoders` on a tiny synthetic dataset: artefact, reload, GAN switch, frozen modules, finetune checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fae_cli.artifacts import read_manifest
from fae_cli.data.cache import CacheWriter, open_cache
from fae_cli.data.datasets import open_images
from fae_cli.errors import FaeError
from fae_cli.evaluation.recon import psnr
from fae_cli.recipe import load_recipe
from fae_cli.stages import adapter, decoders, extract
from fae_cli.stages.decoders import load_pixel_decoder
from fae_cli.stages.plan import stage_hash
from fae_cli.training.checkpoint import load_weights
from fae_cli.training.decoder_losses import feature_scale

TRAIN_IMAGES = 24
HOLDOUT_IMAGES = 8
SIZE = 32  # EfficientNet-Lite0 at 32 px: a 2 x 2 grid of 112-wide tokens, fast on CPU
GAN_START = 2
STEPS = 4

TINY = [
    f"data.image_size={SIZE}",
    f"data.holdout={HOLDOUT_IMAGES}",
    f"encoder.input_size={SIZE}",
    "extract.batch_size=16",
    "extract.flip=true",
    "decoder.size='custom'",
    "decoder.layers=1",
    "decoder.width=32",
    "decoder.heads=2",
    "decoder.disc_channels=8",
    "decoder.disc_stages=1",
    f"decoder.gan_start={GAN_START}",
    f"decoder.train.steps={STEPS}",
    "decoder.train.batch_size=8",
    "decoder.train.warmup_steps=1",
    "decoder.train.learning_rate=0.001",
    "decoder.train.ema_decay=0.5",
    "decoder.train.log_every=1",
    "decoder.train.checkpoint_every=100",
    "decoder.finetune_train.steps=2",
    "decoder.finetune_train.batch_size=8",
    "decoder.finetune_train.warmup_steps=0",
    "decoder.finetune_train.checkpoint_every=100",
    "adapter.heads=2",
    "adapter.head_dim=8",
    "adapter.latent_channels=4",
    "adapter.decoder_layers=1",
    "adapter.decoder_head_dim=16",
    "adapter.holdout=4",
    "adapter.train.steps=2",
    "adapter.train.batch_size=8",
    "adapter.train.warmup_steps=0",
    "adapter.train.checkpoint_every=100",
]


def write_images(path) -> None:
    """An .npz of smooth random colour images (low-frequency noise), uint8 N x S x S x 3."""
    generator = np.random.default_rng(0)
    coarse = generator.uniform(0, 255, size=(TRAIN_IMAGES + HOLDOUT_IMAGES, 4, 4, 3))
    images = coarse.repeat(SIZE // 4, axis=1).repeat(SIZE // 4, axis=2).astype(np.uint8)
    np.savez(path, images=images, labels=np.arange(len(images)) % 2)


def tiny_recipe(root, *overrides):
    return load_recipe(None, [*TINY, f"data.source={json.dumps(str(root / 'images.npz'))}", f"run.out_dir={json.dumps(str(root / 'runs'))}", *overrides])


def build_noise_decoder(root):
    """Write images, extract their features and train the noise-phase decoder; return the recipe."""
    write_images(root / "images.npz")
    recipe = tiny_recipe(root)
    extract.run(recipe)
    decoders.run(recipe, phase="noise")
    return recipe


def write_fake_cache(folder, *, encoder: str, weights_hash: str, width: int, rows: int = 16) -> None:
    """A random feature cache with a 2 x 2 grid that claims `encoder` and `width`."""
    features = torch.randn(rows, 4, width, generator=torch.Generator().manual_seed(1))
    facts = {
        "encoder": encoder,
        "weights_hash": weights_hash,
        "image_size": SIZE,
        "input_size": SIZE,
        "grid": [2, 2],
        "width": width,
        "dtype": "float32",
        "flip": False,
        "num_classes": 0,
    }
    writer = CacheWriter(folder, kind="features", count=rows, identity=facts)
    writer.prepare()
    writer.write(range(rows), {"features": features, "labels": torch.full((rows,), -1), "index": torch.arange(rows)}, [])
    writer.finish(recipe_hash="synthetic", **facts)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: a second thread only adds synchronisation, which is slow on a shared CPU.
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("decoders")
    recipe = build_noise_decoder(root)
    adapter.run(recipe)
    return root, recipe


def _paths(trained):
    root, recipe = trained
    run = root / "runs" / recipe.run.name
    return run / "features", run / "decoder-noise", run / "adapter"


def test_noise_phase_manifest(trained):
    _, recipe = trained
    features, out, _ = _paths(trained)
    manifest = read_manifest(out, "pixel-decoder")
    assert manifest["parents"]["features"]["path"] == str(features.resolve())
    assert manifest["recipe_hash"] == stage_hash(recipe, "decoder-noise")
    assert manifest["phase"] == "noise"
    assert manifest["encoder"] == "efficientnet-lite0"
    assert manifest["grid"] == [2, 2]
    assert manifest["width"] == 112
    assert manifest["step"] == STEPS
    assert manifest["checkpoint"] == f"checkpoints/step-{STEPS:08d}"


def test_noise_sigma_follows_feature_scale(trained):
    features, out, _ = _paths(trained)
    cache = open_cache(features)
    expected = 0.4 * feature_scale(cache.load_all())
    assert read_manifest(out)["noise_sigma"] == pytest.approx(expected, rel=1e-6)


def test_noise_sigma_from_recipe(trained):
    root, _ = trained
    features, _, _ = _paths(trained)
    recipe = tiny_recipe(root, "decoder.noise_sigma=0.25", "decoder.perceptual='none'")
    prepared = decoders.prepare(recipe, "noise", out=root / "sigma")
    assert prepared.task.sigma == 0.25


def test_load_pixel_decoder_ema_weights(trained):
    _, out, _ = _paths(trained)
    decoder, manifest = load_pixel_decoder(out)
    stored, _ = load_weights(out / manifest["checkpoint"] / "ema.safetensors")
    for name, tensor in decoder.state_dict().items():
        assert torch.equal(tensor, stored[name]), name


def test_load_pixel_decoder_raw_weights(trained):
    _, out, _ = _paths(trained)
    decoder, manifest = load_pixel_decoder(out, use_ema=False)
    stored, _ = load_weights(out / manifest["checkpoint"] / "model.safetensors")
    assert torch.equal(decoder.head.weight, stored["head.weight"])


def test_load_pixel_decoder_rebuilds_config(trained):
    _, out, _ = _paths(trained)
    decoder, manifest = load_pixel_decoder(out)
    assert decoder.config == manifest["config"]
    assert decoder(torch.zeros(3, 4, 112)).shape == (3, 3, SIZE, SIZE)


def test_load_pixel_decoder_rejects_adapter(trained):
    _, _, adapter_out = _paths(trained)
    with pytest.raises(FaeError, match="expected 'pixel-decoder'"):
        load_pixel_decoder(adapter_out)


def test_metrics_match_reloaded_ema(trained):
    features, out, _ = _paths(trained)
    metrics = json.loads((out / "metrics.json").read_text())
    decoder, _ = load_pixel_decoder(out)
    cache = open_cache(features)
    dataset = open_images(tiny_recipe(trained[0]).data, "train")
    rows = torch.arange(min(decoders.EVAL_ROWS, len(cache)))
    images = torch.stack([dataset[int(index)][0] for index in cache.index[rows]]).float() / 255
    with torch.no_grad():
        reconstructions = (decoder(cache.get(rows)).clamp(-1, 1) + 1) / 2
    assert metrics["ema_psnr"] == pytest.approx(float(psnr(images, reconstructions).mean()), abs=1e-4)


def test_training_lowers_reconstruction_loss(trained):
    _, out, _ = _paths(trained)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {record["step"]: record["recon"] for record in records if "recon" in record}
    assert losses[STEPS] < losses[1]


def test_discriminator_starts_at_gan_start(trained):
    _, out, _ = _paths(trained)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    with_gan = sorted(record["step"] for record in records if "d_hinge" in record)
    assert with_gan == list(range(GAN_START + 1, STEPS + 1))


def test_generator_gan_term_starts_at_gan_start(trained):
    _, out, _ = _paths(trained)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    with_gan = sorted(record["step"] for record in records if "gan" in record)
    assert with_gan == list(range(GAN_START + 1, STEPS + 1))


def test_pairs_serve_flipped_rows(trained):
    root, recipe = trained
    features, _, _ = _paths(trained)
    cache = open_cache(features)
    pairs = decoders.open_pairs(recipe, cache, features)
    rows = len(cache)
    got_features, got_images = pairs.get(torch.tensor([1, rows + 1]))
    image, _ = open_images(recipe.data, "train")[int(cache.index[1])]
    assert len(pairs) == 2 * rows
    assert torch.equal(got_features[0], cache.get(torch.tensor([1]))[0])
    assert torch.equal(got_features[1], cache.get(torch.tensor([1]), flip=True)[0])
    assert torch.equal(got_images[0], image)
    assert torch.equal(got_images[1], image.flip(-1))


def test_pairs_reject_other_dataset(trained):
    root, _ = trained
    features, _, _ = _paths(trained)
    recipe = tiny_recipe(root, "data.holdout=4")
    with pytest.raises(FaeError, match="dataset count mismatch"):
        decoders.open_pairs(recipe, open_cache(features), features)


def test_training_step_leaves_frozen_modules_without_grad(trained):
    root, recipe = trained
    prepared = decoders.prepare(recipe, "finetune", out=root / "step-check")
    trainer, task = prepared.trainer, prepared.task
    trainer.setup()
    results = trainer.accumulate(torch.arange(8), step=GAN_START)

    encoder = task.objective.perceptual.network
    frozen = {"encoder": encoder, "adapter": task.adapter}
    for name, module in frozen.items():
        assert all(param.grad is None for param in module.parameters()), name
        assert not any(param.requires_grad for param in module.parameters()), name
    trained_ids = {id(param) for group in trainer.optimizer.param_groups for param in group["params"]}
    assert trained_ids == {id(param) for param in task.model.parameters()}
    assert all(param.grad is not None for param in task.model.parameters())
    assert all(param.grad is not None for param in task.auxiliary.model.parameters())
    assert float(results[0].values["perceptual"]) > 0


def test_finetune_starts_from_noise_ema(trained):
    root, recipe = trained
    _, noise_out, _ = _paths(trained)
    prepared = decoders.prepare(recipe, "finetune", out=root / "init-check")
    noise_decoder, _ = load_pixel_decoder(noise_out)
    for name, tensor in noise_decoder.state_dict().items():
        assert torch.equal(prepared.task.model.state_dict()[name], tensor), name


def test_finetune_writes_manifest(trained):
    root, recipe = trained
    features, noise_out, adapter_out = _paths(trained)
    out = decoders.run(recipe, phase="finetune")
    manifest = read_manifest(out, "pixel-decoder")
    assert manifest["phase"] == "finetune"
    assert manifest["recipe_hash"] == stage_hash(recipe, "decoder-finetune")
    assert manifest["parents"]["adapter"]["path"] == str(adapter_out.resolve())
    assert manifest["parents"]["init"]["path"] == str(noise_out.resolve())
    assert manifest["step"] == 2


def _fake_adapter(root, name, *, encoder, width, weights_hash):
    """Train a one-step adapter on a random cache that claims `encoder` and `width`."""
    write_fake_cache(root / f"{name}-features", encoder=encoder, weights_hash=weights_hash, width=width)
    recipe = tiny_recipe(root, "adapter.train.steps=1")
    return adapter.run(recipe, features=root / f"{name}-features", out=root / f"{name}-adapter")


def test_finetune_rejects_adapter_width(trained):
    root, recipe = trained
    _, noise_out, _ = _paths(trained)
    weights_hash = read_manifest(noise_out)["weights_hash"]
    other = _fake_adapter(root, "narrow", encoder="efficientnet-lite0", width=16, weights_hash=weights_hash)
    with pytest.raises(FaeError, match="feature width mismatch") as error:
        decoders.prepare(recipe, "finetune", adapter=other, out=root / "narrow-decoder")
    assert "has 112" in str(error.value)
    assert "has 16" in str(error.value)


def test_finetune_rejects_adapter_encoder(trained):
    root, recipe = trained
    other = _fake_adapter(root, "dino", encoder="dinov2-s", width=112, weights_hash="0" * 16)
    with pytest.raises(FaeError, match="encoder mismatch") as error:
        decoders.prepare(recipe, "finetune", adapter=other, out=root / "dino-decoder")
    assert "'efficientnet-lite0'" in str(error.value)
    assert "'dinov2-s'" in str(error.value)


def test_prepare_rejects_unknown_phase(trained):
    _, recipe = trained
    with pytest.raises(FaeError, match="invalid decoder phase 'pixels'"):
        decoders.prepare(recipe, "pixels")
