#!/usr/bin/env python3
"""mirrorfs benchmark: guest I/O, the copier, write-blocking's cost, the daemon's memory.

    .venv/bin/python scripts/bench.py [--quick] [--only fio,copier,big,wb,mem,nbd]

Everything is measured in one run on one machine, so only the ratios inside one run mean
anything (the machine is shared and noisy). Sections:

 1. fio  guest I/O (libaio) on one image, side by side: the raw file; qemu-storage-daemon's
         FUSE export of it; mirrorfs with the job ready and idle; mirrorfs during the bulk
         copy. The images live in a tmpfs directory (/dev/shm by default, --fio-dir), so
         the numbers measure the FUSE servers, not a shared disk. "During copy" mounts a
         fresh job for each fio case with a speed limit chosen so that the copy lasts about
         1.5x the fio run (it reports whether the copy was still running when fio ended).
 2. copier  mount -> ready and mount -> completed (complete includes the target's fsync) for
         a fully allocated image and a large sparse one, against cp and cp + fsync
         (cp --sparse=always for the sparse one), on a real disk file system (/tmp by
         default, --copy-dir: fsync means something there; on tmpfs it is a no-op).
 3. wb   write-blocking's cost: fio 4 KiB random write qd16 and 1 MiB sequential write on
         the raw file, mirrorfs ready in background mode, mirrorfs ready in write-blocking
         mode; throughput and p50/p99 completion latency. Also background mode with
         --no-state: the state file's activity log's cost on guest writes.
 4. mem  the daemon's VmHWM for a 16 TiB all-hole image (tmpfs: ext4 caps files at
         16 TiB - 4 KiB) at the default granularity, right after mount and at ready.
 5. nbd  the copier to a qemu-nbd export on a Unix socket against nbdcopy --flush.
 6. big  the copier from the disk: an 8 GiB fully allocated image on the machine's disk
         (/var/tmp by default, --big-dir; not tmpfs), the page cache dropped (echo 3) before
         every run, so every tool reads the source from the disk. mirrorfs mount -> ready and
         mount -> completed (complete flushes the target; once ready flushes too, ready
         includes it) against cp SRC DST + fsync(2) of DST, and against dd bs=4M
         oflag=direct (the disk's own write speed). Interleaved repetitions (mirrorfs, cp +
         fsync, dd, mirrorfs, ...; --big-reps, default 5), medians, best and worst runs,
         time ratios. Needs root (drop_caches) and 2 x 8 GiB + 1 GiB free.

Results: a text table on stdout, the same as JSON on stdout's last line and in
bench-results/bench-<timestamp>.json. Standard library only. Every mount and process the
benchmark starts is removed at the end, also on failure or Ctrl-C.

Narrowing a run: --only SECTIONS, --cases SUBSTRINGS (fio cases), --runtime S, --reps N,
--fio-reps N, --big-reps N, --big-gib N. To benchmark another tree of the package (an
A/B), run from outside this checkout with PYTHONPATH pointing at it: cd /tmp &&
PYTHONPATH=/path/to/tree /work/main/.venv/bin/python /work/main/scripts/bench.py ... (the
header says which mirrorfs was measured).
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(REPO, ".venv", "bin")
MIRRORFS = os.path.join(VENV_BIN, "mirrorfs")
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

# name, fio rw, block size, iodepth, O_DIRECT
FioCase = tuple[str, str, str, int, int]
FIO_CASES: list[FioCase] = [
    ("seq write 1M direct qd16", "write", "1M", 16, 1),
    ("seq read 1M direct qd16", "read", "1M", 16, 1),
    ("seq write 1M buffered", "write", "1M", 1, 0),
    ("seq read 1M buffered", "read", "1M", 1, 0),
    ("rand write 4K qd16", "randwrite", "4k", 16, 1),
    ("rand read 4K qd16", "randread", "4k", 16, 1),
    ("rand write 4K qd1", "randwrite", "4k", 1, 1),
    ("rand read 4K qd1", "randread", "4k", 1, 1),
]
WB_CASES = [FIO_CASES[4], FIO_CASES[0]]

TARGETS = {  # the brief's targets, checked in the summary
    "idle_vs_qsd_min": 1.0,
    "copy_vs_idle_min": 0.75,
    "copier_speed_vs_cp_min": 0.9,
    "sparse_time_vs_cp_max": 1.3,
    "rss_16t_max_mib": 100,
    "big_completed_vs_dd_max": 1.2,  # issue 17: every run at most 1.2x dd oflag=direct
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ====================================================================== cleanup registry
class Reaper:
    """Everything started or created, undone in reverse order by ``cleanup``."""

    def __init__(self) -> None:
        self.mounts: dict[str, int | None] = {}  # mirrorfs mountpoint -> daemon pid
        self.procs: list[tuple[subprocess.Popen[bytes], str]] = []  # (qsd, its mountpoint)
        self.dirs: list[str] = []

    def cleanup(self) -> None:
        for mnt in list(self.mounts):
            with contextlib.suppress(Exception):
                umount_mirrorfs(self, mnt)
        for proc, mnt in list(self.procs):
            with contextlib.suppress(Exception):
                stop_qsd(self, proc, mnt)
        for d in reversed(self.dirs):
            shutil.rmtree(d, ignore_errors=True)
        self.dirs.clear()


# Copies of mirrorfs/system.py's two helpers: the benchmark is standard library only, so
# that it can measure another tree (PYTHONPATH=...) that may not have that module.
def mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return os.path.abspath(path) in (line.split()[4] for line in f)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_pid(pid: int, grace: float = 5.0) -> None:
    deadline = time.monotonic() + grace
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)


# ====================================================================== mirrorfs helpers
def read_ctl(mnt: str) -> dict[str, Any]:
    with open(os.path.join(mnt, ".mirror", "ctl"), "rb") as f:
        return json.loads(f.read())


def send_ctl(mnt: str, cmd: str) -> None:
    fd = os.open(os.path.join(mnt, ".mirror", "ctl"), os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, (cmd + "\n").encode())
    finally:
        os.close(fd)


class CtlPoller:
    """Keeps ctl open and re-reads it from offset 0: one FUSE request per poll."""

    def __init__(self, mnt: str) -> None:
        self.fd = os.open(os.path.join(mnt, ".mirror", "ctl"), os.O_RDONLY)

    def read(self) -> dict[str, Any]:
        return json.loads(os.pread(self.fd, 1 << 16, 0))

    def wait(self, states: tuple[str, ...], timeout: float, poll: float = 0.01,
             quiet: bool = False) -> dict[str, Any]:
        """Until state is in ``states`` (and, with quiet, nothing is dirty or in flight)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.read()
            if st["state"] in states and (not quiet or (st["remaining_bytes"] == 0)):
                return st
            if st["state"] in ("failed", "cancelled") and st["state"] not in states:
                raise BenchError(f"job ended {st['state']}: {st.get('error')}")
            if time.monotonic() > deadline:
                raise BenchError(f"timed out waiting for {states}: {st['state']}, "
                                 f"remaining {st['remaining_bytes']}")
            time.sleep(poll)

    def close(self) -> None:
        os.close(self.fd)


def settle_all(*pollers: CtlPoller) -> None:
    """Wait until every long-lived job is idle. A write case leaves them copying again (each
    write dirties a chunk); a measurement waits for all of them, not only its own job, so
    that no job's catching up competes with another's run for the CPU."""
    for p in pollers:
        p.wait(("ready",), 300, quiet=True)


def use_own_state_dir(reaper: Reaper) -> None:
    """The daemons' state directory (MIRRORFS_STATE_DIR: the pivot registry) in a directory
    of the benchmark's own on the root disk, removed at the end. The registry refuses to
    mirror a source again after a completed mirror of it (the copier's repetitions do just
    that), and the benchmark's temporary images must leave no records in the system's."""
    d = tempfile.mkdtemp(prefix="mirrorfs-bench-state-", dir="/var/tmp")
    reaper.dirs.append(d)
    os.environ["MIRRORFS_STATE_DIR"] = d


