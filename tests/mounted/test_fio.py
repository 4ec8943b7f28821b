"""fio with data verification against the mounted image, then against the target itself.

fio writes random blocks with a crc32c header and checksum in each (``verify=crc32c``) from
four jobs at once, in disjoint 4 MiB regions: two libaio O_DIRECT jobs with 16 I/Os in flight
and two buffered psync jobs with random block sizes and fsyncs, all while the bulk copy
runs (throttled with --speed so that it is still running when fio ends). fio's own
read-back verification must pass through the mount; after ``complete``, fio's verify-only
pass (same jobs, same seed, so the same blocks) must pass on the TARGET file directly. The
check is shown able to fail: one flipped byte in a copy of the target fails it.
``qemu-img compare`` checks source against target after a completed job. A cancel in ready
drains fio's backlog while writers keep writing beside fio's region: the target must be the
disk as it was when the cancel ended (writes acknowledged while it drained are in it, writes
begun after it are not), fio's verify-only passes on it, and later writes reach the source
only. Queue-depth-1 I/O with pauses runs through the adaptive
poll's every path (a request caught by the poll, a poll that gives up, the epoll wait), with
polling off, at the default and at its maximum. Large writes at queue depth 16, mixed with
small ones, run through the write read-ahead (requests received on the helper thread while
a large write is handled, small ones among them).
"""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers.mounted import MiB, MirrorFactory, Mount, assert_same, make_image
from helpers.writers import WriterPool, check_source_at_pivot, replay

SIZE = 32 * MiB
FIO_REGION = 4 * MiB  # per job; four jobs: [0, 16 MiB)
FIO_END = 4 * FIO_REGION

pytestmark = pytest.mark.skipif(shutil.which("fio") is None or shutil.which("qemu-img") is None,
                                reason="fio and qemu-img (scripts/setup.sh installs them)")

JOBFILE = """\
[global]
filename=${FIOFILE}
rw=randwrite
verify=crc32c
verify_fatal=1
randseed=%(seed)d
size=%(region)d
offset_increment=%(region)d
numjobs=2
[aio]
ioengine=libaio
direct=1
iodepth=16
bs=4k
offset=0
[psync]
ioengine=psync
direct=0
bsrange=4k-64k
fsync=16
end_fsync=1
offset=%(psync_offset)d
"""


def write_jobfile(path: Path, seed: int) -> Path:
    path.write_text(JOBFILE % {"seed": seed, "region": FIO_REGION,
                               "psync_offset": 2 * FIO_REGION})
    return path


def fio(jobfile: Path, target: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FIOFILE=str(target))
    # cwd: fio saves its verify state files (*-verify.state) there
    return subprocess.run(["fio", "--output-format=terse", *extra, str(jobfile)], env=env,
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, cwd=jobfile.parent)


def fio_ok(r: subprocess.CompletedProcess[str], what: str, jobs: int = 4) -> None:
    assert r.returncode == 0, f"fio {what} failed ({r.returncode}): {r.stderr[-2000:]}"
    # terse v3: field 5 is the job's error number
    errs = [line.split(";")[4] for line in r.stdout.splitlines() if line.startswith("3;")]
    assert errs == ["0"] * jobs, f"fio {what}: job errors {errs}: {r.stdout}"


def complete_and_umount(m: Mount) -> None:
    m.command("speed 0")
    m.wait("ready")
    m.command("complete")
    m.wait("completed")
    m.umount()


def qemu_img_compare(a: Path, b: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                          capture_output=True, text=True, timeout=120)


