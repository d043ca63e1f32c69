"""`fae evaluate probe` on labelled synthetic caches: x, x-hat and z, and compatibility checks."""

from __future__ import annotations

import json

import pytest
import torch

from fae_cli.data.cache import CacheWriter
from fae_cli.errors import FaeError
from fae_cli.evaluation.probe import linear_probe, run_probe
from fae_cli.recipe import load_recipe
from fae_cli.stages import adapter

GRID = (2, 2)
WIDTH = 8
CLASSES = 3

TINY_ADAPTER = [
    "adapter.heads=1",
    "adapter.head_dim=8",
    "adapter.latent_channels=4",
    "adapter.decoder_layers=1",
    "adapter.decoder_head_dim=8",
    "adapter.holdout=6",
    "adapter.train.steps=4",
    "adapter.train.batch_size=8",
    "adapter.train.warmup_steps=1",
    "adapter.train.checkpoint_every=100",
    "adapter.train.log_every=2",
    "evaluate.probe_steps=60",
    "evaluate.probe_lr=0.05",
]


def write_labelled_cache(folder, rows: int, seed: int, grid=GRID) -> None:
    """Features whose class shifts one coordinate, so a linear probe can separate them."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(rows) % CLASSES
    features = 0.3 * torch.randn(rows, grid[0] * grid[1], WIDTH, generator=generator)
    features[torch.arange(rows), :, labels] += 2.0
    facts = {
        "encoder": "synthetic",
        "weights_hash": "0" * 16,
        "image_size": 16,
        "input_size": 16,
        "grid": list(grid),
        "width": WIDTH,
        "dtype": "float32",
        "flip": False,
        "num_classes": CLASSES,
    }
    writer = CacheWriter(folder, kind="features", count=rows, identity=facts)
    writer.prepare()
    writer.write(range(rows), {"features": features, "labels": labels, "index": torch.arange(rows)}, [])
    writer.finish(recipe_hash="synthetic", **facts)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("probe")
    recipe = load_recipe(None, [*TINY_ADAPTER, f"run.out_dir={json.dumps(str(root))}", "run.name=probe"])
    folder = root / "probe"
    write_labelled_cache(folder / "features", rows=36, seed=0)
    write_labelled_cache(folder / "features-holdout", rows=30, seed=1)
    adapter.run(recipe)
    return recipe, folder


def test_probe_reports_x_xhat_z(run_dir):
    recipe, folder = run_dir
    report = run_probe(recipe, out=folder / "eval-probe")
    assert set(report["metrics"]) == {"probe_x", "probe_x_hat", "probe_z"}
    for value in report["metrics"].values():
        assert 0.0 <= value <= 1.0
    written = json.loads((folder / "eval-probe" / "metrics.json").read_text())
    assert written["metrics"] == report["metrics"]


def test_probe_x_equals_direct_linear_probe(run_dir):
    recipe, folder = run_dir
    from fae_cli.data.cache import open_cache

    train = open_cache(folder / "features")
    test = open_cache(folder / "features-holdout")
    expected = linear_probe(
        train.load_all(), train.labels, test.load_all(), test.labels,
        steps=recipe.evaluate.probe_steps, lr=recipe.evaluate.probe_lr, seed=recipe.run.seed,
    )
    report = run_probe(recipe, out=folder / "eval-direct")
    assert report["metrics"]["probe_x"] == expected
    assert expected == 1.0


def test_probe_rejects_mismatched_holdout_grid(tmp_path):
    recipe = load_recipe(None, [f"run.out_dir={json.dumps(str(tmp_path))}", "run.name=bad"])
    write_labelled_cache(tmp_path / "bad" / "features", rows=12, seed=0)
    write_labelled_cache(tmp_path / "bad" / "features-holdout", rows=12, seed=1, grid=(1, 4))
    with pytest.raises(FaeError) as error:
        run_probe(recipe, adapter=None)
    assert "grid" in str(error.value)
    assert "[2, 2]" in str(error.value)
    assert "[1, 4]" in str(error.value)
