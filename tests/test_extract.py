"""`fae extract`: cached features equal a direct forward; resume, torchrun, bad files, CLI errors."""

from __future__ import annotations

import functools
import io
import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fae_cli.cli.app import main
from fae_cli.data.cache import CacheWriter, open_cache
from fae_cli.data.datasets import open_images
from fae_cli.encoders import build_encoder
from fae_cli.errors import FaeError
from fae_cli.recipe import load_recipe
from fae_cli.stages import extract

# 32-pixel images into EfficientNet-Lite0 at 32: a 2 x 2 grid of 112-wide tokens, fast on CPU.
TINY = ["data.image_size=32", "encoder.input_size=32", "extract.batch_size=4", "extract.shard_size=6"]


def _recipe(tmp_path, *overrides):
    return load_recipe(None, [*TINY, f"run.out_dir={str(tmp_path / 'runs')!r}", *overrides])


@functools.lru_cache(maxsize=1)
def _encoder():
    return build_encoder("efficientnet-lite0", input_size=32)


def _direct_features(recipe, count, split="train", flip=False, shard=6):
    """Encode the first `count` images without the stage, in the stage's batches.

    The stage starts a new batch of 4 at every shard boundary (every 6 images), and a
    convolution's float result can depend on the batch it runs in, so the batches must match.
    """
    dataset = open_images(recipe.data, split)
    encoder = _encoder()
    batches = []
    starts = [start for shard_start in range(0, count, shard) for start in range(shard_start, min(shard_start + shard, count), 4)]
    for start in starts:
        stop = min(start + 4, count, (start // shard + 1) * shard)
        images = torch.stack([dataset[i][0] for i in range(start, stop)]).float() / 255
        with torch.inference_mode():
            batches.append(encoder(images.flip(-1) if flip else images))
    return torch.cat(batches)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """Ten Fashion-MNIST images extracted once, shared by the tests that only read or rerun."""
    root = tmp_path_factory.mktemp("extracted")
    recipe = _recipe(root, "data.limit=10")
    return recipe, extract.run(recipe)


def test_features_equal_direct_forward(extracted):
    recipe, folder = extracted
    cache = open_cache(folder)
    assert folder.parts[-3:] == ("runs", "default", "features")
    assert len(cache) == 10
    assert torch.equal(cache.load_all(), _direct_features(recipe, 10))
    assert cache.labels.tolist() == open_images(recipe.data).labels[:10].tolist()
    assert cache.manifest["grid"] == [2, 2]
    assert cache.manifest["width"] == 112
    assert cache.manifest["encoder"] == "efficientnet-lite0"
    assert cache.manifest["num_classes"] == 10
    assert [shard["stop"] for shard in cache.manifest["shards"]] == [6, 10]


def test_bfloat16_and_flip(tmp_path):
    recipe = _recipe(tmp_path, "data.limit=5", "extract.dtype='bfloat16'", "extract.flip=true")
    cache = open_cache(extract.run(recipe))
    assert cache.dtype == torch.bfloat16
    assert torch.equal(cache.load_all(), _direct_features(recipe, 5).bfloat16().float())
    assert torch.equal(cache.load_all(flip=True), _direct_features(recipe, 5, flip=True).bfloat16().float())


def test_holdout_split_folder(tmp_path):
    images = np.arange(5, dtype=np.uint8)[:, None, None, None].repeat(32, 1).repeat(32, 2).repeat(3, 3) * 50
    np.savez(tmp_path / "five.npz", images=images)
    recipe = _recipe(tmp_path, f"data.source={str(tmp_path / 'five.npz')!r}", "data.holdout=2")
    folder = extract.run(recipe, split="holdout")
    cache = open_cache(folder)
    assert folder == tmp_path / "runs" / "default" / "features-holdout"
    assert len(cache) == 2
    assert cache.manifest["data"]["rows_sha256"] == open_images(recipe.data, "holdout").describe()["rows_sha256"]
    assert torch.equal(cache.load_all(), _direct_features(recipe, 2, split="holdout"))


def test_resume_after_kill(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, "data.limit=8")
    out = tmp_path / "cache"
    real_write = CacheWriter.write
    written = []

    def write_then_die(self, shard, tensors, skipped):
        if written:
            raise KeyboardInterrupt
        written.append(shard)
        return real_write(self, shard, tensors, skipped)

    monkeypatch.setattr(CacheWriter, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        extract.run(recipe, out=out)
    monkeypatch.setattr(CacheWriter, "write", real_write)
    first = out / "part-000000000.safetensors"
    kept_mtime = first.stat().st_mtime_ns
    assert not (out / "manifest.json").exists()

    extract.run(recipe, out=out)
    cache = open_cache(out)
    assert first.stat().st_mtime_ns == kept_mtime
    assert cache.index.tolist() == list(range(8))
    assert torch.equal(cache.load_all(), _direct_features(recipe, 8))


def test_rerun_complete_is_noop(extracted, caplog):
    recipe, folder = extracted
    created = open_cache(folder).manifest["created"]
    with caplog.at_level(logging.INFO, logger="fae_cli"):
        extract.run(recipe)
    assert open_cache(folder).manifest["created"] == created
    assert "nothing to extract" in caplog.text


def test_rerun_other_settings_rejected(extracted):
    recipe, folder = extracted
    changed = recipe.model_copy(update={"extract": recipe.extract.model_copy(update={"dtype": "float16"})})
    with pytest.raises(FaeError, match="dtype: 'float32' there, 'float16' now"):
        extract.run(changed, out=folder)


def _write_png(path, array):
    Image.fromarray(array).save(path)


@pytest.fixture
def messy_folder(tmp_path):
    folder = tmp_path / "messy"
    folder.mkdir()
    rng = np.random.default_rng(0)
    _write_png(folder / "a_rgb.PNG", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8), mode="L").save(folder / "b_grey.JPEG")
    Image.fromarray(rng.integers(0, 255, (36, 36, 4), dtype=np.uint8), mode="RGBA").save(folder / "c_rgba.png")
    Image.fromarray(rng.integers(0, 255, (33, 40), dtype=np.uint8), mode="L").convert("P").save(folder / "d_palette.GIF")
    Image.fromarray(np.full((32, 32), 40000, dtype="<u2")).save(folder / "e_16bit.tif")
    Image.new("CMYK", (34, 34), (10, 20, 30, 40)).save(folder / "f_cmyk.jpg")
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    (folder / "g_cut.png").write_bytes(buffer.getvalue()[:300])
    return folder


def test_messy_folder_skips_corrupt_file(tmp_path, messy_folder, caplog):
    recipe = _recipe(tmp_path, f"data.source={str(messy_folder)!r}")
    with caplog.at_level(logging.INFO, logger="fae_cli"):
        cache = open_cache(extract.run(recipe))
    assert len(cache) == 6
    assert cache.index.tolist() == [0, 1, 2, 3, 4, 5]
    assert cache.manifest["skipped"] == [{"file": "g_cut.png", "reason": "truncated"}]
    assert cache.manifest["images"] == 7
    assert caplog.text.count("g_cut.png (truncated)") == 1
    assert cache.labels.tolist() == [-1] * 6


def test_all_files_unreadable(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "x.jpg").write_text("no pixels")
    with pytest.raises(FaeError, match=f"no readable images in {folder}"):
        extract.run(_recipe(tmp_path, f"data.source={str(folder)!r}"))


def test_cli_empty_folder_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", "--data", str(empty), "--out", str(tmp_path / "out")])
    message = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert message.startswith("error: no image files in")
    assert "empty" in message
    assert "Traceback" not in message


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_ranks_cover_each_index_once(tmp_path):
    # Shards of 5 with batches of 5 give both runs the same batches, and torchrun's default of one
    # thread per rank is matched here, so the convolutions sum in the same order.
    settings = [*TINY, "data.limit=10", "extract.shard_size=5", "extract.batch_size=5", "run.device='cpu'"]
    torch.set_num_threads(1)
    single = open_cache(extract.run(load_recipe(None, settings), out=tmp_path / "one-rank"))

    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(_free_port()),
        "-m", "fae_cli", "extract", *[f"--set={item}" for item in settings], "--out", str(tmp_path / "two-ranks"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]

    double = open_cache(tmp_path / "two-ranks")
    assert double.index.tolist() == list(range(10))
    assert [shard["start"] for shard in double.manifest["shards"]] == [0, 5]
    assert double.manifest["throughput"]["world_size"] == 2
    assert torch.equal(double.load_all(), single.load_all())


def test_plan_names_split_folder(tmp_path):
    recipe = _recipe(tmp_path)
    assert extract.plan(recipe).outputs["feature cache"].endswith("default/features")
    assert extract.plan(recipe, split="holdout").outputs["feature cache"].endswith("default/features-holdout")
