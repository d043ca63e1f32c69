from __future__ import annotations

import torch

from fae_cli.training.distributed import sample_generator, sample_seed, shard_indices


def test_sample_seed_depends_only_on_seed_and_index():
    assert sample_seed(0, 5) == sample_seed(0, 5)
    assert sample_seed(0, 5) != sample_seed(0, 6)
    assert sample_seed(0, 5) != sample_seed(1, 5)
    assert 0 <= sample_seed(123, 10**9) < 2**63


def test_sample_generator_reproducible():
    a = torch.randn(4, generator=sample_generator(7, 3))
    b = torch.randn(4, generator=sample_generator(7, 3))
    assert torch.equal(a, b)


def test_shard_indices_cover_each_index_once():
    for count in (0, 1, 7, 10, 13):
        for world in (1, 2, 3, 4):
            seen = [i for rank in range(world) for i in shard_indices(count, rank, world)]
            assert seen == list(range(count)), (count, world)
