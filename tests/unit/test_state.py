import os
from pathlib import Path

import pytest
import trio
import trio.lowlevel
from bitarray import bitarray

from mirrorfs.state import BLOCK, ActivityLog, StateError, StateFile

HEADER = {"phase": "running", "clean": False, "size": 1 << 30, "granularity": 65536,
          "extent_bytes": 4 << 20, "nchunks": 16384, "nextents": 256}


def bits(n: int, ones: list[int]) -> bitarray:
    b = bitarray(n, endian="little")
    b.setall(0)
    for i in ones:
        b[i] = 1
    return b


def test_checkpoint_roundtrip_and_slot_switch(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    sf = StateFile.create(path, HEADER)
    sf.write_checkpoint(bits(16384, [0, 5, 16383]), phase="running")
    al = bits(256, [])
    al[7] = 1
    sf.log_extent(al, 7)
    sf.close()
    sf = StateFile.open(path)
    al2, p = sf.read_slot()
    assert list(p.search(1)) == [0, 5, 16383] and list(al2.search(1)) == [7]
    slot = sf.header["slot"]
    sf.write_checkpoint(bits(16384, [9]), clean=True)
    assert sf.header["slot"] == 1 - slot and sf.header["clean"] is True
    sf.close()
    al3, p3 = StateFile.open(path).read_slot()
    assert list(p3.search(1)) == [9] and not al3.any(), "a checkpoint empties the log"


def test_torn_header_falls_back_to_the_other_copy(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    sf = StateFile.create(path, HEADER)
    sf.write_checkpoint(bits(16384, [1]))  # seq 1 -> block 1
    sf.write_checkpoint(bits(16384, [2]))  # seq 2 -> block 0
    seq = sf.header["seq"]
    sf.close()
    with open(path, "r+b") as f:  # tear the newest header
        f.seek((seq % 2) * BLOCK + 10)
        f.write(b"garbage")
    sf = StateFile.open(path)
    assert sf.header["seq"] == seq - 1
    assert list(sf.read_slot()[1].search(1)) == [1], "the older checkpoint is still whole"


def test_not_a_state_file(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(os.urandom(3 * BLOCK))
    with pytest.raises(StateError, match="not a mirrorfs state file"):
        StateFile.open(str(p))


async def test_activity_log_covers_and_logs_once(tmp_path: Path) -> None:
    sf = StateFile.create(str(tmp_path / "s"), HEADER)
    p = bits(16384, list(range(64)))  # chunks 0..63 dirty on disk = extent 0
    alog = ActivityLog(sf, p, 65536, 4 << 20)
    assert alog.covers(0, 64) and alog.covers(10, 11)
    assert not alog.covers(64, 65) and not alog.covers(60, 70)
    await alog.log(60, 70)  # extent 1 (chunks 64..127) goes to the log
    assert alog.covers(64, 128) and alog.al_writes == 1
    await alog.log(100, 101)
    assert alog.al_writes == 1, "an extent is logged once"
    def fill(p: bitarray) -> None:
        p.setall(0)
        p[3] = 1

    await alog.checkpoint(fill)
    assert not alog.covers(64, 65), "a checkpoint empties the log"
    assert alog.covers(3, 4) and not alog.covers(0, 1)
    sf.close()
    al, pp = StateFile.open(sf.path).read_slot()
    assert list(pp.search(1)) == [3] and not al.any()


async def test_checkpoint_snapshot_is_taken_under_the_lock(tmp_path: Path) -> None:
    sf = StateFile.create(str(tmp_path / "s"), HEADER)
    alog = ActivityLog(sf, bits(16384, []), 65536, 4 << 20)
    taken = []

    async def logger() -> None:
        await alog.log(0, 1)

    async with trio.open_nursery() as n:
        n.start_soon(logger)
        while not alog.lock.locked():
            await trio.lowlevel.checkpoint()
        await alog.checkpoint(lambda p: taken.append(alog.al.any()))
    assert taken == [True], "the snapshot ran before a pending log entry was done"
