"""mirrorfs.nbd against real NBD servers (qemu-nbd, nbdkit: helpers/nbd_servers.py) on
loopback TCP and Unix sockets, with and without TLS. Every server is a child process killed
in a ``finally``. The client is async: the tests run under pytest-trio (trio_mode). What
needs no server (URIs, a scripted fake server) is in tests/unit/test_nbd.py."""

import errno
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest
import trio
from helpers.nbd_servers import free_port, make_image, nbdkit, qemu_nbd, qemu_tls_args

from mirrorfs.images import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
from mirrorfs.nbd import NBDError, NBDImage, TLSConfig, open_nbd

MiB = 1 << 20


# ------------------------------------------------------------------------------ basics
async def connect_error(uri: str, tls: TLSConfig | None = None) -> NBDError:
    """The NBDError with which ``NBDImage.connect`` fails (it must fail)."""
    async with trio.open_nursery() as nursery:
        with pytest.raises(NBDError) as e:
            await NBDImage.connect(uri, nursery, tls)
    return e.value


async def exit_status(proc: subprocess.Popen[bytes]) -> int:
    """Wait (polling, without blocking trio) for ``proc`` to exit; its status."""
    while proc.poll() is None:
        await trio.sleep(0.01)
    return proc.returncode


async def test_qemu_nbd_tcp(tmp_path: Path, nbd_tools: None) -> None:
    img_path = tmp_path / "t.img"
    model = make_image(img_path, 8 * MiB)
    port = free_port()
    with qemu_nbd(img_path, tmp_path, port=port):
        async with open_nbd(f"nbd://127.0.0.1:{port}/exp") as img:
            assert img.size == 8 * MiB and img.path == f"nbd://127.0.0.1:{port}/exp"
            assert img.is_block is False and img.fd == -1
            assert img.can_flush and img.can_zero and not img.read_only
            assert img.max_block == 32 * MiB and img.tls_version is None
            assert await img.pread(100, 5) == model[5:105]
            data = random.randbytes(3 * MiB + 17)
            assert await img.pwrite(data, 1234) == len(data)
            model[1234:1234 + len(data)] = data
            buf = bytearray(2 * MiB)
            assert await img.pread_into(memoryview(buf), 1000) == 2 * MiB
            assert buf == model[1000:1000 + 2 * MiB]
            # past the end: short pread, zero-filled pread_into, refused pwrite
            assert await img.pread(MiB, 8 * MiB - 10) == model[-10:]
            assert await img.pread(10, 8 * MiB) == b""
            buf = bytearray(b"x" * 30)
            assert await img.pread_into(memoryview(buf), 8 * MiB - 10) == 10
            assert buf == model[-10:] + bytes(20)
            with pytest.raises(OSError) as e:
                await img.pwrite(b"abc", 8 * MiB - 2)
            assert e.value.errno == errno.ENOSPC
            await img.flush()
        assert img_path.read_bytes() == model
        with pytest.raises(OSError) as e:
            await img.pread(1, 0)
        assert e.value.errno == errno.EBADF


async def test_nbdkit_unix_odd_size(tmp_path: Path, nbd_tools: None) -> None:
    img_path, sock = tmp_path / "t.img", tmp_path / "k.sock"
    size = 3 * MiB + 123
    model = make_image(img_path, size)
    with nbdkit(img_path, sock, tmp_path):
        async with open_nbd(f"nbd+unix:///?socket={sock}") as img:
            assert img.size == size and img.can_flush and img.max_block is None
            tail = random.randbytes(1000)
            await img.pwrite(tail, size - 1000)
            model[-1000:] = tail
            assert await img.pread(5000, size - 4000) == model[-4000:]
            await img.flush()
    assert img_path.read_bytes() == model


