"""The mirror to an NBD export, without FUSE: a real qemu-nbd, the trio-native client, and the
copier's remote path (source read in a worker thread, ops sent as concurrent tasks)."""

import contextlib
import errno
import os
import random
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from bitarray import bitarray
from helpers import nbd_servers as servers

from mirrorfs.config import MirrorConfig
from mirrorfs.images import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FileImage, fallocate
from mirrorfs.job import State
from mirrorfs.mirror import Mirror
from mirrorfs.nbd import NBDImage, open_nbd
from mirrorfs.params import CopyMode, ErrorPolicy

KiB, MiB = 1 << 10, 1 << 20
qemu_nbd = servers.qemu_nbd


def _source(tmp: Path, size: int) -> FileImage:
    """Random data with an all-zero stretch and a hole in it."""
    p = tmp / "src.img"
    with open(p, "wb") as f:
        f.write(os.urandom(size))
        f.seek(2 * MiB)
        f.write(bytes(MiB))  # allocated zeros: sent as WRITE_ZEROES
    fd = os.open(p, os.O_RDWR)
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 5 * MiB, MiB)  # a hole
    return FileImage(str(p), fd)


def _export(tmp: Path, size: int) -> tuple[Path, Path]:
    """An empty export file of ``size`` bytes, and where its server's socket goes."""
    exp = tmp / "exp.img"
    with open(exp, "wb") as f:
        f.truncate(size)
    return exp, tmp / "nbd.sock"


async def _wait(m: Mirror, *states: State) -> None:
    with trio.fail_after(60):
        while m.job.state not in states:
            await trio.sleep(0.01)


async def _kill_then_finish(
        m: Mirror, server: subprocess.Popen[bytes],
        restart: Callable[[], contextlib.AbstractContextManager[subprocess.Popen[bytes]]],
        while_down: Callable[[], Awaitable[None]]) -> None:
    """SIGKILL the server mid-copy: with the stop policy the job pauses; then restart the
    server, resume at full speed, and complete."""
    server.send_signal(signal.SIGKILL)
    server.wait()
    await _wait(m, State.PAUSED)
    await while_down()
    with restart():
        m.set_speed(0)
        m.resume()
        await _wait(m, State.READY)
        m.complete()
        await _wait(m, State.COMPLETED)


async def test_mirror_to_nbd_with_writes_then_pivot(tmp_path: Path, nbd_tools: None) -> None:
    size = 12 * MiB + 4 * KiB
    src = _source(tmp_path, size)
    exp = tmp_path / "exp.img"
    with open(exp, "wb") as f:
        f.write(os.urandom(size))  # old data everywhere: holes and zeros must be written
    sock = tmp_path / "nbd.sock"
    rnd = random.Random(7)
    with qemu_nbd(exp, tmp_path, sock=sock):
        async with open_nbd(f"nbd+unix:///exp?socket={sock}") as tgt:
            cfg = MirrorConfig(granularity=64 * KiB, target_fresh=False,
                               copy_mode=CopyMode.BACKGROUND)
            m = Mirror(src, tgt, cfg)
            async with trio.open_nursery() as n:
                n.start_soon(m.run)
                for _ in range(200):  # guest writes racing the bulk copy
                    off = rnd.randrange(7 * MiB, size - 70 * KiB)  # zeros, hole kept
                    await m.write(off, os.urandom(rnd.randrange(1, 70 * KiB)))
                    await trio.lowlevel.checkpoint()
                await _wait(m, State.READY)
                m.set_copy_mode(CopyMode.WRITE_BLOCKING)
                for _ in range(50):  # written through to the export before returning
                    off = rnd.randrange(7 * MiB, size - 8 * KiB)
                    await m.write(off, os.urandom(rnd.randrange(1, 8 * KiB)))
                m.complete()
                await _wait(m, State.COMPLETED)
            assert m.serving is tgt and m.zeroed_bytes >= 2 * MiB
            assert await m.read(0, size) == Path(src.path).read_bytes()
            await m.write(100, b"after the pivot")  # goes to the export only
            assert await m.read(100, 15) == b"after the pivot"
            await m.fsync()
    assert Path(exp).read_bytes()[100:115] == b"after the pivot"
    data = bytearray(Path(src.path).read_bytes())
    data[100:115] = b"after the pivot"
    assert Path(exp).read_bytes() == bytes(data)
    src.close()


async def test_server_killed_mid_copy_stop_policy(tmp_path: Path, nbd_tools: None) -> None:
    """A dropped connection is a target error: with ``stop`` the job pauses, nothing is
    lost, and ``resume`` after the server is back reconnects and finishes."""
    size = 8 * MiB
    src = _source(tmp_path, size)
    exp, sock = _export(tmp_path, size)
    cfg = MirrorConfig(granularity=64 * KiB, target_fresh=True, speed=2 * MiB,
                       on_target_error=ErrorPolicy.STOP)
    with qemu_nbd(exp, tmp_path, sock=sock) as server:
        async with open_nbd(f"nbd+unix:///exp?socket={sock}", io_timeout=5) as tgt:
            m = Mirror(src, tgt, cfg)
            async with trio.open_nursery() as n:
                n.start_soon(m.run)
                with trio.fail_after(30):
                    while m.copied_bytes < MiB:
                        await trio.sleep(0.01)


                async def while_down() -> None:
                    assert "writing the target" in (m.job.error or "")
                    await m.write(3 * MiB, b"while the server is down")

                await _kill_then_finish(m, server, lambda: qemu_nbd(exp, tmp_path, sock=sock),
                                        while_down)
    assert Path(exp).read_bytes() == Path(src.path).read_bytes()
    src.close()


