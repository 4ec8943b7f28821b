import random

import pytest

from mirrorfs.bitmap import BLOCK_CHUNKS, DirtyBitmap

G = 64 << 10


def test_mark_clear_count_and_bytes() -> None:
    bm = DirtyBitmap(10 * G + 100, G)  # the last chunk is short
    assert bm.nchunks == 11 and bm.dirty_chunks == 0
    bm.mark(G - 1, 2)  # straddles chunks 0 and 1
    assert (bm.is_dirty(0), bm.is_dirty(1), bm.is_dirty(2)) == (True, True, False)
    bm.mark(0, G)  # already dirty: no double count
    assert bm.dirty_chunks == 2 and bm.dirty_bytes == 2 * G
    bm.mark(10 * G, 1)
    assert bm.dirty_bytes == 2 * G + 100
    bm.clear_chunks(0, 11)
    assert bm.dirty_chunks == 0 and bm.dirty_bytes == 0
    bm.mark(5, 0)
    assert bm.dirty_chunks == 0, "an empty write dirties nothing"


def test_chunks_of_and_byte_range() -> None:
    bm = DirtyBitmap(3 * G + 5, G)
    assert bm.chunks_of(0, G) == (0, 1)
    assert bm.chunks_of(1, G) == (0, 2)
    assert bm.byte_range(2, 4) == (2 * G, 3 * G + 5)


def test_find_dirty_and_runs_across_blocks() -> None:
    n = 5 * BLOCK_CHUNKS + 17
    bm = DirtyBitmap(n * 4096, 4096)
    assert bm.find_dirty(0) == -1
    bm.mark_chunks(3 * BLOCK_CHUNKS + 5, 3 * BLOCK_CHUNKS + 9)
    bm.mark_chunks(n - 1, n)
    assert bm.find_dirty(0) == 3 * BLOCK_CHUNKS + 5
    assert bm.run_end(3 * BLOCK_CHUNKS + 5, n) == 3 * BLOCK_CHUNKS + 9
    assert bm.run_end(3 * BLOCK_CHUNKS + 5, 3 * BLOCK_CHUNKS + 7) == 3 * BLOCK_CHUNKS + 7
    assert bm.find_dirty(3 * BLOCK_CHUNKS + 9) == n - 1
    assert bm.find_dirty(0, 3 * BLOCK_CHUNKS + 5) == -1
    bm.clear_chunks(3 * BLOCK_CHUNKS + 5, 3 * BLOCK_CHUNKS + 9)
    assert bm.find_dirty(0) == n - 1  # the stale summary bit is skipped (and cleared)
    assert bm.find_dirty(0) == n - 1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_a_plain_model(seed: int) -> None:
    rnd = random.Random(seed)
    n = 3 * BLOCK_CHUNKS + 100
    bm = DirtyBitmap(n * 4096 - 7, 4096)
    model = [False] * n
    for _ in range(2000):
        a = rnd.randrange(n)
        b = min(n, a + rnd.choice([1, 2, 50, 5000]))
        if rnd.random() < 0.6:
            bm.mark_chunks(a, b)
            model[a:b] = [True] * (b - a)
        else:
            bm.clear_chunks(a, b)
            model[a:b] = [False] * (b - a)
        assert bm.dirty_chunks == sum(model)
        start = rnd.randrange(n)
        want = next((i for i in range(start, n) if model[i]), -1)
        assert bm.find_dirty(start) == want


def test_huge_sparse_bitmap_is_cheap() -> None:
    # 16 TiB at 64 KiB granularity: 256 Mi chunks, 32 MiB of bits
    bm = DirtyBitmap(16 << 40, G)
    bm.mark((16 << 40) - 1, 1)
    assert bm.find_dirty(0) == bm.nchunks - 1
    assert bm.dirty_bytes == G


def test_granularity_must_be_power_of_two() -> None:
    with pytest.raises(ValueError):
        DirtyBitmap(1 << 20, 3000)
