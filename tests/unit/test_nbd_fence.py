"""Issue 16 item 8: a write sent on an NBD connection that was then lost must not land on the
export after a newer write to the same range sent on the next connection.

A scripted server (in this process, on a Unix socket, one in-memory disk shared by its
connections) holds the first write of connection 1 that overlaps ``hold``: it reads the
payload, neither applies nor answers it. The client declares connection 1 lost (io_timeout)
and reconnects. When the server sees connection 1 end, it waits for a write of a later
connection to the held range (at most ``give_up_s``), applies the held write after it, and
closes connection 1 (``close_first``: closes at once, and applies the held write after).

Kernel-free: no mount, no child process."""

import errno
import math
import os
import struct
from pathlib import Path

import pytest
import trio

from mirrorfs.config import MirrorConfig
from mirrorfs.images import FileImage
from mirrorfs.job import State
from mirrorfs.mirror import Mirror
from mirrorfs.nbd import CMD_READ, CMD_WRITE, NBDError, NBDImage
from mirrorfs.params import ErrorPolicy

KiB, MiB = 1 << 10, 1 << 20
_REQ = struct.Struct(">IHHQQI")


class FencedServer:
    """See the module docstring. ``hold_cmd``: which command of connection 1 is held
    (CMD_WRITE, or CMD_READ: held unanswered, nothing to apply)."""

    def __init__(self, size: int, hold: tuple[int, int] = (0, 1), hold_cmd: int = CMD_WRITE,
                 give_up_s: float = 1.5, close_first: bool = False) -> None:
        self.disk = bytearray(size)
        self.size = size
        self.hold, self.hold_cmd = hold, hold_cmd
        self.give_up_s = give_up_s
        self.close_first = close_first
        self.conns = 0
        self.held: tuple[int, bytes] | None = None
        self.holding = trio.Event()  # connection 1 holds a request
        self.release = trio.Event()  # a later connection wrote to the held range (or a test)
        self.held_done = trio.Event()  # the held request was applied (or dropped), conn 1 ended
        self.conn1_closed = trio.Event()  # the server closed connection 1

    async def start(self, nursery: trio.Nursery, path: str, connect_timeout: float = 5.0,
                    io_timeout: float = 0.5) -> NBDImage:
        listener = trio.socket.socket(trio.socket.AF_UNIX)
        await listener.bind(path)
        listener.listen()
        nursery.start_soon(trio.serve_listeners, self.serve, [trio.SocketListener(listener)])
        return await NBDImage.connect(f"nbd+unix:///?socket={path}", nursery,
                                      connect_timeout=connect_timeout, io_timeout=io_timeout)

    def _overlaps_held(self, off: int, n: int) -> bool:
        return self.held is not None and off < self.held[0] + len(self.held[1]) \
            and self.held[0] < off + n

    async def serve(self, stream: trio.SocketStream) -> None:
        self.conns += 1
        k = self.conns

        async def exactly(n: int) -> bytes:
            out = bytearray()
            while len(out) < n:
                data = await stream.receive_some(n - len(out))
                if not data:
                    raise EOFError
                out += data
            return bytes(out)

        await stream.send_all(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))
        await exactly(4)
        while True:
            _, opt, n = struct.unpack(">QII", await exactly(16))
            await exactly(n)
            if opt == 7:  # NBD_OPT_GO: size, HAS_FLAGS | SEND_FLUSH | SEND_WRITE_ZEROES
                info = struct.pack(">HQH", 0, self.size, 1 | 4 | 64)
                await stream.send_all(
                    struct.pack(">QIII", 0x3E889045565A9, 7, 3, len(info)) + info
                    + struct.pack(">QIII", 0x3E889045565A9, 7, 1, 0))
                break
        try:
            while True:
                _, _, cmd, handle, off, n = _REQ.unpack(await exactly(_REQ.size))
                data = await exactly(n) if cmd == CMD_WRITE else b""
                if cmd == 6:  # WRITE_ZEROES
                    data = bytes(n)
                if k == 1 and cmd == self.hold_cmd and not self.holding.is_set() \
                        and off < self.hold[1] and self.hold[0] < off + n:
                    self.held = (off, data)
                    self.holding.set()
                    continue  # neither applied nor answered
                ok = struct.pack(">IIQ", 0x67446698, 0, handle)
                if cmd == CMD_READ:
                    await stream.send_all(ok + bytes(self.disk[off:off + n]))
                    continue
                if cmd == 2:  # NBD_CMD_DISC
                    break
                if data:
                    self.disk[off:off + n] = data
                    if k > 1 and self._overlaps_held(off, n):
                        self.release.set()
                await stream.send_all(ok)
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if k != 1 or not self.holding.is_set():
            await stream.aclose()
            return
        # Connection 1 is over for the client; its held request is still running here.
        if self.close_first:  # qemu-nbd's client_close: shut the socket, finish requests later
            await stream.aclose()
            self.conn1_closed.set()
        with trio.move_on_after(self.give_up_s):
            await self.release.wait()
        if self.held is not None and self.hold_cmd == CMD_WRITE:
            off, data = self.held
            self.disk[off:off + len(data)] = data  # lands now, after what came since
        self.held_done.set()
        if not self.close_first:  # nbdkit: the requests finish, then the socket is closed
            await stream.aclose()
            self.conn1_closed.set()