def test_fio_verify_during_bulk_copy_then_on_target(tmp_path: Path,
                                                    mirrorfs: MirrorFactory) -> None:
    src = make_image(tmp_path / "disk.img", SIZE)
    original = src.read_bytes()
    jobfile = write_jobfile(tmp_path / "verify.fio", seed=4242)
    m = mirrorfs.mount(src, None, "--speed", "2M")
    assert m.status()["state"] == "copying"

    r = fio(jobfile, m.img)
    fio_ok(r, "write+verify through the mount")
    st = m.status()
    assert st["state"] == "copying" and st["remaining_bytes"] > 0, \
        f"fio must have run during the bulk copy: {st}"

    m.command("speed 0")
    m.wait("ready")
    m.command("complete")
    st = m.wait("completed")
    assert st["serving"] == "target" and st["target_consistent"] is True
    m.umount()
    assert_same(src, m.tgt)
    assert original[:4 * FIO_REGION] != src.read_bytes()[:4 * FIO_REGION]

    # fio's verify-only pass on the target itself: the same blocks, checked from the headers
    fio_ok(fio(jobfile, m.tgt, "--verify_only"), "verify-only on the target")
    r = qemu_img_compare(src, m.tgt)
    assert r.returncode == 0, f"qemu-img compare after complete: {r.stdout}{r.stderr}"

    # The check can fail: flip one byte inside a block fio wrote (psync job 1's region).
    bad = tmp_path / "corrupt.img"
    shutil.copyfile(m.tgt, bad)
    data = bad.read_bytes()
    region = 3 * FIO_REGION
    off = next(o for o in range(region, region + FIO_REGION, 4096)
               if data[o:o + 4096] != original[o:o + 4096]) + 2049  # a written block's middle
    with open(bad, "r+b") as f:
        f.seek(off)
        f.write(bytes([data[off] ^ 0x40]))
    r = fio(jobfile, bad, "--verify_only")
    assert r.returncode != 0, "fio's verify-only did not notice a flipped byte"
    assert "verify failed" in r.stderr or "bad magic" in r.stderr, r.stderr[-2000:]
    r = qemu_img_compare(m.tgt, bad)
    assert r.returncode == 1 and "mismatch" in r.stdout.lower(), f"{r.stdout}{r.stderr}"


def test_qemu_img_compare_after_cancel_in_ready(tmp_path: Path,
                                                mirrorfs: MirrorFactory) -> None:
    """A soft cancel in ready leaves a point-in-time copy: the target is the disk as it was
    when the cancel ended. Writers keep writing while the cancel drains fio's backlog:
    what they had acknowledged before the cancel ended is in the copy, what they began
    after it is not, and every write is in the source."""
    seed = 777
    src = make_image(tmp_path / "disk.img", SIZE)
    jobfile = write_jobfile(tmp_path / "verify.fio", seed=seed)
    m = mirrorfs.mount(src, None)
    m.wait("ready")
    m.command("speed 4M")  # fio's writes build up a backlog that the cancel must drain
    fio_ok(fio(jobfile, m.img), "write+verify through the mount in ready")
    st = m.status()
    assert st["state"] == "ready"
    assert st["remaining_bytes"] > 8 * MiB, f"no backlog for the cancel to drain: {st}"
    initial = src.read_bytes()  # the source holds every acknowledged write
    # writers in [16 MiB, 32 MiB), beside fio's region, before, during and after the drain
    pool = WriterPool(m.img, tmp_path / "w.lock", seed, SIZE, threads=2, procs=0,
                      workdir=str(tmp_path), min_len=512, max_len=256 << 10,
                      fsync_prob=0.05, hot=(FIO_END, SIZE), hot_prob=1.0, pace_bps=2 * MiB)
    pool.start()
    try:
        time.sleep(0.3)
        t_cmd = time.monotonic_ns()
        m.command("cancel")
        # t_drain: just before the last status that still said cancelling (what was
        # acknowledged before it is in the copy); t_end: once it said cancelled
        t_drain = None
        while True:
            t = time.monotonic_ns()
            st = m.status()
            if st["state"] == "cancelled":
                t_end = time.monotonic_ns()
                break
            assert st["state"] == "cancelling", st
            t_drain = t
            time.sleep(0.01)
        time.sleep(0.3)  # writes after the cancel: the source only
    finally:
        pool.stop()
    assert not pool.errors, pool.errors
    assert st["target_consistent"] is True and st["serving"] == "source"
    assert t_drain is not None, "the cancel never drained"
    recs = pool.records
    drained = sum(t_cmd < r.t0 and r.t1 < t_drain for r in recs)
    after = sum(r.t0 > t_end for r in recs)
    assert drained > 0 and after > 0, \
        f"{drained} writes during the cancel's drain, {after} after it: {pool.summary()}"
    later = 8 * MiB + 4096  # in fio's region, after the cancel: the source only
    with open(m.img, "r+b") as f:
        f.seek(later)
        f.write(b"written after the cancel")
    m.umount()

    target = m.tgt.read_bytes()
    problem = check_source_at_pivot(initial, target, recs, seed, t_drain, t_end)
    assert problem is None, f"the target is not the disk when the cancel ended: {problem}"
    expect = replay(initial, recs, seed)
    expect[later:later + 24] = b"written after the cancel"
    model = tmp_path / "model.img"
    model.write_bytes(expect)
    assert_same(model, src)
    assert target[:FIO_END] == initial[:FIO_END], "fio's region changed in the target"
    fio_ok(fio(jobfile, m.tgt, "--verify_only"), "verify-only on the cancelled target")
    r = qemu_img_compare(src, m.tgt)
    assert r.returncode == 1, f"a write after the cancel reached the target: {r.stdout}"
    assert f"offset {later}" in r.stdout, r.stdout  # sector aligned