async def test_concurrent_tasks(tmp_path: Path, nbd_tools: None) -> None:
    """8 tasks of random preads and pwrites (each task in its own interleaved slots), all in
    flight at once on one connection; then the backing file must equal the model byte for
    byte."""
    img_path, sock = tmp_path / "t.img", tmp_path / "q.sock"
    slot, ntasks = 256 << 10, 8
    model = make_image(img_path, 64 * slot)
    errors: list[Exception] = []
    with qemu_nbd(img_path, tmp_path, sock=sock):
        async with open_nbd(f"nbd+unix:///exp?socket={sock}") as img:

            async def worker(t: int) -> None:
                rnd = random.Random(t)
                try:
                    for _ in range(60):
                        s = rnd.randrange(t, 64, ntasks) * slot
                        off = s + rnd.randrange(slot)
                        n = rnd.randrange(1, s + slot - off + 1)
                        op = rnd.random()
                        if op < 0.45:
                            data = rnd.randbytes(n)
                            await img.pwrite(data, off)
                            model[off:off + n] = data
                        elif op < 0.55:
                            await img.write_zeroes(off, n)
                            model[off:off + n] = bytes(n)
                        else:
                            assert await img.pread(n, off) == model[off:off + n]
                except Exception as e:
                    errors.append(e)

            async with trio.open_nursery() as nursery:
                for t in range(ntasks):
                    nursery.start_soon(worker, t)
            await img.flush()
    assert not errors, errors
    assert img_path.read_bytes() == model


async def test_write_zeroes_and_fallocate(tmp_path: Path, nbd_tools: None) -> None:
    img_path, sock = tmp_path / "t.img", tmp_path / "q.sock"
    model = make_image(img_path, 16 * MiB)
    blocks_before = img_path.stat().st_blocks
    with qemu_nbd(img_path, tmp_path, sock=sock):
        async with open_nbd(f"nbd+unix:///exp?socket={sock}") as img:
            await img.write_zeroes(MiB, 4 * MiB)
            model[MiB:5 * MiB] = bytes(4 * MiB)
            assert await img.pread(4 * MiB, MiB) == bytes(4 * MiB)
            await img.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 6 * MiB + 100, 5000)
            model[6 * MiB + 100:6 * MiB + 5100] = bytes(5000)
            await img.fallocate(FALLOC_FL_ZERO_RANGE, 7 * MiB, 70000)
            model[7 * MiB:7 * MiB + 70000] = bytes(70000)
            await img.fallocate(0, 8 * MiB, MiB)  # plain allocation: content unchanged
            await img.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 16 * MiB - 10, MiB)
            model[-10:] = bytes(10)  # clamped at the end of the export
            with pytest.raises(OSError) as e:
                await img.fallocate(0x08, 0, 4096)  # FALLOC_FL_COLLAPSE_RANGE
            assert e.value.errno == errno.EOPNOTSUPP
            assert await img.pread(16 * MiB, 0) == model
            await img.flush()
    assert img_path.read_bytes() == model
    # NBD_CMD_FLAG_NO_HOLE is not set, so qemu-nbd --discard=unmap punched holes
    assert img_path.stat().st_blocks <= blocks_before - (3 * MiB) // 512


async def test_requests_larger_than_max_block(tmp_path: Path, nbd_tools: None) -> None:
    img_path, sock = tmp_path / "t.img", tmp_path / "q.sock"
    model = make_image(img_path, 80 * MiB, data=False)
    with qemu_nbd(img_path, tmp_path, sock=sock):
        async with open_nbd(f"nbd+unix:///exp?socket={sock}") as img:
            assert img.max_block == 32 * MiB
            data = random.randbytes(70 * MiB + 3)
            await img.pwrite(data, 5 * MiB + 7)
            model[5 * MiB + 7:75 * MiB + 10] = data
            assert await img.pread(80 * MiB, 0) == model
            await img.write_zeroes(2 * MiB, 70 * MiB)
            model[2 * MiB:72 * MiB] = bytes(70 * MiB)
            assert await img.pread(80 * MiB, 0) == model
            await img.flush()
    assert img_path.read_bytes() == model