def mount_mirrorfs(reaper: Reaper, src: str, tgt: str, mnt: str, *opts: str) -> dict[str, Any]:
    reaper.mounts[mnt] = None  # even a half-done mount gets cleaned up
    # every mount is a new job: forget the pivots of the repetitions before it
    shutil.rmtree(os.path.join(os.environ["MIRRORFS_STATE_DIR"], "pivots"), ignore_errors=True)
    logfile = mnt.rstrip("/") + ".log"
    r = subprocess.run([MIRRORFS, "mount", src, tgt, mnt, "--log", logfile, *opts],
                       capture_output=True, text=True)
    if r.returncode != 0:
        tail = ""
        with contextlib.suppress(OSError), open(logfile, errors="replace") as f:
            tail = " | ".join(f.read().strip().splitlines()[-6:])
        raise BenchError(f"mirrorfs mount {src} failed: {r.stderr.strip()} (log: {tail})")
    st = read_ctl(mnt)
    reaper.mounts[mnt] = int(st["pid"])
    return st


def umount_mirrorfs(reaper: Reaper, mnt: str) -> None:
    pid = reaper.mounts.get(mnt)
    if mounted(mnt):
        r = subprocess.run([MIRRORFS, "umount", mnt, "--timeout", "15"], capture_output=True,
                           text=True)
        if r.returncode != 0 and mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
    if pid:
        kill_pid(pid)
    reaper.mounts.pop(mnt, None)


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM/VmRSS/VmSize in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "VmSize", "VmPeak"):
                out[k] = int(v.split()[0])
    return out


def cpu_seconds(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # utime, stime: fields 14 and 15 of stat; after the ')' split they are 11 and 12
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError):
        return None


# ====================================================================== qemu-storage-daemon
def ensure_qsd() -> str | None:
    exe = shutil.which("qemu-storage-daemon")
    if exe:
        return exe
    log("qemu-storage-daemon missing: installing Debian's qemu-system-common")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "qemu-system-common"]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        subprocess.run(cmd, env=env, capture_output=True)
    return shutil.which("qemu-storage-daemon")


def start_qsd(reaper: Reaper, exe: str, img: str, export: str,
              logfile: str) -> subprocess.Popen[bytes]:
    with open(export, "a"):
        pass  # the FUSE export's mountpoint must be an existing regular file
    cmd = [exe,
           "--blockdev", f"driver=file,node-name=file,filename={img}",
           "--blockdev", "driver=raw,node-name=raw,file=file",
           "--export", f"type=fuse,id=exp,node-name=raw,mountpoint={export},writable=on"]
    with open(logfile, "wb") as lf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                                start_new_session=True)
    reaper.procs.append((proc, export))
    deadline = time.monotonic() + 15
    while not mounted(export):
        if proc.poll() is not None:
            with open(logfile, errors="replace") as lf2:
                raise BenchError(f"qemu-storage-daemon exited {proc.returncode}: "
                                 f"{lf2.read().strip()[-500:]}")
        if time.monotonic() > deadline:
            raise BenchError("qemu-storage-daemon's FUSE export did not appear in 15 s")
        time.sleep(0.02)
    return proc


def stop_qsd(reaper: Reaper, proc: subprocess.Popen[bytes], export: str) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if mounted(export):
        subprocess.run(["fusermount3", "-u", "-z", export], capture_output=True)
    with contextlib.suppress(ValueError):
        reaper.procs.remove((proc, export))


# ====================================================================== fio
def run_fio(path: str, case: FioCase, size: int, runtime: int,
            ramp: int) -> dict[str, Any]:
    name, rw, bs, depth, direct = case
    cmd = ["fio", "--name=bench", f"--filename={path}", f"--size={size}",
           "--ioengine=libaio", f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}",
           f"--direct={direct}", "--time_based", f"--runtime={runtime}",
           f"--ramp_time={ramp}", "--fallocate=none", "--randrepeat=0", "--norandommap",
           "--group_reporting", "--output-format=json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + ramp + 120)
    out = r.stdout
    try:
        data = json.loads(out[out.index("{"):])
    except ValueError:
        raise BenchError(f"fio {name} on {path}: rc {r.returncode}: "
                         f"{(r.stderr or out).strip()[-400:]}") from None
    job = data["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio {name} on {path}: error {job['error']}: {r.stderr.strip()}")
    d = job["write" if "write" in rw else "read"]
    pct = d.get("clat_ns", {}).get("percentile", {})
    return {
        "iops": d["iops"],
        "mib_s": d["bw_bytes"] / MiB,
        "clat_p50_us": pct.get("50.000000", 0) / 1000,
        "clat_p99_us": pct.get("99.000000", 0) / 1000,
        "clat_mean_us": d.get("clat_ns", {}).get("mean", 0) / 1000,
        "runtime_s": d.get("runtime", 0) / 1000,
    }


def metric(case: FioCase, res: dict[str, Any] | None) -> float | None:
    """The headline number of a case: MiB/s for 1 MiB blocks, IOPS for 4 KiB ones."""
    if not res:
        return None
    return res["mib_s"] if case[2] == "1M" else res["iops"]


