"""Sharded safetensors caches: shard assignment, writing, resuming and memory-mapped reading."""

from __future__ import annotations

import pickle

import pytest
import torch

from fae_cli.data.cache import MAX_SHARD_BYTES, CacheWriter, assign_shards, open_cache, shard_length
from fae_cli.errors import FaeError

IDENTITY = {"encoder": "test", "dtype": "float32", "grid": [2, 2], "width": 3}


def _features(indices: range) -> torch.Tensor:
    # Row i contains 100 * i + (0..11), so a misplaced row shows up as a wrong value.
    return torch.stack([torch.arange(12, dtype=torch.float32).reshape(4, 3) + 100 * i for i in indices])


def _write_cache(folder, count=10, length=4, dtype=torch.float32, flip=False, skip=(), identity=IDENTITY):
    writer = CacheWriter(folder, kind="features", count=count, identity=identity)
    writer.prepare()
    for shard in assign_shards(writer.missing(writer.scan()), length, 0, 1):
        readable = [i for i in shard if i not in skip]
        tensors = {
            "features": _features(readable).to(dtype),
            "labels": torch.tensor([i % 3 for i in readable]),
            "index": torch.tensor(readable, dtype=torch.long),
        }
        if flip:
            tensors["features_flip"] = -_features(readable).to(dtype)
        writer.write(shard, tensors, [(f"{i}.png", "truncated") for i in shard if i in skip])
    return writer.finish(recipe_hash="0" * 16, grid=[2, 2], width=3, dtype=str(dtype), flip=flip, num_classes=3)


@pytest.mark.parametrize(("count", "world_size", "length"), [(10, 2, 4), (10, 3, 100), (7, 4, 1), (2, 3, 2), (4099, 8, 512)])
def test_assign_covers_every_index_once(count, world_size, length):
    covered = []
    for rank in range(world_size):
        shards = assign_shards([range(count)], length, rank, world_size)
        indices = [i for shard in shards for i in shard]
        if indices:
            assert indices == list(range(indices[0], indices[-1] + 1))
        assert all(len(shard) <= length for shard in shards)
        covered += indices
    assert sorted(covered) == list(range(count))


def test_assign_never_spans_a_gap():
    missing = [range(0, 3), range(8, 12)]
    shards = assign_shards(missing, 10, 0, 1)
    assert shards == [range(0, 3), range(8, 12)]
    split = assign_shards(missing, 10, 1, 2)
    assert split == [range(9, 12)]


def test_shard_length_caps_bytes():
    assert shard_length(4096, 1000) == 4096
    assert shard_length(4096, 256 * 1536 * 4) == MAX_SHARD_BYTES // (256 * 1536 * 4)
    assert shard_length(10, 2 * MAX_SHARD_BYTES) == 1


def test_round_trip_rows_and_labels(tmp_path):
    manifest = _write_cache(tmp_path)
    cache = open_cache(tmp_path)
    assert len(cache) == 10
    assert manifest["count"] == 10
    assert [shard["file"] for shard in manifest["shards"]] == ["part-000000000.safetensors", "part-000000004.safetensors", "part-000000008.safetensors"]
    assert cache.labels.tolist() == [i % 3 for i in range(10)]
    assert cache.grid == (2, 2)
    assert cache.width == 3
    assert torch.equal(cache.load_all(), _features(range(10)))


def test_get_any_order_with_repeats(tmp_path):
    _write_cache(tmp_path)
    cache = open_cache(tmp_path)
    rows = torch.tensor([9, 0, 5, 5, 3, 4, 8])
    batch = cache.get(rows)
    assert batch.dtype == torch.float32
    assert torch.equal(batch, _features(rows.tolist()))


def test_get_out_of_range(tmp_path):
    _write_cache(tmp_path)
    with pytest.raises(IndexError):
        open_cache(tmp_path).get(torch.tensor([10]))


def test_bfloat16_stored_float32_returned(tmp_path):
    _write_cache(tmp_path, dtype=torch.bfloat16)
    cache = open_cache(tmp_path)
    assert cache.dtype == torch.bfloat16
    assert torch.equal(cache.get(torch.tensor([7])), _features([7]).bfloat16().float())