async def test_after_the_pivot_a_dropped_connection_is_reopened(tmp_path: Path,
                                                               nbd_tools: None) -> None:
    """The disk is served from the export after ``complete``: a server restart costs the
    guest one reconnect, not every later request; a server that is gone is an I/O error."""
    size = 4 * MiB
    src = _source(tmp_path, 8 * MiB)
    os.ftruncate(src.fd, size)
    src.size = size
    exp, sock = _export(tmp_path, size)
    uri = f"nbd+unix:///exp?socket={sock}"
    with qemu_nbd(exp, tmp_path, sock=sock) as server:
        async with trio.open_nursery() as nursery:
            tgt = await NBDImage.connect(uri, nursery, connect_timeout=5)
            m = Mirror(src, tgt, MirrorConfig(granularity=64 * KiB, target_fresh=True))
            nursery.start_soon(m.run)
            await _wait(m, State.READY)
            m.complete()
            await _wait(m, State.COMPLETED)
            server.kill()
            server.wait()
            with pytest.raises(OSError) as err:
                await m.read(0, 4096)  # no server: the guest sees an error
            assert err.value.errno == errno.EIO
            with qemu_nbd(exp, tmp_path, sock=sock):
                assert await m.read(0, 4096) == Path(src.path).read_bytes()[:4096]
                await m.write(4096, b"to the new connection")
                await m.fsync()
            await tgt.close()
    assert Path(exp).read_bytes()[4096:4117] == b"to the new connection"
    src.close()


async def test_complete_after_the_connection_dropped_while_idle(tmp_path: Path,
                                                             nbd_tools: None) -> None:
    """The server restarts while the job is ready and nothing is dirty: no copy notices.
    ``complete`` flushes the target, and that flush reconnects first (a flush on the dead
    connection would fail the job)."""
    size = 4 * MiB
    src = _source(tmp_path, size)
    exp, sock = _export(tmp_path, size)
    with qemu_nbd(exp, tmp_path, sock=sock) as server:
        async with open_nbd(f"nbd+unix:///exp?socket={sock}", io_timeout=5) as tgt:
            m = Mirror(src, tgt, MirrorConfig(granularity=64 * KiB, target_fresh=True))
            async with trio.open_nursery() as n:
                n.start_soon(m.run)
                await _wait(m, State.READY)
                server.kill()
                server.wait()
                with trio.fail_after(10):  # the reader sees the connection end
                    while tgt.connected:
                        await trio.sleep(0.01)
                with qemu_nbd(exp, tmp_path, sock=sock):
                    m.complete()
                    await _wait(m, State.COMPLETED, State.FAILED)
                    assert m.job.state is State.COMPLETED, m.job.error
    assert Path(exp).read_bytes() == Path(src.path).read_bytes()
    src.close()


async def test_writes_acknowledged_then_lost_in_the_server_cache_are_recopied(
        tmp_path: Path, nbd_tools: None) -> None:
    """A server with a volatile write cache (nbdkit's cache filter in writeback mode) dies
    mid-copy: what it had acknowledged but not flushed is gone. The new connection's flush
    does not cover it, so the mirror copies those extents again (invariant 7)."""
    size = 8 * MiB
    src = _source(tmp_path, size)
    exp, sock = _export(tmp_path, size)

    def server() -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
        return servers.nbdkit(exp, sock, tmp_path, "--filter=cache",
                              plugin_args=("cache=writeback",))

    cfg = MirrorConfig(granularity=64 * KiB, target_fresh=True, speed=2 * MiB,
                       on_target_error=ErrorPolicy.STOP)
    with server() as proc:
        async with open_nbd(f"nbd+unix:///?socket={sock}", io_timeout=5) as tgt:
            assert tgt.can_flush
            m = Mirror(src, tgt, cfg)
            async with trio.open_nursery() as n:
                n.start_soon(m.run)
                with trio.fail_after(30):
                    while m.copied_bytes < 2 * MiB:
                        await trio.sleep(0.01)


                async def while_down() -> None:
                    sock.unlink(missing_ok=True)

                await _kill_then_finish(m, proc, server, while_down)
    assert Path(exp).read_bytes() == Path(src.path).read_bytes()
    src.close()


async def test_stopping_mid_copy_keeps_the_connection(tmp_path: Path, nbd_tools: None) -> None:
    """An unmount cancels the copy loop while batches are being sent: no request is cut in
    half, so the connection survives for the final flush and the clean checkpoint."""
    size = 128 * MiB
    src = _source(tmp_path, size)
    exp, sock = _export(tmp_path, size)
    with qemu_nbd(exp, tmp_path, sock=sock):
        async with open_nbd(f"nbd+unix:///exp?socket={sock}") as tgt:
            m = Mirror(src, tgt, MirrorConfig(granularity=64 * KiB, target_fresh=True))
            async with trio.open_nursery() as n:
                n.start_soon(m.run)
                with trio.fail_after(30):
                    while m.copied_bytes < 16 * MiB:
                        await trio.lowlevel.checkpoint()
                n.cancel_scope.cancel()
            assert tgt.connected
            await tgt.flush()
            dirty = bitarray(m.bitmap.nchunks, endian="little")
            m.bitmap.copy_into(dirty)
    # every chunk not dirty is on the export
    data, out = Path(src.path).read_bytes(), Path(exp).read_bytes()
    g = 64 * KiB
    assert m.copied_bytes >= 16 * MiB
    assert all(data[i * g:(i + 1) * g] == out[i * g:(i + 1) * g]
               for i in range(size // g) if not dirty[i])
    src.close()
