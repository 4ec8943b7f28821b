"""Torture: many concurrent writers (threads and processes) through the pivot.

Writers write random data of random sizes (512 B .. 4 MiB) at unaligned, overlapping offsets,
with fsyncs and some punch-hole / zero-range fallocates, into a 32 MiB image mirrored at
4 KiB granularity by a throttled copier. At a random moment ``complete`` is sent (refused
with EBUSY until the job is ready); the writers keep writing through the pivot and for a
while after it. The seed also picks a variant:
``plain`` (background copy mode), ``write-blocking`` (switched to at a random moment), or
``slow-drain`` (after ready the copier is slowed to 1 MiB/s so that a backlog builds up and
``completing`` lasts seconds, with active writes racing the drain and the write gate).
Then, exactly:

- the target equals the replay of every write (nothing lost before, during or after the
  pivot, nothing stale copied over a newer write);
- the frozen source equals the replay of the writes that returned before ``complete`` was
  sent, except where writes in the pivot window may have landed (see writers.py).

Each seed is one parameter (its id names it). Replay one with
``MIRRORFS_TORTURE_SEED=<seed> pytest tests/mounted/test_torture.py``.
"""

import errno
import os
import random
import time
from pathlib import Path

import pytest
from helpers.mounted import MiB, MirrorFactory, assert_same, make_image
from helpers.writers import (
    WriterPool,
    check_source_at_pivot,
    describe_byte,
    first_diff,
    replay,
    require_fallocates,
)

SIZE = 32 * MiB
_env_seed = os.environ.get("MIRRORFS_TORTURE_SEED")
SEEDS = [int(_env_seed)] if _env_seed else [1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed={s}")
def test_writers_through_the_pivot(seed: int, tmp_path: Path, mirrorfs: MirrorFactory) -> None:
    replay_hint = f"(seed {seed}; replay with MIRRORFS_TORTURE_SEED={seed})"
    rnd = random.Random(seed)
    src = make_image(tmp_path / "disk.img", SIZE)
    initial = src.read_bytes()
    speed = rnd.choice(["8M", "12M", "16M"])
    variant = ("plain", "write-blocking", "slow-drain")[seed % 3]
    switch_to_blocking = variant == "write-blocking"
    slowed = False
    m = mirrorfs.mount(src, None, "--granularity", "4K", "--speed", speed)
    # 5 writers at 800 KiB/s: 4 MiB/s in all, so that the background copy converges
    pool = WriterPool(m.img, tmp_path / "writers.lock", seed, SIZE, threads=3, procs=2,
                      workdir=str(tmp_path), min_len=512, max_len=4 * MiB, fsync_prob=0.05,
                      falloc_prob=0.1, pace_bps=800 << 10)
    pool.start(odirect_threads=1)
    try:
        # ------------------------------------------------ complete at a random moment
        switch_at = time.monotonic() + rnd.uniform(0.3, 2.0)
        deadline = time.monotonic() + 90
        attempts = 0
        while True:
            assert time.monotonic() < deadline, \
                f"never ready under the writers: {m.status()} {replay_hint}"
            time.sleep(rnd.uniform(0.05, 0.5))
            assert pool.alive() and not pool.errors, f"a writer failed {replay_hint}: " \
                f"{pool.errors}"
            if switch_to_blocking and time.monotonic() >= switch_at:
                m.command("copy-mode write-blocking")
                switch_to_blocking = False
            if variant == "slow-drain" and not slowed:
                if not m.status()["ready"]:
                    continue
                m.command("speed 1M")
                slowed = True
                # a backlog builds up, well above the 4 MiB at which the drain closes the gate
                until = time.monotonic() + rnd.uniform(0.5, 1.5)
                while time.monotonic() < until or m.status()["remaining_bytes"] < 6 * MiB:
                    assert time.monotonic() < deadline, \
                        f"no backlog under the writers: {m.status()} {replay_hint}"
                    time.sleep(0.05)
            attempts += 1
            t_issue = time.monotonic_ns()
            try:
                m.command("complete")
                break
            except OSError as e:
                assert e.errno == errno.EBUSY, f"complete: {e} {replay_hint}"
                st = m.status()
                assert not st["ready"] and st["state"] == "copying", \
                    f"complete refused in state {st['state']} (ready {st['ready']}) {replay_hint}"
        # ------------------------------------------------ the pivot, writers running
        while True:
            st = m.status()
            if st["state"] == "completed":
                t_seen = time.monotonic_ns()
                break
            assert st["state"] == "completing", f"{st} {replay_hint}"
            assert time.monotonic() < deadline, f"completing never ended: {st} {replay_hint}"
            time.sleep(0.01)
        assert st["serving"] == "target" and st["target_consistent"] is True
        # writes after the pivot (target only): for a while, and at least a few
        until = time.monotonic() + rnd.uniform(0.3, 1.0)
        while time.monotonic() < until or sum(r.t0 > t_seen for r in list(pool.records)) < 3:
            assert pool.alive() and time.monotonic() < deadline + 30, \
                f"the writers stopped after the pivot {replay_hint}: {pool.errors}"
            time.sleep(0.05)
    finally:
        pool.stop()
    assert not pool.errors, f"writer errors {replay_hint}: {pool.errors}"
    require_fallocates(pool, src)  # punch-holes and zero-ranges were among the writes
    recs = pool.records
    pre = sum(r.t1 < t_issue for r in recs)
    post = sum(r.t0 > t_seen for r in recs)
    window = len(recs) - pre - post
    print(f"seed {seed}: {variant}, speed {speed}, {attempts} complete attempts, {pool.summary()}; "
          f"{pre} before the pivot, {window} in the pivot window "
          f"({(t_seen - t_issue) / 1e6:.0f} ms), {post} after")
    if variant == "slow-drain":
        assert window > 0, f"no write raced the drain {replay_hint}"
    assert pre > 0 and post > 0, f"the writers did not run across the pivot {replay_hint}"
    m.umount()

    expected = replay(initial, recs, seed)
    bad = first_diff(m.tgt.read_bytes(), expected)
    assert bad is None, (f"target differs from the model of all writes at "
                         f"{describe_byte(bad, recs, t_issue, t_seen)} {replay_hint}")
    model = tmp_path / "model.img"
    model.write_bytes(expected)
    assert_same(model, m.tgt)
    problem = check_source_at_pivot(initial, src.read_bytes(), recs, seed, t_issue, t_seen)
    assert problem is None, f"{problem} {replay_hint}"