def test_flip_copies(tmp_path):
    _write_cache(tmp_path, flip=True)
    cache = open_cache(tmp_path)
    assert cache.has_flip
    assert torch.equal(cache.get(torch.tensor([2, 6]), flip=True), -_features([2, 6]))


def test_flip_missing_is_error(tmp_path):
    _write_cache(tmp_path)
    with pytest.raises(FaeError, match="no flipped copies"):
        open_cache(tmp_path).get(torch.tensor([0]), flip=True)


def test_skipped_rows_keep_dataset_index(tmp_path):
    manifest = _write_cache(tmp_path, skip={1, 4, 5})
    cache = open_cache(tmp_path)
    assert len(cache) == 7
    assert cache.index.tolist() == [0, 2, 3, 6, 7, 8, 9]
    assert torch.equal(cache.get(torch.tensor([1, 3])), _features([2, 6]))
    assert manifest["skipped"] == [{"file": f"{i}.png", "reason": "truncated"} for i in (1, 4, 5)]
    assert manifest["images"] == 10


def test_resume_keeps_finished_shards(tmp_path):
    _write_cache(tmp_path)
    (tmp_path / "part-000000004.safetensors").unlink()
    (tmp_path / "manifest.json").unlink()
    (tmp_path / ".part-000000004.safetensors.tmp-999").write_bytes(b"partial")
    kept_mtime = (tmp_path / "part-000000000.safetensors").stat().st_mtime_ns

    writer = CacheWriter(tmp_path, kind="features", count=10, identity=IDENTITY)
    writer.prepare()
    assert writer.missing(writer.scan()) == [range(4, 8)]
    assert not (tmp_path / ".part-000000004.safetensors.tmp-999").exists()

    _write_cache(tmp_path)
    assert (tmp_path / "part-000000000.safetensors").stat().st_mtime_ns == kept_mtime
    assert torch.equal(open_cache(tmp_path).load_all(), _features(range(10)))


def test_resume_with_other_settings_rejected(tmp_path):
    _write_cache(tmp_path)
    writer = CacheWriter(tmp_path, kind="features", count=10, identity={**IDENTITY, "dtype": "bfloat16"})
    with pytest.raises(FaeError, match="dtype: 'float32' there, 'bfloat16' now"):
        writer.scan()


def test_finish_with_gap_is_error(tmp_path):
    writer = CacheWriter(tmp_path, kind="features", count=10, identity=IDENTITY)
    writer.prepare()
    writer.write(range(0, 4), {"features": _features(range(4)), "labels": torch.zeros(4, dtype=torch.long), "index": torch.arange(4)}, [])
    with pytest.raises(FaeError, match="no shard covers indices 4-9"):
        writer.finish(recipe_hash="0" * 16)


def test_open_incomplete_cache(tmp_path):
    _write_cache(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(FaeError, match="incomplete"):
        open_cache(tmp_path)


def test_open_wrong_kind(tmp_path):
    _write_cache(tmp_path)
    with pytest.raises(FaeError, match="expected 'latents'"):
        open_cache(tmp_path, kind="latents")


def test_cache_pickles_for_workers(tmp_path):
    _write_cache(tmp_path)
    cache = open_cache(tmp_path)
    cache.get(torch.tensor([0]))
    copy = pickle.loads(pickle.dumps(cache))
    assert torch.equal(copy.get(torch.tensor([5])), _features([5]))


def test_latent_cache_width_is_channels(tmp_path):
    writer = CacheWriter(tmp_path, kind="latents", count=3, identity=IDENTITY)
    writer.prepare()
    writer.write(range(3), {"latents": torch.ones(3, 8, 2, 2), "labels": torch.zeros(3, dtype=torch.long), "index": torch.arange(3)}, [])
    writer.finish(recipe_hash="0" * 16, grid=[2, 2], flip=False, num_classes=0)
    cache = open_cache(tmp_path, kind="latents")
    assert cache.width == 8
    assert tuple(cache.get(torch.tensor([1])).shape) == (1, 8, 2, 2)
