"""Tiny artefacts for the latent, generator and sampling tests.

The feature cache is synthetic: 4 x 4 tokens of width 16, 3 classes, with flipped copies. The
adapter is trained on it by the real stage, and the pixel decoder (16 x 16 images) is saved
through the real checkpoint writer. The recipe overrides keep every model tiny.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fae_cli.data.cache import CacheWriter
from fae_cli.models.pixel_decoder import PixelDecoder
from fae_cli.recipe import Recipe, load_recipe
from fae_cli.stages import adapter
from fae_cli.stages.decoders import KIND as DECODER_KIND
from fae_cli.stages.decoders import MODEL_KEY as DECODER_KEY
from fae_cli.stages.plan import RunPaths
from fae_cli.training.checkpoint import save_checkpoint

GRID = (4, 4)
WIDTH = 16
ROWS = 40
CLASSES = 3
IMAGE_SIZE = 16  # pixel decoder output: 4 x 4 tokens of 4 x 4 pixels
LATENT_CHANNELS = 4

FEATURE_FACTS = {
    "encoder": "synthetic",
    "weights_hash": "0" * 16,
    "image_size": IMAGE_SIZE,
    "input_size": IMAGE_SIZE,
    "grid": list(GRID),
    "width": WIDTH,
    "dtype": "float32",
    "num_classes": CLASSES,
}

TINY = [
    "run.name='tiny'",
    "run.device='cpu'",
    "adapter.heads=2",
    "adapter.head_dim=8",
    f"adapter.latent_channels={LATENT_CHANNELS}",
    "adapter.decoder_layers=1",
    "adapter.decoder_head_dim=8",
    "adapter.holdout=0",
    "adapter.train.steps=2",
    "adapter.train.batch_size=8",
    "adapter.train.warmup_steps=0",
    "adapter.train.learning_rate=0.01",
    "adapter.train.checkpoint_every=100",
    "generator.model='LightningDiT-debug/1'",
    f"generator.num_classes={CLASSES}",
    "generator.train.steps=4",
    "generator.train.batch_size=8",
    "generator.train.learning_rate=0.01",
    "generator.train.ema_decay=0.5",
    "generator.train.checkpoint_every=2",
    "generator.train.log_every=1",
    "sample.num_samples=12",
    "sample.batch_size=4",
    "sample.steps=3",
]


def tiny_recipe(root: Path, *overrides: str) -> Recipe:
    return load_recipe(None, [*TINY, f"run.out_dir={json.dumps(str(root / 'runs'))}", *overrides])


def write_feature_cache(folder: Path, *, flip: bool = True, seed: int = 0, scale: float = 1.0) -> None:
    """A feature cache of ROWS random rows with labels i mod CLASSES, in the layout `fae extract` writes."""
    generator = torch.Generator().manual_seed(seed)
    features = scale * torch.randn(ROWS, GRID[0] * GRID[1], WIDTH, generator=generator)
    facts = {**FEATURE_FACTS, "flip": flip}
    writer = CacheWriter(folder, kind="features", count=ROWS, identity=facts)
    writer.prepare()
    tensors = {"features": features, "labels": torch.arange(ROWS) % CLASSES, "index": torch.arange(ROWS)}
    if flip:
        # Mirror each token grid left to right, as features of a flipped image would be.
        tensors["features_flip"] = features.unflatten(1, GRID).flip(2).flatten(1, 2).contiguous()
    writer.write(range(ROWS), tensors, [])
    writer.finish(recipe_hash=f"synthetic-{seed}", **facts)


def save_pixel_decoder(folder: Path, *, width: int = WIDTH) -> Path:
    """A random pixel decoder written as `fae train-decoders` writes its checkpoints."""
    torch.manual_seed(5)
    decoder = PixelDecoder(width, GRID, IMAGE_SIZE, "custom", layers=1, width=32, heads=2)
    facts = {
        **{key: FEATURE_FACTS[key] for key in ("encoder", "weights_hash", "input_size", "image_size", "grid")},
        "width": width,
        "phase": "noise",
        "noise_sigma": 0.1,
        "config": decoder.config,
    }
    save_checkpoint(folder, kind=DECODER_KIND, step=1, model=decoder, ema=decoder, metadata={DECODER_KEY: facts})
    return folder


def build_inputs(root: Path, *overrides: str) -> Recipe:
    """Write the feature cache, train the adapter and save a noise-phase pixel decoder under `root/runs/tiny`."""
    recipe = tiny_recipe(root, *overrides)
    paths = RunPaths.of(recipe)
    write_feature_cache(paths.features)
    adapter.run(recipe)
    save_pixel_decoder(paths.decoder_noise)
    return recipe
