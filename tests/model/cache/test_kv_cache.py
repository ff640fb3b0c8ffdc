"""The cache tensors' one rule about blocks: a reserved scratch block is the last, and is never
counted among the blocks a pool over the cache may hand out."""
from __future__ import annotations

import pytest

from model.cache.kv_cache import KVCache
from model.config import preset


def test_the_scratch_block_is_the_last_and_leaves_the_allocatable_blocks():
    cache = KVCache(preset("custom-llm-tiny"), num_blocks=5, block_size=4)
    assert cache.scratch_block is None and cache.num_allocatable_blocks == 5
    assert cache.reserve_scratch_block() == 4
    assert cache.reserve_scratch_block() == 4            # reserving again changes nothing
    assert cache.scratch_block == 4 and cache.num_allocatable_blocks == 4


def test_a_one_block_cache_has_no_room_for_scratch():
    cache = KVCache(preset("custom-llm-tiny"), num_blocks=1, block_size=4)
    with pytest.raises(ValueError, match="two blocks"):
        cache.reserve_scratch_block()
    assert cache.num_allocatable_blocks == 1