QD1_JOB = """\
[qd1]
filename=${FIOFILE}
ioengine=libaio
direct=1
iodepth=1
rw=randrw
rwmixread=30
bs=4k
size=%(size)d
verify=crc32c
verify_fatal=1
randseed=%(seed)d
thinktime=300
thinktime_blocks=97
"""


@pytest.mark.parametrize("poll_us", ["0", "50", "1000"])
def test_queue_depth_one_with_adaptive_polling(tmp_path: Path, mirrorfs: MirrorFactory,
                                               poll_us: str) -> None:
    """One request at a time, with a 300 us pause every 97 blocks: the poll catches most
    requests; a pause longer than the poll ends it in the epoll wait and resets it (at the
    default 50 us; at 1000 us the poll outlasts the pause). The daemon logs how many
    requests the poll caught: some when polling is on, none when it is off."""
    src = make_image(tmp_path / "disk.img", SIZE)
    original = src.read_bytes()
    jobfile = tmp_path / "qd1.fio"
    jobfile.write_text(QD1_JOB % {"size": 8 * MiB, "seed": 77})
    m = mirrorfs.mount(src, None, "--poll-us", poll_us)
    fio_ok(fio(jobfile, m.img), "queue depth 1", jobs=1)
    complete_and_umount(m)
    assert src.read_bytes()[:8 * MiB] != original[:8 * MiB]
    assert_same(src, m.tgt)
    stats = re.search(r"adaptive poll: (\d+) requests caught, (\d+) polls ended in a wait",
                      (tmp_path / "daemon0.log").read_text())
    assert stats, "the daemon did not log its poll statistics"
    caught = int(stats[1])
    if poll_us == "0":
        assert caught == 0 and int(stats[2]) == 0
    else:
        # How many depends on the machine's speed; that the path served requests (and
        # the images then compared equal) is what counts here.
        assert caught > 0, "polling was on but caught no request"


READ_AHEAD_JOB = """\
[global]
filename=${FIOFILE}
ioengine=libaio
direct=1
iodepth=16
verify=crc32c
verify_fatal=1
randseed=%(seed)d
[large]
rw=randwrite
bsrange=64k-1m
size=%(large)d
offset=0
[small]
rw=randwrite
bs=4k
size=%(small)d
offset=%(large)d
"""


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
def test_large_writes_through_the_read_ahead(tmp_path: Path, mirrorfs: MirrorFactory,
                                             mode: str) -> None:
    """Writes of 64 KiB to 1 MiB, 16 in flight, and 4 KiB writes beside them, during the
    bulk copy, each read back and checked by fio through the mount; then on the target
    after complete. The daemon must have received some requests on the read-ahead thread
    (large writes stream, so the next one is queued while one is handled)."""
    src = make_image(tmp_path / "disk.img", SIZE)
    original = src.read_bytes()
    jobfile = tmp_path / "large.fio"
    jobfile.write_text(READ_AHEAD_JOB % {"seed": 99, "large": 24 * MiB, "small": 4 * MiB})
    m = mirrorfs.mount(src, None, "--speed", "4M", "--copy-mode", mode)
    fio_ok(fio(jobfile, m.img), "large and small writes", jobs=2)
    complete_and_umount(m)
    assert src.read_bytes()[:28 * MiB] != original[:28 * MiB]
    assert_same(src, m.tgt)
    fio_ok(fio(jobfile, m.tgt, "--verify_only"), "verify-only on the target", jobs=2)
    ahead = re.search(r"write read-ahead: (\d+) requests", (tmp_path / "daemon0.log").read_text())
    assert ahead, "the daemon did not log its read-ahead statistics"
    assert int(ahead[1]) > 0, "no request was received on the read-ahead thread"