# ====================================================================== images
def make_random_file(path: str, size: int) -> None:
    pool = os.urandom(16 * MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        off = 0
        while off < size:
            n = min(len(pool), size - off)
            os.pwrite(fd, memoryview(pool)[:n], off)
            off += n
    finally:
        os.close(fd)


def make_sparse_file(path: str, size: int, data: int, extent: int = 512 * KiB,
                     seed: int = 1) -> int:
    """A sparse file of ``size`` with ``data`` bytes in scattered ``extent``-sized extents at
    4 KiB-aligned pseudo-random offsets (not aligned to the 64 KiB granularity)."""
    import random
    rnd = random.Random(seed)
    n = data // extent
    slot = size // n  # one extent somewhere in each slot: scattered, never overlapping
    pool = os.urandom(8 * MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for i in range(n):
            off = i * slot + rnd.randrange(0, (slot - extent) // 4096) * 4096
            p = rnd.randrange(0, (len(pool) - extent) // 4096) * 4096
            os.pwrite(fd, memoryview(pool)[p:p + extent], off)
    finally:
        os.close(fd)
    return n


def prefault(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh anonymous memory, then free it.

    This machine's kernel has free page reporting on (a Firecracker guest): memory that
    was freed is handed back to the host, and the next first touch of it costs ~1 s per
    GiB in host page faults. Whichever timed run happens to allocate such pages (page cache
    for a target, tmpfs pages) looks 2-5x slower at random. Touching memory right before a
    timed run leaves warm pages at the head of the free lists, where the run takes them.
    Used before the fio runs only: before a copy it did the opposite (see copier_case)."""
    import mmap
    nbytes = min(nbytes, 4 * GiB)
    if nbytes <= 0:
        return
    mm = mmap.mmap(-1, nbytes)
    try:
        chunk = b"\1" * (16 * MiB)
        for off in range(0, nbytes, len(chunk)):
            n = min(len(chunk), nbytes - off)
            mm[off:off + n] = chunk[:n]
    finally:
        mm.close()


def drop_clean_cache() -> None:
    """Free the clean page cache (as root). A shared machine's cache fills its memory;
    page allocation then reclaims on the way, and a 1 GiB cp took 0.25 s or 1.2 s by
    whether it did. After this every contender starts with free memory."""
    with contextlib.suppress(OSError):
        subprocess.run(["sync"], check=False)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop(path: str) -> None:
    """Remove a file and a mirrorfs state file beside it (TARGET.mirrorfs), if any."""
    for p in (path, path + ".mirrorfs"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def fs_type(path: str) -> str:
    best, fstype = "", "?"
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mp = parts[4]
            sep = parts.index("-")
            if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) > len(best):
                best, fstype = mp, parts[sep + 1]
    return f"{fstype} ({best})"


# ====================================================================== section 1: fio
def section_fio(cfg: argparse.Namespace, reaper: Reaper, base: str) -> dict[str, Any]:
    size, runtime, ramp = cfg.fio_size, cfg.runtime, cfg.ramp
    res: dict[str, Any] = {"dir": base, "fs": fs_type(base), "image_bytes": size,
                           "runtime_s": runtime, "ramp_s": ramp, "cases": {}}
    raw = os.path.join(base, "raw.img")
    idle_src, idle_tgt = os.path.join(base, "idle.img"), os.path.join(base, "idle-tgt.img")
    copy_src, copy_tgt = os.path.join(base, "copy.img"), os.path.join(base, "copy-tgt.img")
    mnt_idle, mnt_copy = os.path.join(base, "mnt-idle"), os.path.join(base, "mnt-copy")
    # the idle job again without adaptive polling (--poll-us 0), for the queue-depth-1 cases
    np_src, np_tgt = os.path.join(base, "nopoll.img"), os.path.join(base, "nopoll-tgt.img")
    mnt_np = os.path.join(base, "mnt-nopoll")
    export = os.path.join(base, "qsd-export.img")
    for d in (mnt_idle, mnt_copy, mnt_np):
        os.mkdir(d)
    log(f"fio: creating {size // MiB} MiB images in {base}")
    make_random_file(raw, size)
    shutil.copyfile(raw, idle_src)
    shutil.copyfile(raw, copy_src)
    shutil.copyfile(raw, np_src)
    # fio's whole run (ramp + runtime) plus its start-up, times 1.5: the copy outlasts fio
    speed = cfg.copy_speed or int(size / (1.5 * (runtime + ramp + 0.5)))
    speed = max(speed // MiB, 1) * MiB
    res["during_copy_speed_bytes_s"] = speed

    qsd = ensure_qsd()
    res["qsd"] = subprocess.run([qsd, "--version"], capture_output=True,
                                text=True).stdout.split("\n")[0] if qsd else None
    qsd_proc = None
    if qsd:
        qsd_proc = start_qsd(reaper, qsd, raw, export, os.path.join(base, "qsd.log"))
    else:
        log("fio: no qemu-storage-daemon: the qsd column stays empty")
    mount_mirrorfs(reaper, idle_src, idle_tgt, mnt_idle)
    mount_mirrorfs(reaper, np_src, np_tgt, mnt_np, "--poll-us", "0")
    idle, nopoll = CtlPoller(mnt_idle), CtlPoller(mnt_np)
    try:
        idle.wait(("ready",), 300, quiet=True)
        nopoll.wait(("ready",), 300, quiet=True)
        idle_pid, np_pid = reaper.mounts[mnt_idle], reaper.mounts[mnt_np]
        img_idle = os.path.join(mnt_idle, os.path.basename(idle_src))
        img_copy = os.path.join(mnt_copy, os.path.basename(copy_src))
        def settle() -> None:
            settle_all(idle, nopoll)

        def run_raw(case: FioCase) -> dict[str, Any]:
            settle()
            return run_fio(raw, case, size, runtime, ramp)

        def run_qsd(case: FioCase) -> dict[str, Any]:
            assert qsd_proc is not None
            settle()
            c0 = cpu_seconds(qsd_proc.pid)
            r = run_fio(export, case, size, runtime, ramp)
            r["server_cpu_s"] = _delta(cpu_seconds(qsd_proc.pid), c0)
            return r

        def on_ready_job(pid: int, img: str) -> Callable[[FioCase], dict[str, Any]]:
            def run(case: FioCase) -> dict[str, Any]:
                settle()
                c0 = cpu_seconds(pid)
                r = run_fio(img, case, size, runtime, ramp)
                r["server_cpu_s"] = _delta(cpu_seconds(pid), c0)
                return r
            return run

        run_idle = on_ready_job(idle_pid, img_idle)
        run_nopoll = on_ready_job(np_pid, os.path.join(mnt_np, os.path.basename(np_src)))

        def run_copy(case: FioCase) -> dict[str, Any]:
            settle()
            drop(copy_tgt)
            prefault(size + GiB // 2)
            st0 = mount_mirrorfs(reaper, copy_src, copy_tgt, mnt_copy, "--speed", str(speed))
            pid = reaper.mounts[mnt_copy]
            try:
                c0 = cpu_seconds(pid)
                r = run_fio(img_copy, case, size, runtime, ramp)
                r["server_cpu_s"] = _delta(cpu_seconds(pid), c0)
                st = read_ctl(mnt_copy)
                r.update(state_at_end=st["state"], copy_running_at_end=st["state"] == "copying",
                         copied_bytes=st["copied_bytes"] - st0["copied_bytes"],
                         remaining_bytes_at_end=st["remaining_bytes"])
                return r
            finally:
                umount_mirrorfs(reaper, mnt_copy)

        runners = [("raw", "raw", run_raw), ("qsd", "qsd", run_qsd),
                   ("idle", "mirrorfs idle", run_idle),
                   ("copy", f"mirrorfs during copy (speed {speed // MiB} MiB/s)", run_copy),
                   ("nopoll", "mirrorfs idle, --poll-us 0", run_nopoll)]
        if qsd_proc is None:
            runners.pop(1)
        for case in cfg.fio_cases:
            name = case[0]
            reps: dict[str, list[dict[str, Any]]] = {k: [] for k, _, _ in runners}
            errors: dict[str, str] = {}
            for rep in range(cfg.fio_reps):  # all interleaved: drift hits all alike
                tag = f"fio: {name}" + (f" (rep {rep + 1})" if cfg.fio_reps > 1 else "")
                for key, label, fn in runners:
                    if key == "nopoll" and (case[3] != 1 or case[2] != "4k"):
                        continue  # the 4K queue-depth-1 cases: where the queue runs dry
                    log(f"{tag}: {label}")
                    try:
                        reps[key].append(fn(case))
                    except (BenchError, subprocess.TimeoutExpired) as e:
                        log(f"{tag}: {label} failed: {e}")
                        errors[key] = str(e)
            row: dict[str, Any] = {}
            for k, runs in reps.items():
                if runs:
                    row[k] = _median_run(case, runs)
            if cfg.fio_reps > 1:
                row["reps"] = reps
            if errors:
                row["errors"] = errors
                res.setdefault("errors", {})[name] = errors
            res["cases"][name] = row
    finally:
        idle.close()
        nopoll.close()
        umount_mirrorfs(reaper, mnt_idle)
        umount_mirrorfs(reaper, mnt_np)
        if qsd_proc is not None:
            stop_qsd(reaper, qsd_proc, export)
    for p in (raw, idle_src, idle_tgt, copy_tgt, export, np_src, np_tgt):
        drop(p)
    res["_keep_copy_src"] = copy_src  # section 3 reuses it
    return res


def _median_run(case: FioCase,
                runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median headline number (lower median for an even count)."""
    runs = sorted(runs, key=lambda r: metric(case, r) or 0.0)
    return dict(runs[(len(runs) - 1) // 2])


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


# ====================================================================== section 2: copier
def timed_mirror(reaper: Reaper, src: str, tgt: str, mnt: str, poll: float = 0.001,
                 poll_done: float = 0.01) -> dict[str, Any]:
    drop(tgt)
    t0 = time.perf_counter()
    mount_mirrorfs(reaper, src, tgt, mnt)
    t_mounted = time.perf_counter() - t0
    poller = CtlPoller(mnt)
    try:
        # 1 ms polls (a FUSE read of ctl each): at 10 ms they added 5 ms to the copy's time
        poller.wait(("ready",), 600, poll=poll)
        t_ready = time.perf_counter() - t0
        send_ctl(mnt, "complete")
        st = poller.wait(("completed",), 600, poll=poll_done)
        t_done = time.perf_counter() - t0
    finally:
        poller.close()
    with open(os.path.join(mnt, ".mirror", "events"), "rb") as f:
        events = [json.loads(line) for line in f.read().splitlines() if line.strip()]
    ready_ev = [e for e in events if e.get("event") == "ready"]
    cpu = cpu_seconds(reaper.mounts.get(mnt))  # the daemon's user + system time, mount to now
    umount_mirrorfs(reaper, mnt)
    return {"mounted_s": t_mounted, "ready_s": t_ready, "completed_s": t_done,
            "daemon_ready_s": ready_ev[0].get("elapsed_seconds") if ready_ev else None,
            "daemon_cpu_s": cpu,
            "copied_bytes": st["copied_bytes"], "zeroed_bytes": st["zeroed_bytes"],
            "target_allocated": allocated(tgt)}


def timed_cp(src: str, dst: str, sparse: bool, fsync: bool) -> float:
    drop(dst)
    cmd = ["cp", "--sparse=always" if sparse else "--sparse=auto", src, dst]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    if fsync:
        fsync_path(dst)
    return time.perf_counter() - t0


def settle() -> None:
    """Between timed copies: write back what the last one left dirty, so that one rep's
    write-back does not land in the next one's time."""
    subprocess.run(["sync"], check=False)
    time.sleep(0.5)


def copier_case(reaper: Reaper, base: str, label: str, src: str, sparse: bool,
                reps: int) -> dict[str, Any]:
    dst = os.path.join(base, f"{label}-cp.img")
    tgt = os.path.join(base, f"{label}-tgt.img")
    mnt = os.path.join(base, f"mnt-{label}")
    os.makedirs(mnt, exist_ok=True)
    drop_clean_cache()
    with open(src, "rb") as f:  # page cache hot, as in QEMU's numbers
        while f.read(16 * MiB):
            pass
    runs: dict[str, list[Any]] = {"cp": [], "cp_fsync": [], "mirrorfs": []}
    cp_alloc = None
    def cp_plain() -> None:
        runs["cp"].append(timed_cp(src, dst, sparse, fsync=False))
        drop(dst)

    def cp_fsync() -> None:
        nonlocal cp_alloc
        runs["cp_fsync"].append(timed_cp(src, dst, sparse, fsync=True))
        cp_alloc = allocated(dst)
        drop(dst)

    def mirror() -> None:
        runs["mirrorfs"].append(timed_mirror(reaper, src, tgt, mnt))
        drop(tgt)

    order = [cp_plain, cp_fsync, mirror]
    for i in range(reps):
        log(f"copier: {label}: rep {i + 1}/{reps}")
        for fn in order[i % 3:] + order[:i % 3]:  # rotated: no contender always goes first
            # No prefault here (unlike fio's runs): on this machine, touching and freeing
            # 1.75 GiB right before a copy made every copy slow (cp of 1 GiB 1.1-1.6 s in 8
            # of 8 runs, against 0.25-0.29 s in 6 of 8 without), as if the freed memory
            # went back to the host at once. Without it, a run is fast or slow by where
            # its pages come from: hence the medians and the best runs, side by side.
            settle()
            fn()
    med = statistics.median
    m = runs["mirrorfs"]
    best = {"cp_s": min(runs["cp"]), "cp_fsync_s": min(runs["cp_fsync"]),
            "ready_s": min(r["ready_s"] for r in m),
            "completed_s": min(r["completed_s"] for r in m)}
    out = {
        "size": os.stat(src).st_size,
        "source_allocated": allocated(src),
        "cp_allocated": cp_alloc,
        "target_allocated": m[-1]["target_allocated"],
        "cp_s": med(runs["cp"]),
        "cp_fsync_s": med(runs["cp_fsync"]),
        "mount_s": med(r["mounted_s"] for r in m),
        "ready_s": med(r["ready_s"] for r in m),
        "completed_s": med(r["completed_s"] for r in m),
        "daemon_ready_s": med(r["daemon_ready_s"] for r in m if r["daemon_ready_s"] is not None)
        if any(r["daemon_ready_s"] is not None for r in m) else None,
        "best": best,
        "runs": runs,
    }
    out["speed_ready_vs_cp"] = out["cp_s"] / out["ready_s"]
    out["speed_completed_vs_cp_fsync"] = out["cp_fsync_s"] / out["completed_s"]
    out["time_ready_vs_cp"] = out["ready_s"] / out["cp_s"]
    out["time_completed_vs_cp_fsync"] = out["completed_s"] / out["cp_fsync_s"]
    return out


def section_copier(cfg: argparse.Namespace, reaper: Reaper, base: str) -> dict[str, Any]:
    res: dict[str, Any] = {"dir": base, "fs": fs_type(base), "reps": cfg.reps}
    full = os.path.join(base, "full.img")
    log(f"copier: creating a fully allocated {cfg.copy_size // MiB} MiB image in {base}")
    make_random_file(full, cfg.copy_size)
    try:
        res["full"] = copier_case(reaper, base, "full", full, sparse=False, reps=cfg.reps)
    finally:
        drop(full)
    sparse = os.path.join(base, "sparse.img")
    log(f"copier: creating a {cfg.sparse_size // GiB} GiB sparse image with "
        f"{cfg.sparse_data // MiB} MiB of data")
    n = make_sparse_file(sparse, cfg.sparse_size, cfg.sparse_data)
    try:
        res["sparse"] = copier_case(reaper, base, "sparse", sparse, sparse=True, reps=cfg.reps)
        res["sparse"]["extents"] = n
    finally:
        drop(sparse)
    return res


# ====================================================================== section 6: big copier
BIG_POLL_S = 0.005  # ctl polls while the 8 GiB copy runs: 5 ms is 0.1% of a 5 s copy


def drop_all_caches() -> None:
    """sync, then drop the page cache, dentries and inodes (echo 3 > drop_caches): the next
    run reads its source from the disk. Needs root."""
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        raise BenchError(f"cannot drop the page cache ({e}): run as root") from None


def timed_cp_fsync_big(src: str, dst: str) -> dict[str, float]:
    """``cp SRC DST``, then fsync(2) of DST from this process (open O_RDONLY, fsync)."""
    drop(dst)
    t0 = time.perf_counter()
    subprocess.run(["cp", src, dst], check=True)
    t_cp = time.perf_counter() - t0
    fsync_path(dst)
    return {"cp_s": t_cp, "cp_fsync_s": time.perf_counter() - t0, "allocated": allocated(dst)}


def timed_dd_direct(src: str, dst: str) -> dict[str, float]:
    """``dd if=SRC of=DST bs=4M oflag=direct``: buffered reads of the source, O_DIRECT writes
    of the copy; no fsync, as the command is written (the data bypasses the page cache)."""
    drop(dst)
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={src}", f"of={dst}", "bs=4M", "oflag=direct", "status=none"],
                   check=True)
    return {"dd_s": time.perf_counter() - t0, "allocated": allocated(dst)}


def section_big(cfg: argparse.Namespace, reaper: Reaper) -> dict[str, Any]:
    """An 8 GiB fully allocated image on the machine's disk, from a cold page cache: mirrorfs
    mount -> ready and mount -> completed against cp + fsync and dd oflag=direct."""
    size, reps = cfg.big_size, cfg.big_reps
    fs = fs_type(cfg.big_dir)
    if fs.startswith(("tmpfs", "ramfs")):
        raise BenchError(f"--big-dir {cfg.big_dir} is on {fs}: this case needs a disk")
    free = shutil.disk_usage(cfg.big_dir).free
    if free < 2 * size + GiB:
        raise BenchError(f"--big-dir {cfg.big_dir}: {free / GiB:.1f} GiB free, the case needs "
                         f"{(2 * size + GiB) / GiB:.1f} (the source and one copy at a time)")
    base = tempfile.mkdtemp(prefix="mirrorfs-bench-big-", dir=cfg.big_dir)
    reaper.dirs.append(base)
    src, tgt = os.path.join(base, "big.img"), os.path.join(base, "big-tgt.img")
    dst_cp, dst_dd = os.path.join(base, "big-cp.img"), os.path.join(base, "big-dd.img")
    mnt = os.path.join(base, "mnt-big")
    os.mkdir(mnt)
    res: dict[str, Any] = {"dir": base, "fs": fs, "size": size, "reps": reps,
                           "order": ["mirrorfs", "cp_fsync", "dd"], "poll_s": BIG_POLL_S,
                           "page_cache": "sync; echo 3 > /proc/sys/vm/drop_caches before each run",
                           "cp": "cp SRC DST, then fsync(2) of DST from the benchmark",
                           "dd": "dd if=SRC of=DST bs=4M oflag=direct (no fsync)"}
    runs: dict[str, list[dict[str, Any]]] = {"mirrorfs": [], "cp_fsync": [], "dd": []}
    try:
        log(f"big: creating a fully allocated {size // MiB} MiB image in {base}")
        make_random_file(src, size)
        fsync_path(src)
        res["source_allocated"] = allocated(src)

        def one(key: str, fn: Callable[[], dict[str, Any]], out: str) -> None:
            drop_all_caches()  # also writes back what the last run left dirty
            time.sleep(0.5)
            load = os.getloadavg()[0]
            r = fn()
            r["loadavg_1m_before"] = load
            runs[key].append(r)
            drop(out)

        for i in range(reps):  # interleaved: mirrorfs, cp + fsync, dd, mirrorfs, ...
            log(f"big: rep {i + 1}/{reps}: mirrorfs")
            one("mirrorfs", lambda: timed_mirror(reaper, src, tgt, mnt, poll=BIG_POLL_S,
                                                 poll_done=BIG_POLL_S), tgt)
            m = runs["mirrorfs"][-1]
            log(f"big: rep {i + 1}/{reps}: mirrorfs ready {m['ready_s']:.2f} s, completed "
                f"{m['completed_s']:.2f} s; cp + fsync")
            one("cp_fsync", lambda: timed_cp_fsync_big(src, dst_cp), dst_cp)
            log(f"big: rep {i + 1}/{reps}: cp + fsync {runs['cp_fsync'][-1]['cp_fsync_s']:.2f} s"
                "; dd oflag=direct")
            one("dd", lambda: timed_dd_direct(src, dst_dd), dst_dd)
            log(f"big: rep {i + 1}/{reps}: dd {runs['dd'][-1]['dd_s']:.2f} s")
    finally:
        umount_mirrorfs(reaper, mnt)
        for p in (src, tgt, dst_cp, dst_dd):
            drop(p)
        shutil.rmtree(base, ignore_errors=True)
        with contextlib.suppress(ValueError):
            reaper.dirs.remove(base)
        subprocess.run(["sync"], check=False)
    series = {
        "mount_s": [r["mounted_s"] for r in runs["mirrorfs"]],
        "ready_s": [r["ready_s"] for r in runs["mirrorfs"]],
        "completed_s": [r["completed_s"] for r in runs["mirrorfs"]],
        "cp_s": [r["cp_s"] for r in runs["cp_fsync"]],
        "cp_fsync_s": [r["cp_fsync_s"] for r in runs["cp_fsync"]],
        "dd_s": [r["dd_s"] for r in runs["dd"]],
    }
    res["runs"] = runs
    res["series"] = series
    res["median"] = {k: statistics.median(v) for k, v in series.items()}
    res["best"] = {k: min(v) for k, v in series.items()}
    res["worst"] = {k: max(v) for k, v in series.items()}
    ratios: dict[str, float] = {}
    for agg in ("median", "best"):
        a = res[agg]
        for mk in ("ready_s", "completed_s"):
            for pk in ("dd_s", "cp_fsync_s"):
                ratios[f"{mk[:-2]}_vs_{pk[:-2]}_{agg}"] = a[mk] / a[pk]
    # the goal is per run: each mirrorfs run against the median dd
    for mk in ("ready_s", "completed_s"):
        ratios[f"{mk[:-2]}_vs_dd_worst_run"] = res["worst"][mk] / res["median"]["dd_s"]
    res["ratios"] = ratios
    daemon = [r["daemon_ready_s"] for r in runs["mirrorfs"] if r["daemon_ready_s"] is not None]
    res["daemon_ready_s_median"] = statistics.median(daemon) if daemon else None
    cpu = [r["daemon_cpu_s"] for r in runs["mirrorfs"] if r.get("daemon_cpu_s") is not None]
    res["daemon_cpu_s_median"] = statistics.median(cpu) if cpu else None
    return res


# ====================================================================== section 3: write-blocking
def section_wb(cfg: argparse.Namespace, reaper: Reaper, base: str,
               src: str | None) -> dict[str, Any]:
    size, runtime, ramp = cfg.fio_size, cfg.runtime, cfg.ramp
    res: dict[str, Any] = {"dir": base, "fs": fs_type(base), "cases": {}}
    raw = os.path.join(base, "wb-raw.img")
    bg_src, bg_tgt = os.path.join(base, "wb-bg.img"), os.path.join(base, "wb-bg-tgt.img")
    wb_src, wb_tgt = os.path.join(base, "wb-wb.img"), os.path.join(base, "wb-wb-tgt.img")
    # the same background job without a state file: the activity log's cost
    ns_src, ns_tgt = os.path.join(base, "wb-ns.img"), os.path.join(base, "wb-ns-tgt.img")
    mnt_bg, mnt_wb = os.path.join(base, "mnt-bg"), os.path.join(base, "mnt-wb")
    mnt_ns = os.path.join(base, "mnt-ns")
    for d in (mnt_bg, mnt_wb, mnt_ns):
        os.makedirs(d, exist_ok=True)
    if src and os.path.exists(src):
        os.rename(src, raw)
    else:
        make_random_file(raw, size)
    shutil.copyfile(raw, bg_src)
    shutil.copyfile(raw, wb_src)
    shutil.copyfile(raw, ns_src)
    try:
        mount_mirrorfs(reaper, bg_src, bg_tgt, mnt_bg)
        mount_mirrorfs(reaper, wb_src, wb_tgt, mnt_wb, "--copy-mode", "write-blocking")
        mount_mirrorfs(reaper, ns_src, ns_tgt, mnt_ns, "--no-state")
        bg, wb, ns = CtlPoller(mnt_bg), CtlPoller(mnt_wb), CtlPoller(mnt_ns)
        try:
            def settle() -> None:
                settle_all(bg, wb, ns)

            for case in cfg.wb_cases:
                row: dict[str, Any] = {}
                log(f"wb: {case[0]}: raw")
                settle()
                row["raw"] = run_fio(raw, case, size, runtime, ramp)
                log(f"wb: {case[0]}: background")
                settle()
                row["background"] = run_fio(os.path.join(mnt_bg, os.path.basename(bg_src)),
                                            case, size, runtime, ramp)
                log(f"wb: {case[0]}: write-blocking")
                settle()
                row["write_blocking"] = run_fio(os.path.join(mnt_wb, os.path.basename(wb_src)),
                                                case, size, runtime, ramp)
                st = wb.read()
                row["write_blocking"]["active_bytes"] = st["active_bytes"]
                log(f"wb: {case[0]}: background, no state file")
                settle()
                row["background_no_state"] = run_fio(
                    os.path.join(mnt_ns, os.path.basename(ns_src)), case, size, runtime, ramp)
                res["cases"][case[0]] = row
        finally:
            bg.close()
            wb.close()
            ns.close()
    finally:
        umount_mirrorfs(reaper, mnt_bg)
        umount_mirrorfs(reaper, mnt_wb)
        umount_mirrorfs(reaper, mnt_ns)
        for p in (raw, bg_src, bg_tgt, wb_src, wb_tgt, ns_src, ns_tgt):
            drop(p)
    return res


# ====================================================================== section 5: NBD
def section_nbd(cfg: argparse.Namespace, reaper: Reaper, base: str) -> dict[str, Any]:
    """The copier to an NBD export on loopback (qemu-nbd, Unix socket), against nbdcopy
    --flush of the same image to the same server."""
    for exe, pkg in (("qemu-nbd", "qemu-utils"), ("nbdcopy", "libnbd-bin")):
        if not shutil.which(exe):
            subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", pkg],
                           capture_output=True, check=False)
    size = GiB // 4 if cfg.quick else GiB
    src, exp = os.path.join(base, "nbd-src.img"), os.path.join(base, "nbd-export.img")
    sock, mnt = os.path.join(base, "nbd.sock"), os.path.join(base, "mnt-nbd")
    os.makedirs(mnt, exist_ok=True)
    make_random_file(src, size)
    uri = f"nbd+unix:///disk?socket={sock}"
    res: dict[str, Any] = {"dir": base, "size": size, "mirrorfs_s": [], "nbdcopy_s": []}

    def server() -> subprocess.Popen[bytes]:
        with open(exp, "wb") as f:
            f.truncate(size)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        p = subprocess.Popen(["qemu-nbd", "-f", "raw", "-x", "disk", "-t", "-k", sock, exp],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if time.monotonic() > deadline:
                p.kill()
                raise BenchError("qemu-nbd did not start")
            time.sleep(0.01)
        return p

    try:
        for _ in range(1 if cfg.quick else 3):
            p = server()
            try:
                t0 = time.perf_counter()
                subprocess.run(["nbdcopy", "--flush", src, uri], check=True)
                res["nbdcopy_s"].append(time.perf_counter() - t0)
            finally:
                p.kill()
                p.wait()
            p = server()
            try:
                t0 = time.perf_counter()
                mount_mirrorfs(reaper, src, uri, mnt, "--no-state")
                poller = CtlPoller(mnt)
                try:
                    poller.wait(("ready",), 600, quiet=True)
                    send_ctl(mnt, "complete")  # includes NBD_CMD_FLUSH
                    poller.wait(("completed",), 600, quiet=True)
                finally:
                    poller.close()
                res["mirrorfs_s"].append(time.perf_counter() - t0)
                umount_mirrorfs(reaper, mnt)
            finally:
                p.kill()
                p.wait()
    finally:
        for f in (src, exp):
            drop(f)
    res["mirrorfs_median_s"] = statistics.median(res["mirrorfs_s"])
    res["nbdcopy_median_s"] = statistics.median(res["nbdcopy_s"])
    res["time_vs_nbdcopy"] = res["mirrorfs_median_s"] / res["nbdcopy_median_s"]
    return res


# ====================================================================== section 4: memory
def section_mem(cfg: argparse.Namespace, reaper: Reaper, base: str) -> dict[str, Any]:
    res: dict[str, Any] = {"dir": base, "fs": fs_type(base), "granularity": "64K (default)"}
    mnt = os.path.join(base, "mnt-mem")
    os.makedirs(mnt, exist_ok=True)
    runs: list[tuple[str, int, tuple[str, ...]]] = [("baseline_1M", MiB, ()),
                                                    ("sparse_16T", 16 * TiB, ())]
    helptext = subprocess.run([MIRRORFS, "mount", "--help"], capture_output=True,
                              text=True).stdout
    if "--no-state" in helptext:  # what the state file costs, where it can be turned off
        runs.append(("sparse_16T_no_state", 16 * TiB, ("--no-state",)))
    for label, size, opts in runs:
        src, tgt = os.path.join(base, f"mem-{label}.img"), os.path.join(base, f"mem-{label}-t.img")
        with open(src, "wb") as f:
            f.truncate(size)
        try:
            t0 = time.perf_counter()
            st = mount_mirrorfs(reaper, src, tgt, mnt, *opts)
            pid = int(st["pid"])
            after_mount = proc_status(pid)
            poller = CtlPoller(mnt)
            try:
                poller.wait(("ready",), 600)
                t_ready = time.perf_counter() - t0
            finally:
                poller.close()
            at_ready = proc_status(pid)
            res[label] = {
                "size": size,
                "ready_s": t_ready,
                "after_mount_kib": after_mount,
                "at_ready_kib": at_ready,
                "hwm_mib": at_ready["VmHWM"] / 1024,
                "target_allocated": allocated(tgt),
            }
            log(f"mem: {label}: VmHWM {at_ready['VmHWM'] / 1024:.1f} MiB, ready in "
                f"{t_ready:.2f} s")
        finally:
            umount_mirrorfs(reaper, mnt)
            drop(src)
            drop(tgt)
    return res


# ====================================================================== report
def _fmt(v: float | None, nd: int = 0) -> str:
    if v is None:
        return "-"
    if nd == 0:
        return f"{v:,.0f}"
    return f"{v:.{nd}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _report_big(s: dict[str, Any]) -> list[str]:
    md, b, w, r = s["median"], s["best"], s["worst"], s["ratios"]
    out = ["", f"6. copier from the disk: {s['size'] // MiB} MiB fully allocated image on "
               f"{s['fs']}, page cache dropped before each run (echo 3),",
           f"   {s['reps']} interleaved reps (mirrorfs, cp + fsync, dd); seconds; ratios are "
           "times (lower is better for mirrorfs)",
           f"   {'':<30}{'median':>8}{'best':>8}{'worst':>8}{'/dd med':>9}{'/dd best':>9}"
           f"{'/cp+fs med':>11}{'/cp+fs best':>12}"]
    rows = (("mirrorfs mount returned", "mount_s", None),
            ("mirrorfs mount -> ready", "ready_s", "ready"),
            ("mirrorfs mount -> completed", "completed_s", "completed"),
            ("cp (its part of cp + fsync)", "cp_s", None),
            ("cp + fsync", "cp_fsync_s", None),
            ("dd bs=4M oflag=direct", "dd_s", None))
    for title, k, rk in rows:
        line = f"   {title:<30}{md[k]:>8.2f}{b[k]:>8.2f}{w[k]:>8.2f}"
        if rk:
            line += (f"{r[rk + '_vs_dd_median']:>9.2f}{r[rk + '_vs_dd_best']:>9.2f}"
                     f"{r[rk + '_vs_cp_fsync_median']:>11.2f}{r[rk + '_vs_cp_fsync_best']:>12.2f}")
        out.append(line)
    for title, k in (("ready", "ready_s"), ("completed", "completed_s"), ("cp+fsync", "cp_fsync_s"),
                     ("dd", "dd_s")):
        out.append(f"   runs {title:<10} " + " ".join(f"{v:.2f}" for v in s["series"][k]))
    out.append(f"   worst mirrorfs run / median dd: ready {r['ready_vs_dd_worst_run']:.2f}, "
               f"completed {r['completed_vs_dd_worst_run']:.2f}; daemon-internal start->ready "
               f"{_fmt(s['daemon_ready_s_median'], 2)} s, daemon CPU "
               f"{_fmt(s.get('daemon_cpu_s_median'), 2)} s (medians)")
    loads = [x["loadavg_1m_before"] for k in s["order"] for x in s["runs"][k]]
    out.append(f"   load average (1 min) before the runs: {min(loads):.2f}-{max(loads):.2f} "
               f"on {os.cpu_count()} CPUs")
    return out


def report(results: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    lines: list[str] = []
    checks: dict[str, Any] = {}
    env = results["env"]
    mode = "quick" if results["quick"] else "full"
    lines.append(f"mirrorfs benchmark {results['timestamp']}  ({mode})"
                 f"  commit {env.get('commit')}"
                 f"{' + uncommitted mirrorfs/ changes' if env.get('mirrorfs_uncommitted') else ''}"
                 f"  kernel {env['kernel']}  {env['cpus']} CPUs  fio {env.get('fio')}")
    mod = env.get("mirrorfs_module") or ""
    if mod and not mod.startswith(REPO + os.sep):
        lines.append(f"NOTE: benchmarking mirrorfs from {mod} (not this checkout)")
    s = results.get("fio")
    if s and "cases" in s:
        lines.append("")
        reps = results["env"].get("fio_reps", 1)
        lines.append(f"1. fio, libaio, {s['image_bytes'] // MiB} MiB image on {s['fs']}, "
                     f"{s['runtime_s']} s (+{s['ramp_s']} s ramp) per run"
                     f"{f', median of {reps}' if reps > 1 else ''}; MiB/s for 1M, IOPS for 4K")
        lines.append(f"   qsd = {s.get('qsd')} FUSE export; during-copy = fresh job per case, "
                     f"--speed {s['during_copy_speed_bytes_s'] // MiB}M (copy ~1.5x the run)")
        hdr = (f"   {'case':<26}{'raw':>10}{'qsd':>10}{'mfs-idle':>10}{'mfs-copy':>10}"
               f"{'idle/qsd':>10}{'copy/idle':>10}{'no-poll':>10}  copying@end  "
               "cpu s qsd/idle/copy/no-poll")
        lines.append(hdr)
        worst_q, worst_c = [], []
        for case in FIO_CASES:
            row = s["cases"].get(case[0])
            if not row:
                continue
            raw, q, i, c, npl = (metric(case, row.get(k))
                                 for k in ("raw", "qsd", "idle", "copy", "nopoll"))
            iq, ci = _ratio(i, q), _ratio(c, i)
            if iq is not None:
                worst_q.append(iq)
            if ci is not None:
                worst_c.append(ci)
            cp = row.get("copy", {})
            running = cp.get("copy_running_at_end")
            cpu = "/".join(_fmt(row.get(k, {}).get("server_cpu_s"), 1)
                           for k in ("qsd", "idle", "copy", "nopoll"))
            lines.append(f"   {case[0]:<26}{_fmt(raw):>10}{_fmt(q):>10}{_fmt(i):>10}{_fmt(c):>10}"
                         f"{_fmt(iq, 2):>10}{_fmt(ci, 2):>10}{_fmt(npl):>10}  "
                         f"{'yes' if running else 'NO' if running is not None else '-':<11}  {cpu}")
            row["ratio_idle_vs_qsd"] = iq
            row["ratio_copy_vs_idle"] = ci
        checks["idle_vs_qsd_min"] = min(worst_q) if worst_q else None
        checks["copy_vs_idle_min"] = min(worst_c) if worst_c else None
    s = results.get("copier")
    if s and "full" in s:
        lines.append("")
        lines.append(f"2. copier on {s['fs']}, medians of {s['reps']} (then the best runs), "
                     "source page-cache hot, seconds")
        lines.append(f"   {'image':<44}{'cp':>8}{'cp+fsync':>10}{'mount':>8}{'ready':>8}"
                     f"{'complete':>10}{'cp/ready':>10}{'cpfs/compl':>11}")
        for key, title in (("full", "full"), ("sparse", "sparse")):
            c = s.get(key)
            if not c:
                continue
            if key == "full":
                title = f"{c['size'] // MiB} MiB allocated"
            else:
                title = (f"{c['size'] // GiB} GiB sparse, {c['source_allocated'] // MiB} MiB "
                         "data (cp --sparse=always)")
            lines.append(f"   {title:<44}{c['cp_s']:>8.3f}{c['cp_fsync_s']:>10.3f}"
                         f"{c['mount_s']:>8.3f}{c['ready_s']:>8.3f}{c['completed_s']:>10.3f}"
                         f"{c['speed_ready_vs_cp']:>10.2f}{c['speed_completed_vs_cp_fsync']:>11.2f}")
        for key in ("full", "sparse"):
            c = s.get(key)
            if c and c.get("best"):
                b = c["best"]
                lines.append(f"   {'  best of ' + str(s['reps']):<44}{b['cp_s']:>8.3f}"
                             f"{b['cp_fsync_s']:>10.3f}{'':>8}{b['ready_s']:>8.3f}"
                             f"{b['completed_s']:>10.3f}{b['cp_s'] / b['ready_s']:>10.2f}"
                             f"{b['cp_fsync_s'] / b['completed_s']:>11.2f}   ({key})")
        f, sp = s["full"], s.get("sparse")
        lines.append(f"   daemon-internal start->ready: full {_fmt(f['daemon_ready_s'], 3)} s"
                     + (f", sparse {_fmt(sp['daemon_ready_s'], 3)} s" if sp else ""))
        if sp:
            lines.append(f"   sparse allocated: source {sp['source_allocated'] / MiB:.1f} MiB, "
                         f"mirrorfs target {sp['target_allocated'] / MiB:.1f} MiB, "
                         f"cp target {(sp['cp_allocated'] or 0) / MiB:.1f} MiB")
            checks["sparse_time_vs_cp_max"] = sp["time_ready_vs_cp"]
            checks["sparse_completed_vs_cp_fsync"] = sp["time_completed_vs_cp_fsync"]
        checks["copier_speed_vs_cp_min"] = f["speed_ready_vs_cp"]
        checks["copier_completed_speed_vs_cp_fsync"] = f["speed_completed_vs_cp_fsync"]
    s = results.get("big")
    if s and "median" in s:
        lines.extend(_report_big(s))
        checks["big_completed_vs_dd_max"] = s["ratios"]["completed_vs_dd_worst_run"]
        checks["big_ready_vs_dd_worst_run"] = s["ratios"]["ready_vs_dd_worst_run"]
    s = results.get("wb")
    if s and "cases" in s:
        lines.append("")
        lines.append(f"3. write-blocking cost on {s['fs']}: fio throughput and completion "
                     "latency (clat)")
        lines.append(f"   {'case':<26}{'job':<16}{'throughput':>18}{'p50 us':>10}{'p99 us':>10}"
                     f"{'vs raw':>8}")
        for case in WB_CASES:
            row = s["cases"].get(case[0])
            if not row:
                continue
            unit = "MiB/s" if case[2] == "1M" else "IOPS"
            base = metric(case, row.get("raw"))
            for k, label in (("raw", "raw file"), ("background", "ready, background"),
                             ("write_blocking", "ready, wr-block"),
                             ("background_no_state", "bg, no state")):
                r = row.get(k)
                if not r:
                    continue
                v = metric(case, r)
                lines.append(f"   {case[0] if k == 'raw' else '':<26}{label:<16}"
                             f"{_fmt(v) + ' ' + unit:>18}{_fmt(r['clat_p50_us']):>10}"
                             f"{_fmt(r['clat_p99_us']):>10}{_fmt(_ratio(v, base), 2):>8}")
            wbbg = _ratio(metric(case, row.get("write_blocking")),
                          metric(case, row.get("background")))
            row["ratio_wb_vs_bg"] = wbbg
            lines.append(f"   {'':<26}{'wr-block/bg':<16}{_fmt(wbbg, 2):>18}")
            al = _ratio(metric(case, row.get("background")),
                        metric(case, row.get("background_no_state")))
            row["ratio_state_vs_no_state"] = al
            lines.append(f"   {'':<26}{'state/no state':<16}{_fmt(al, 2):>18}"
                         "   (the activity log's cost)")
    s = results.get("nbd")
    if s and "time_vs_nbdcopy" in s:
        lines.append("")
        lines.append(f"5. copier to an NBD export (qemu-nbd, Unix socket), {s['size'] >> 20} MiB:")
        lines.append(f"   nbdcopy --flush {s['nbdcopy_median_s']:.2f} s; mirrorfs mount -> "
                     f"completed (flush) {s['mirrorfs_median_s']:.2f} s; "
                     f"time ratio {s['time_vs_nbdcopy']:.2f}")
    s = results.get("mem")
    if s and "sparse_16T" in s:
        lines.append("")
        m, b = s["sparse_16T"], s.get("baseline_1M")
        lines.append(f"4. daemon memory, 16 TiB all-hole image on {s['fs']}, granularity 64K")
        lines.append(f"   after mount: VmHWM {m['after_mount_kib']['VmHWM'] / 1024:.1f} MiB "
                     f"(VmRSS {m['after_mount_kib']['VmRSS'] / 1024:.1f});  at ready: VmHWM "
                     f"{m['at_ready_kib']['VmHWM'] / 1024:.1f} MiB (VmRSS "
                     f"{m['at_ready_kib']['VmRSS'] / 1024:.1f});  ready in {m['ready_s']:.2f} s;"
                     f"  target allocated {m['target_allocated'] // KiB} KiB")
        if b:
            lines.append(f"   baseline (1 MiB image): VmHWM {b['at_ready_kib']['VmHWM'] / 1024:.1f}"
                         " MiB")
        ns = s.get("sparse_16T_no_state")
        if ns:
            k = ns["at_ready_kib"]
            lines.append(f"   16 TiB with --no-state: VmHWM {k['VmHWM'] / 1024:.1f} MiB "
                         f"(VmRSS {k['VmRSS'] / 1024:.1f})")
        checks["rss_16t_max_mib"] = m["hwm_mib"]
    lines.append("")
    lines.append("targets:")
    verdicts = {}
    for key, want in TARGETS.items():
        got = checks.get(key)
        if got is None:
            verdict = "n/a"
        elif key.endswith("_min"):
            verdict = "ok" if got >= want else "MISSED"
        else:
            verdict = "ok" if got <= want else "MISSED"
        verdicts[key] = {"value": got, "target": want, "verdict": verdict}
        op = ">=" if key.endswith("_min") else "<="
        lines.append(f"   {key:<28} {_fmt(got, 2):>8}  (want {op} {want})  {verdict}")
    for key in ("copier_completed_speed_vs_cp_fsync", "sparse_completed_vs_cp_fsync",
                "big_ready_vs_dd_worst_run"):
        if checks.get(key) is not None:
            lines.append(f"   {key:<36} {checks[key]:.2f}  (informational)")
    if results.get("errors"):
        lines.append("")
        lines.append("errors:")
        for sec, err in results["errors"].items():
            lines.append(f"   {sec}: {err}")
    return "\n".join(lines), {"checks": checks, "targets": verdicts}


# ====================================================================== main
def environment(cfg: argparse.Namespace) -> dict[str, Any]:
    def out(cmd: list[str], cwd: str = REPO) -> str | None:
        try:
            return subprocess.run(cmd, capture_output=True, text=True,
                                  cwd=cwd).stdout.strip().split("\n")[0] or None
        except OSError:
            return None

    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "fio": out(["fio", "--version"]),
        "commit": out(["git", "rev-parse", "--short", "HEAD"]),
        "mirrorfs_uncommitted": subprocess.run(
            ["git", "status", "--porcelain", "mirrorfs"], capture_output=True, text=True,
            cwd=REPO).stdout.split("\n")[:-1],
        "mirrorfs_module": out([os.path.join(VENV_BIN, "python"), "-c",
                                "import mirrorfs; print(mirrorfs.__file__)"], cwd=os.getcwd()),
        "argv": sys.argv,
        "free_page_reporting": os.path.exists("/sys/module/page_reporting"),
        "fio_dir": cfg.fio_dir,
        "fio_reps": cfg.fio_reps,
        "copy_dir": cfg.copy_dir,
        "big_dir": cfg.big_dir,
        "coreutils": out(["cp", "--version"]),
        "loadavg_at_start": os.getloadavg(),
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 256 MiB images, 2 s fio runs, 1 rep")
    ap.add_argument("--only", default="fio,copier,big,wb,mem,nbd",
                    help="comma-separated sections to run (fio,copier,big,wb,mem,nbd)")
    ap.add_argument("--cases", default="",
                    help="comma-separated substrings: run only the fio cases whose name "
                         "contains one (e.g. 'rand write,seq read 1M direct')")
    ap.add_argument("--fio-dir", default="/dev/shm",
                    help="where fio's images live (default /dev/shm: tmpfs)")
    ap.add_argument("--copy-dir", default="/tmp",
                    help="where the copier's images live (default /tmp: the root disk)")
    ap.add_argument("--big-dir", default="/var/tmp",
                    help="where the big copier case's images live: a disk, not tmpfs "
                         "(default /var/tmp)")
    ap.add_argument("--big-gib", type=int,
                    help="the big copier case's image size in GiB (default 8; --quick: 1)")
    ap.add_argument("--big-reps", type=int,
                    help="the big copier case's interleaved repetitions (default 5; --quick: 1)")
    ap.add_argument("--copy-speed", type=int, default=0,
                    help="bytes/s for the during-copy job (default: ~1.5x fio's run)")
    ap.add_argument("--runtime", type=int, help="fio seconds per run (after ramp)")
    ap.add_argument("--reps", type=int, help="copier repetitions (medians are reported)")
    ap.add_argument("--fio-reps", type=int, default=1,
                    help="fio repetitions of each case x target, interleaved (median run "
                         "reported; default 1)")
    ap.add_argument("--out", help="JSON output path (default bench-results/bench-<ts>.json)")
    a = ap.parse_args()
    if a.quick:
        a.fio_size, a.copy_size = 256 * MiB, 256 * MiB
        a.sparse_size, a.sparse_data = 8 * GiB, 64 * MiB
        a.runtime = a.runtime or 2
        a.ramp = 0
        a.reps = a.reps or 1
        a.big_size, a.big_reps = (a.big_gib or 1) * GiB, a.big_reps or 1
    else:
        a.fio_size, a.copy_size = 1 * GiB, 1 * GiB
        a.sparse_size, a.sparse_data = 64 * GiB, 512 * MiB
        a.runtime = a.runtime or 5
        a.ramp = 1
        a.reps = a.reps or 7  # the copier's runs here are fast or slow by luck: more of them
        a.big_size, a.big_reps = (a.big_gib or 8) * GiB, a.big_reps or 5
    a.sections = [x.strip() for x in a.only.split(",") if x.strip()]
    pats = [x.strip() for x in a.cases.split(",") if x.strip()]
    a.fio_cases = [c for c in FIO_CASES if not pats or any(p in c[0] for p in pats)]
    a.wb_cases = [c for c in WB_CASES if not pats or any(p in c[0] for p in pats)]
    bad = set(a.sections) - {"fio", "copier", "big", "wb", "mem", "nbd"}
    if bad:
        ap.error(f"unknown sections: {', '.join(sorted(bad))}")
    return a


def preflight() -> None:
    missing = [x for x in ("fio", "fusermount3", "cp") if not shutil.which(x)]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)} (run ./scripts/setup.sh)")
    if not os.access(MIRRORFS, os.X_OK):
        raise BenchError(f"{MIRRORFS} not found (run ./scripts/setup.sh)")


def main() -> int:
    cfg = parse_args()
    preflight()
    ts = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    results: dict[str, Any] = {"timestamp": ts, "quick": cfg.quick, "env": environment(cfg),
                               "errors": {}}
    reaper = Reaper()

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, on_signal)  # also when started with SIGINT ignored (&)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    t_start = time.monotonic()
    interrupted = False
    try:
        use_own_state_dir(reaper)
        fio_dir = tempfile.mkdtemp(prefix="mirrorfs-bench-", dir=cfg.fio_dir)
        reaper.dirs.append(fio_dir)
        copy_dir = tempfile.mkdtemp(prefix="mirrorfs-bench-", dir=cfg.copy_dir)
        reaper.dirs.append(copy_dir)
        keep_src = None
        for sec in ("fio", "wb", "copier", "big", "mem", "nbd"):  # wb reuses fio's image
            if sec not in cfg.sections:
                continue
            log(f"=== section {sec}")
            t0 = time.monotonic()
            try:
                if sec == "fio":
                    results["fio"] = section_fio(cfg, reaper, fio_dir)
                    keep_src = results["fio"].pop("_keep_copy_src", None)
                elif sec == "wb":
                    results["wb"] = section_wb(cfg, reaper, fio_dir, keep_src)
                elif sec == "copier":
                    results["copier"] = section_copier(cfg, reaper, copy_dir)
                elif sec == "big":
                    results["big"] = section_big(cfg, reaper)
                elif sec == "mem":
                    results["mem"] = section_mem(cfg, reaper, fio_dir)
                elif sec == "nbd":
                    results["nbd"] = section_nbd(cfg, reaper, fio_dir)
                if results.get(sec, {}).get("errors"):
                    results["errors"][sec] = results[sec]["errors"]
            except BenchError as e:
                log(f"section {sec} failed: {e}")
                results["errors"][sec] = str(e)
            except Exception as e:
                log(f"section {sec} failed:\n{traceback.format_exc()}")
                results["errors"][sec] = f"{type(e).__name__}: {e}"
            finally:
                for mnt in list(reaper.mounts):  # nothing outlives its section
                    umount_mirrorfs(reaper, mnt)
                results.setdefault("section_seconds", {})[sec] = round(time.monotonic() - t0, 1)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up")
        results["errors"]["interrupted"] = True
    finally:
        reaper.cleanup()
    results["total_seconds"] = round(time.monotonic() - t_start, 1)
    text, summary = report(results)
    results.update(summary)
    out = cfg.out or os.path.join(REPO, "bench-results", f"bench-{ts}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(text)
    print(f"\ntotal {results['total_seconds']} s; JSON: {out}")
    print(json.dumps(results, default=str, separators=(",", ":")))
    if interrupted:
        return 130
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