async def test_block_size_constraints_and_no_write_zeroes(tmp_path: Path,
                                                          nbd_tools: None) -> None:
    """A server that enforces a 4 KiB minimum and 64 KiB maximum (EINVAL otherwise) and
    offers no NBD_CMD_WRITE_ZEROES: unaligned I/O goes through read-modify-write, large I/O
    is split, zeroing writes zero data; concurrent partial writes to shared blocks keep
    every byte."""
    img_path, sock = tmp_path / "t.img", tmp_path / "k.sock"
    model = make_image(img_path, 4 * MiB)
    with nbdkit(img_path, sock, tmp_path, "--filter=blocksize-policy", "--filter=nozero",
                plugin_args=("blocksize-minimum=4096", "blocksize-maximum=65536",
                             "blocksize-error-policy=error", "zeromode=none")):
        async with open_nbd(f"nbd+unix:///?socket={sock}") as img:
            assert (img.min_block, img.max_block, img.can_zero) == (4096, 65536, False)
            for off, n in ((1000, 100), (4000, 200), (10000, 300000), (65536, MiB)):
                data = random.randbytes(n)
                await img.pwrite(data, off)
                model[off:off + n] = data
                assert await img.pread(n + 10, off - 5) == model[off - 5:off + n + 5]
            await img.write_zeroes(3 * MiB + 77, 200000)
            model[3 * MiB + 77:3 * MiB + 200077] = bytes(200000)
            errors: list[Exception] = []

            async def worker(t: int) -> None:  # 8 tasks, 512-byte pieces of the same blocks
                try:
                    for i in range(16):
                        off = 2 * MiB + i * 4096 + t * 512 + 3
                        data = bytes([t + 1]) * 500
                        await img.pwrite(data, off)
                        model[off:off + 500] = data
                except Exception as e:
                    errors.append(e)

            async with trio.open_nursery() as nursery:
                for t in range(8):
                    nursery.start_soon(worker, t)
            assert not errors, errors
            assert await img.pread(4 * MiB, 0) == model
    assert img_path.read_bytes() == model


async def test_server_errors_map_to_errno(tmp_path: Path, nbd_tools: None) -> None:
    img_path, sock = tmp_path / "t.img", tmp_path / "k.sock"
    model = make_image(img_path, MiB)
    with nbdkit(img_path, sock, tmp_path, "--filter=error",
                plugin_args=("error=EIO", "error-pwrite-rate=100%")):
        async with open_nbd(f"nbd+unix:///?socket={sock}") as img:
            with pytest.raises(OSError) as e:
                await img.pwrite(b"x" * 4096, 0)
            assert e.value.errno == errno.EIO and "NBD write" in str(e.value)
            assert img.connected and await img.pread(4096, 0) == model[:4096]  # still usable
    os.unlink(sock)
    with nbdkit(img_path, sock, tmp_path, "-r"):
        async with open_nbd(f"nbd+unix:///?socket={sock}") as img:
            assert img.read_only
            with pytest.raises(OSError) as e:
                await img.pwrite(b"x", 0)
            assert e.value.errno == errno.EPERM
    os.unlink(sock)
    # ESHUTDOWN: the client disconnects; the connection must be re-opened
    with nbdkit(img_path, sock, tmp_path, "--filter=error",
                plugin_args=("error=ESHUTDOWN", "error-pwrite-rate=100%")):
        async with open_nbd(f"nbd+unix:///?socket={sock}") as img:
            with pytest.raises(OSError) as e:
                await img.pwrite(b"x", 0)
            assert e.value.errno == errno.ESHUTDOWN
            assert not img.connected
            with pytest.raises(OSError) as e:
                await img.pread(1, 0)
            assert e.value.errno == errno.ECONNRESET
            assert await img.reconnect() and await img.pread(10, 0) == model[:10]


async def test_unknown_export_and_no_server(tmp_path: Path, nbd_tools: None) -> None:
    img_path = tmp_path / "t.img"
    make_image(img_path, MiB, data=False)
    port = free_port()
    with qemu_nbd(img_path, tmp_path, port=port):
        e = await connect_error(f"nbd://127.0.0.1:{port}/nope")
        assert e.errno == errno.ENOENT
        assert "no export named 'nope'" in str(e)
    e = await connect_error(f"nbd://127.0.0.1:{port}/exp")
    assert e.errno == errno.ECONNREFUSED and "cannot connect" in str(e)
    e = await connect_error(f"nbd+unix:///exp?socket={tmp_path}/missing.sock")
    assert e.errno == errno.ENOENT and "missing.sock" in str(e)