async def _lost_then_rewritten(server: FencedServer, tmp_path: Path) -> None:
    """Write A at 0 (held, lost with its connection), reconnect, write B at 0, flush."""
    async with trio.open_nursery() as nursery:
        img = await server.start(nursery, str(tmp_path / "s.sock"))
        with pytest.raises(OSError) as e:
            await img.pwrite(b"A" * 4096, 0)
        assert e.value.errno == errno.ECONNRESET
        assert await img.reconnect()
        await img.pwrite(b"B" * 4096, 0)
        await img.flush()
        with trio.fail_after(10):
            await server.held_done.wait()
        await img.close()
        nursery.cancel_scope.cancel()


async def test_a_write_of_a_lost_connection_cannot_land_after_a_newer_one(
        tmp_path: Path) -> None:
    """Proves item 8 on the code before the fence: the reconnect opened connection 2 at
    once, B was written and acknowledged there, and A, still running on the server for
    connection 1, landed after it. With the fence the new connection waits until the server
    has closed connection 1, which it does only once A is done."""
    server = FencedServer(MiB)
    await _lost_then_rewritten(server, tmp_path)
    assert server.conns == 2
    assert bytes(server.disk[:4096]) == b"B" * 4096


@pytest.mark.xfail(strict=True, reason="a server that closes a connection before its "
                   "requests finish (qemu-nbd's client_close) gives the client nothing to "
                   "fence on: see the comment at nbd.py's NBDImage.reconnect")
async def test_a_server_that_closes_before_its_requests_end_is_not_fenced(
        tmp_path: Path) -> None:
    server = FencedServer(MiB, close_first=True)
    await _lost_then_rewritten(server, tmp_path)
    assert bytes(server.disk[:4096]) == b"B" * 4096


async def test_no_reconnect_while_the_old_connection_may_still_write(tmp_path: Path) -> None:
    """The server keeps connection 1 open with the write running: ``reconnect`` gives up
    after connect_timeout, and succeeds once the server has finished and closed it. Closing
    the image meanwhile does not wait for the server."""
    server = FencedServer(MiB, give_up_s=math.inf)
    async with trio.open_nursery() as nursery:
        img = await server.start(nursery, str(tmp_path / "s.sock"), connect_timeout=0.5)
        with pytest.raises(OSError):
            await img.pwrite(b"A" * 4096, 0)
        with trio.fail_after(5), pytest.raises(NBDError) as e:
            await img.reconnect()
        assert e.value.errno == errno.ETIMEDOUT and "may still" in str(e.value)
        assert server.conns == 1 and not img.connected
        server.release.set()  # the server finishes A and closes connection 1
        with trio.fail_after(5):
            assert await img.reconnect()
        await img.pwrite(b"B" * 4096, 0)
        assert bytes(server.disk[:4096]) == b"B" * 4096
        await img.close()

        server2 = FencedServer(MiB, give_up_s=math.inf)
        img2 = await server2.start(nursery, str(tmp_path / "s2.sock"), connect_timeout=0.5)
        with pytest.raises(OSError):
            await img2.pwrite(b"A" * 4096, 0)
        with trio.fail_after(2):
            await img2.close()  # the draining reader of connection 1 ends with it
        nursery.cancel_scope.cancel()


async def test_a_lost_connection_with_no_write_in_flight_reconnects_at_once(
        tmp_path: Path) -> None:
    """Only writes are fenced: a read that timed out leaves nothing that could land."""
    server = FencedServer(MiB, hold_cmd=CMD_READ, give_up_s=math.inf)
    async with trio.open_nursery() as nursery:
        img = await server.start(nursery, str(tmp_path / "s.sock"))
        await img.pwrite(b"C" * 4096, 8192)
        with pytest.raises(OSError):
            await img.pread(4096, 0)
        with trio.fail_after(1):
            assert await img.reconnect()
        assert await img.pread(4096, 8192) == b"C" * 4096
        assert not server.conn1_closed.is_set()  # the server still holds it: no matter
        await img.close()
        nursery.cancel_scope.cancel()


async def test_the_mirror_never_counts_a_range_a_lost_write_may_still_change(
        tmp_path: Path) -> None:
    """The whole job: the copy of the first MiB is held by the server, the guest writes into
    it, connection 1 is lost (ignore policy: the job carries on), the copy is redone on
    connection 2 and the job completes. On the code before the fence the old copy landed
    last: the job said completed, target consistent, while the export's first bytes were
    the source's old ones."""
    size = 2 * MiB
    p = tmp_path / "src.img"
    p.write_bytes(os.urandom(size))
    src = FileImage(str(p), os.open(p, os.O_RDWR))
    server = FencedServer(size)
    cfg = MirrorConfig(granularity=64 * KiB, target_fresh=False,
                       on_target_error=ErrorPolicy.IGNORE, max_backoff_s=0.2)
    try:
        async with trio.open_nursery() as nursery:
            tgt = await server.start(nursery, str(tmp_path / "s.sock"))
            m = Mirror(src, tgt, cfg)
            nursery.start_soon(m.run)
            with trio.fail_after(10):
                await server.holding.wait()
            await m.write(0, b"new guest data" * 300)  # after the held copy read the source
            with trio.fail_after(30):
                while m.job.state is not State.READY:
                    await trio.sleep(0.01)
            m.complete()
            with trio.fail_after(30):
                while not m.job.ended:
                    await trio.sleep(0.01)
                await server.held_done.wait()
            end: State = m.job.state
            assert end is State.COMPLETED and m.job.target_consistent
            assert server.conns >= 2
            assert bytes(server.disk) == p.read_bytes()
            await tgt.close()
            nursery.cancel_scope.cancel()
    finally:
        src.close()