async def test_close_sends_disconnect(tmp_path: Path, nbd_tools: None) -> None:
    """A non-persistent qemu-nbd exits (status 0) when its only client sends NBD_CMD_DISC."""
    img_path, sock = tmp_path / "t.img", tmp_path / "q.sock"
    make_image(img_path, MiB, data=False)
    with qemu_nbd(img_path, tmp_path, sock=sock, persistent=False) as proc:
        async with trio.open_nursery() as nursery:
            img = await NBDImage.connect(f"nbd+unix:///exp?socket={sock}", nursery)
            await img.pwrite(b"hello", 0)
            await img.close()
            await img.close()  # idempotent
        with trio.fail_after(10):
            assert await exit_status(proc) == 0
    assert img_path.read_bytes()[:5] == b"hello"


# ------------------------------------------------------------------------------ TLS
async def test_tls_qemu_nbd_tcp(tmp_path: Path, pki: Path) -> None:
    img_path = tmp_path / "t.img"
    model = make_image(img_path, 8 * MiB)
    port = free_port()
    uri = f"nbds://127.0.0.1:{port}/exp"
    creds = TLSConfig(ca=str(pki / "ca-cert.pem"), cert=str(pki / "client-cert.pem"),
                      key=str(pki / "client-key.pem"))
    with qemu_nbd(img_path, tmp_path, port=port, extra=qemu_tls_args(pki)) as server:
        async with open_nbd(uri, creds) as img:
            assert img.tls_version in ("TLSv1.2", "TLSv1.3") and img.size == 8 * MiB
            errors: list[Exception] = []

            async def worker(t: int) -> None:  # TLS from several tasks at once
                try:
                    for i in range(8):
                        off = (t * 8 + i) * (256 << 10) + 11
                        data = random.randbytes(200000)
                        await img.pwrite(data, off)
                        model[off:off + len(data)] = data
                        assert await img.pread(len(data), off) == data
                except Exception as e:
                    errors.append(e)

            async with trio.open_nursery() as nursery:
                for t in range(4):
                    nursery.start_soon(worker, t)
            assert not errors, errors
            big = random.randbytes(5 * MiB)
            await img.pwrite(big, MiB)
            model[MiB:6 * MiB] = big
            assert await img.pread(8 * MiB, 0) == model
            await img.flush()
        assert img_path.read_bytes() == model
        # the same server without TLS, with the wrong CA, without a client certificate
        e = await connect_error(f"nbd://127.0.0.1:{port}/exp")
        assert e.errno == errno.EACCES and "requires TLS" in str(e)
        e = await connect_error(uri, TLSConfig(ca=str(pki / "other-ca-cert.pem"),
                                               cert=creds.cert, key=creds.key))
        assert "certificate is not trusted" in str(e)
        e = await connect_error(uri, TLSConfig(ca=creds.ca))
        assert "handshake" in str(e)
        assert server.poll() is None
    e = await connect_error(uri, TLSConfig(ca=str(tmp_path / "missing.pem")))
    assert "CA certificate" in str(e)


async def test_tls_nbdkit_unix(tmp_path: Path, pki: Path) -> None:
    img_path, sock = tmp_path / "t.img", tmp_path / "k.sock"
    model = make_image(img_path, 2 * MiB)
    creds = TLSConfig(ca=str(pki / "ca-cert.pem"))
    with nbdkit(img_path, sock, tmp_path, "--tls=require", f"--tls-certificates={pki}"):
        # no host name over a Unix socket: the chain is verified, the name is not
        async with open_nbd(f"nbds+unix:///?socket={sock}", creds) as img:
            assert img.tls_version is not None
            await img.pwrite(b"secret" * 1000, 4096)
            model[4096:10096] = b"secret" * 1000
            assert await img.pread(2 * MiB, 0) == model
        async with open_nbd(f"nbds+unix:///?socket={sock}&tls-hostname=localhost",
                            creds) as img:
            assert await img.pread(10, 4096) == b"secretsecr"
        e = await connect_error(f"nbds+unix:///?socket={sock}&tls-hostname=wrong.example",
                                creds)
        assert "not trusted" in str(e) and "wrong.example" in str(e)
        e = await connect_error(f"nbd+unix:///?socket={sock}")
        assert "requires TLS" in str(e)
    assert img_path.read_bytes() == model


async def test_tls_refused_by_plain_servers(tmp_path: Path, pki: Path) -> None:
    """nbds:// to a server without TLS fails: never a silent fallback to clear text."""
    img_path, sock = tmp_path / "t.img", tmp_path / "k.sock"
    make_image(img_path, MiB, data=False)
    creds = TLSConfig(ca=str(pki / "ca-cert.pem"))
    port = free_port()
    with qemu_nbd(img_path, tmp_path, port=port), nbdkit(img_path, sock, tmp_path):
        for uri in (f"nbds://127.0.0.1:{port}/exp", f"nbds+unix:///?socket={sock}"):
            e = await connect_error(uri, creds)
            assert e.errno == errno.ENOTSUP
            assert "does not offer TLS" in str(e) and "without encryption" in str(e)


# ------------------------------------------------------------------------------ failures
async def test_server_killed_then_reconnect(tmp_path: Path, nbd_tools: None) -> None:
    img_path, sock = tmp_path / "t.img", tmp_path / "q.sock"
    make_image(img_path, 16 * MiB, data=False)
    uri = f"nbd+unix:///exp?socket={sock}"
    failures: list[Exception] = []
    async with trio.open_nursery() as nursery:  # the readers of every connection
        with qemu_nbd(img_path, tmp_path, sock=sock) as proc:
            img = await NBDImage.connect(uri, nursery)

            async def writer(t: int) -> None:
                data = bytes([t + 1]) * (256 << 10)
                try:
                    while True:
                        await img.pwrite(data, t * 4 * MiB)
                        await img.pread(256 << 10, t * 4 * MiB)
                except Exception as e:
                    failures.append(e)

            with trio.move_on_after(10) as join:
                async with trio.open_nursery() as writers:
                    for t in range(4):
                        writers.start_soon(writer, t)
                    await trio.sleep(0.3)
                    os.kill(proc.pid, signal.SIGKILL)
            assert not join.cancelled_caught  # every writer stopped on its error
            assert len(failures) == 4
            assert all(isinstance(e, OSError) and e.errno == errno.ECONNRESET
                       for e in failures)
        try:
            assert not img.connected
            with pytest.raises(OSError) as e:
                await img.pread(1, 0)
            assert e.value.errno == errno.ECONNRESET and "lost" in str(e.value)
            with pytest.raises(NBDError):  # the server is still down
                await img.reconnect()
            assert not img.connected
            os.unlink(sock)
            with qemu_nbd(img_path, tmp_path, sock=sock):
                assert await img.reconnect() is True
                assert await img.reconnect() is False  # alive: nothing to do
                data = random.randbytes(3 * MiB)
                await img.pwrite(data, 5 * MiB)
                assert await img.pread(3 * MiB, 5 * MiB) == data
                # the writers' acknowledged writes died unflushed with the first server:
                # the first flush says so, once (as fsync reports a lost write-back)
                with pytest.raises(OSError) as e:
                    await img.flush()
                assert e.value.errno == errno.EIO and "lost connection" in str(e.value)
                await img.flush()
                await img.close()
            assert img_path.read_bytes()[5 * MiB:8 * MiB] == data
        finally:
            await img.close()


async def test_io_timeout(tmp_path: Path, nbd_tools: None) -> None:
    img_path, sock = tmp_path / "t.img", tmp_path / "k.sock"
    make_image(img_path, MiB)
    with nbdkit(img_path, sock, tmp_path, "--filter=delay", plugin_args=("delay-read=3",)):
        async with open_nbd(f"nbd+unix:///?socket={sock}", io_timeout=0.3) as img:
            await img.pwrite(b"ok", 0)  # writes are not delayed
            with trio.fail_after(2), pytest.raises(OSError) as e:  # not the 3 s of the delay
                await img.pread(10, 0)
            assert e.value.errno == errno.ECONNRESET and "no reply" in str(e.value)
            assert not img.connected
            assert await img.reconnect()
            await img.pwrite(b"ok again", 0)
    assert img_path.read_bytes()[:8] == b"ok again"
