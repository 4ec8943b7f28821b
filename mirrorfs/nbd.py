"""An NBD client on trio's streams, so that a mirror target can be an export on an NBD server
(qemu-nbd, nbdkit, nbd-server) instead of a local file. ``NBDImage`` offers, as coroutines, the
methods of ``FileImage`` that the mirror uses.

Protocol (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md): fixed newstyle
handshake, optional NBD_OPT_STARTTLS first (``nbds://``: never falls back to clear text), then
NBD_OPT_GO with an NBD_INFO_BLOCK_SIZE request (falls back to NBD_OPT_EXPORT_NAME on servers
without NBD_OPT_GO). Transmission uses simple replies only.

Concurrency. Any number of tasks may call the methods at once (the copier's batches, the
guest's requests); one connection carries all their requests in flight:

- a caller registers its request under a handle (cookie) and writes header + payload to the
  stream under ``_send_lock``, so that requests never interleave on the wire;
- one reader task per connection (in the nursery given to ``connect``) reads every reply,
  finds the request by its handle, reads a read's payload straight into the caller's buffer,
  and sets the request's Event;
- a call larger than the server's maximum block size is split, and its pieces are pipelined
  (up to ``_WINDOW`` in flight). A call that is cancelled while its reads are in flight
  disowns their buffers first: a late reply is read and dropped, never written into memory
  the caller has moved on from.

When the connection breaks (EOF, a stream error, a protocol error, a reply that takes longer
than ``io_timeout``, a send cancelled halfway through a message), the reader fails every
pending request with OSError(ECONNRESET) and every later call fails the same way, until
``reconnect()`` opens a new connection and handshakes again. The caller is expected to treat
failed writes as not done (the mirror marks them dirty again). A failed write may still be
running on the server, though: ``reconnect()`` opens the new connection only once the server
has closed the old one (the fence, see there), so that it cannot land after a newer write.

TLS is ``trio.SSLStream`` over the same TCP or Unix stream, after NBD_OPT_STARTTLS.
"""

import contextlib
import dataclasses
import errno
import math
import os
import re
import ssl
import struct
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator

import trio

from .images import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, ZERO_BLOCK

Buffer = bytes | bytearray | memoryview

# ---------------------------------------------------------------------------------- protocol
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
CLISERV_MAGIC = 0x00420281861253  # oldstyle negotiation
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_STARTTLS = 5
OPT_GO = 7

# option replies
REP_ACK = 1
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR + 1
REP_ERR_POLICY = REP_FLAG_ERROR + 2
REP_ERR_INVALID = REP_FLAG_ERROR + 3
REP_ERR_PLATFORM = REP_FLAG_ERROR + 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR + 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR + 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR + 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR + 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR + 9

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# transmission flags
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_WRITE_ZEROES = 1 << 6

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_WRITE_ZEROES = 6

# error values (they are errno values on Linux)
NBD_ERRORS = {errno.EPERM, errno.EIO, errno.ENOMEM, errno.EINVAL, errno.ENOSPC,
              errno.EOVERFLOW, errno.ENOTSUP, errno.ESHUTDOWN}

DEFAULT_PORT = 10809
DEFAULT_MAX_IO = 32 << 20  # largest READ/WRITE without NBD_INFO_BLOCK_SIZE (2^25)
UNLIMITED_ZERO_STEP = 1 << 30  # WRITE_ZEROES piece when the server states no maximum
_WINDOW = 16  # pieces of one call in flight at once
_EMPTY = memoryview(b"")
_MAX_OPT_REPLY = 1 << 20

_OPT_HDR = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPT_REPLY_HDR = struct.Struct(">QIII")  # magic, option, type, length
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle

_CMD_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_DISC: "disconnect",
              CMD_FLUSH: "flush", CMD_WRITE_ZEROES: "write-zeroes"}
_REP_NAMES = {REP_ERR_UNSUP: "NBD_REP_ERR_UNSUP", REP_ERR_POLICY: "NBD_REP_ERR_POLICY",
              REP_ERR_INVALID: "NBD_REP_ERR_INVALID", REP_ERR_PLATFORM: "NBD_REP_ERR_PLATFORM",
              REP_ERR_TLS_REQD: "NBD_REP_ERR_TLS_REQD", REP_ERR_UNKNOWN: "NBD_REP_ERR_UNKNOWN",
              REP_ERR_SHUTDOWN: "NBD_REP_ERR_SHUTDOWN",
              REP_ERR_BLOCK_SIZE_REQD: "NBD_REP_ERR_BLOCK_SIZE_REQD",
              REP_ERR_TOO_BIG: "NBD_REP_ERR_TOO_BIG"}


class NBDError(OSError):
    """Cannot connect or handshake; ``strerror`` (and ``str()``) is a message for the user."""

    def __str__(self) -> str:
        return str(self.strerror)


class _ProtocolError(OSError):
    def __init__(self, message: str) -> None:
        super().__init__(errno.EPROTO, f"NBD protocol error: {message}")


# ---------------------------------------------------------------------------------- URIs
@dataclasses.dataclass(frozen=True)
class NBDAddress:
    """Where an export is: TCP (``host``, ``port``) or a Unix socket (``socket_path``)."""

    uri: str
    export: str = ""
    tls: bool = False
    host: str | None = None
    port: int = DEFAULT_PORT
    socket_path: str | None = None
    tls_hostname: str | None = None  # certificate name to check (URI tls-hostname=)
    tls_verify: bool = True  # URI tls-verify-peer=0 turns verification off

    def __str__(self) -> str:
        return self.uri

    @property
    def where(self) -> str:
        """The server's address for messages."""
        if self.socket_path is not None:
            return f"unix socket {self.socket_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


_SCHEMES = {"nbd": (False, False), "nbd+tcp": (False, False), "nbds": (True, False),
            "nbds+tcp": (True, False), "nbd+unix": (False, True), "nbds+unix": (True, True)}
_SCHEME_RE = re.compile(r"nbds?(\+[A-Za-z0-9.-]*)?:", re.IGNORECASE)
_URI_FORMS = "nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, or nbds:// / nbds+unix://"


def parse_nbd_uri(text: str) -> NBDAddress | None:
    """The address in an NBD URI; None if ``text`` is not one (e.g. a file name).

    ``nbd://HOST[:PORT]/EXPORT`` (port 10809 by default, the export may be empty),
    ``nbd+unix:///EXPORT?socket=PATH``, and ``nbds://``, ``nbds+unix://`` for TLS. Query
    parameters ``tls-hostname`` and ``tls-verify-peer`` (0/1) are understood for TLS.
    Raises ValueError for a malformed NBD URI."""
    m = _SCHEME_RE.match(text)
    if m is None:
        return None
    scheme = text[:m.end() - 1].lower()

    def bad(why: str) -> ValueError:
        return ValueError(f"invalid NBD URI {text!r}: {why} (expected {_URI_FORMS})")

    if scheme not in _SCHEMES:
        raise bad(f"unsupported scheme {scheme!r}")
    if not text[m.end():].startswith("//"):
        raise bad(f"{scheme}: must be followed by //  (for a file of that name, write ./{text})")
    tls, unix = _SCHEMES[scheme]
    try:
        u = urllib.parse.urlsplit(text)
    except ValueError as e:
        raise bad(str(e)) from None
    try:
        port = u.port
    except ValueError as e:
        raise bad(f"bad port ({e})") from None
    if u.fragment or text.endswith("#"):
        raise bad("a fragment (#...) is not allowed; write # in an export name as %23")
    if u.username is not None or u.password is not None:
        raise bad("user names are not supported")
    try:
        export = urllib.parse.unquote(u.path[1:] if u.path.startswith("/") else u.path,
                                      errors="strict")
        query = urllib.parse.parse_qsl(u.query, keep_blank_values=True, strict_parsing=True,
                                       errors="strict") if u.query else []
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(str(e)) from None
    if "\0" in export:
        raise bad("the export name contains a NUL character")
    if len(export.encode()) > 4096:
        raise bad("the export name is longer than 4096 bytes")
    params: dict[str, str] = {}
    for key, value in query:
        if key in params:
            raise bad(f"parameter {key!r} given twice")
        params[key] = value
    sock = params.pop("socket", None)
    tls_hostname = params.pop("tls-hostname", None)
    verify = params.pop("tls-verify-peer", None)
    tls_type = params.pop("tls-type", None)
    if params:
        raise bad(f"unknown parameter {sorted(params)[0]!r}")
    if not tls and (tls_hostname is not None or verify is not None or tls_type is not None):
        raise bad(f"TLS parameters need a TLS scheme (nbds://, nbds+unix://), not {scheme}://")
    if tls_type is not None and tls_type.lower() != "x509":
        raise bad(f"tls-type={tls_type} is not supported (only x509)")
    if verify is not None and verify not in ("0", "1"):
        raise bad("tls-verify-peer must be 0 or 1")
    if tls_hostname == "":
        raise bad("tls-hostname is empty")
    if unix:
        if u.netloc:
            raise bad(f"{scheme}:// takes no host; write {scheme}:///EXPORT?socket=PATH")
        if not sock:
            raise bad(f"{scheme}:// needs ?socket=PATH")
        return NBDAddress(uri=text, export=export, tls=tls, socket_path=sock,
                          tls_hostname=tls_hostname, tls_verify=verify != "0")
    if sock is not None:
        raise bad(f"socket= is only for nbd+unix:// and nbds+unix://, not {scheme}://")
    if not u.hostname:
        raise bad("no host")
    if port == 0:
        raise bad("port 0")
    return NBDAddress(uri=text, export=export, tls=tls, host=u.hostname,
                      port=DEFAULT_PORT if port is None else port,
                      tls_hostname=tls_hostname, tls_verify=verify != "0")


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    """X.509 credentials for ``nbds://``: the CA that signed the server's certificate (None:
    the system's trust store) and optionally a client certificate and key (servers such as
    qemu-nbd with verify-peer=on, its default, require one)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if self.key is not None and self.cert is None:
            raise ValueError("a TLS client key needs a client certificate")

    def context(self, verify: bool = True) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            if self.ca is not None:
                ctx.load_verify_locations(cafile=self.ca)
            else:
                ctx.load_default_certs()
        except (OSError, ssl.SSLError) as e:
            raise NBDError(errno.EINVAL, f"cannot load the TLS CA certificate {self.ca}: "
                           f"{e.strerror or e}") from None
        if self.cert is not None:
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except (OSError, ssl.SSLError) as e:
                raise NBDError(errno.EINVAL, f"cannot load the TLS client certificate "
                               f"{self.cert} / key {self.key or self.cert}: "
                               f"{e.strerror or e}") from None
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


# ---------------------------------------------------------------------------------- the wire
class _Wire:
    """A trio stream with exact-length reads: what the NBD layers above need."""

    RECV = 256 << 10
    SEND = 256 << 10

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._rest = _EMPTY  # received beyond what was asked for
        self.last_rx = trio.current_time()  # when data last came from the server

    async def send(self, *parts: Buffer, stall_s: float = math.inf) -> None:
        """Write ``parts`` in order. A small payload goes out with its header in one piece;
        a large one is sent from the caller's buffer, not copied, in pieces: a server that
        takes no piece for ``stall_s`` is stuck (TimeoutError), one on a slow link is not."""
        if len(parts) == 2 and len(parts[1]) <= 16 << 10:
            parts = (b"".join(parts),)
        for p in parts:
            view = memoryview(p)
            for pos in range(0, len(view), self.SEND):
                with trio.move_on_after(stall_s) as scope:
                    await self.stream.send_all(view[pos:pos + self.SEND])
                if scope.cancelled_caught:
                    raise TimeoutError(errno.ETIMEDOUT, f"the server took no data for "
                                       f"{stall_s:g} s")

    async def recv_into(self, sink: "memoryview | _Req", n: int) -> None:
        """Receive exactly ``n`` bytes into a buffer, or into a read request's buffer for as
        long as the request owns one: a caller that gave up (cancelled) sets ``buf`` to
        None, and the rest of its payload is read and dropped from then on."""
        pos = 0
        while pos < n:
            if self._rest:
                data: bytes | bytearray | memoryview = self._rest
                self._rest = _EMPTY
            else:
                data = await self.stream.receive_some(self.RECV)
                if not data:
                    raise ConnectionResetError(errno.ECONNRESET,
                                               "the server closed the connection")
                self.last_rx = trio.current_time()  # a long payload still streaming counts
            take = min(len(data), n - pos)
            buf = sink.buf if isinstance(sink, _Req) else sink
            if buf is not None:
                buf[pos:pos + take] = memoryview(data)[:take]
            if take < len(data):  # the next replies: a view, no copy (bytes never change)
                self._rest = memoryview(data)[take:]
            pos += take

    async def recv_bytes(self, n: int) -> bytes:
        buf = bytearray(n)
        await self.recv_into(memoryview(buf), n)
        return bytes(buf)


# ---------------------------------------------------------------------------------- handshake
@dataclasses.dataclass
class _Export:
    size: int
    flags: int
    min_block: int = 1
    max_block: int | None = None  # None: not advertised
    tls_version: str | None = None


async def _send_option(w: _Wire, opt: int, data: bytes = b"") -> None:
    await w.send(_OPT_HDR.pack(IHAVEOPT, opt, len(data)) + data)


async def _option_reply(w: _Wire, opt: int) -> tuple[int, bytes]:
    magic, ropt, rtype, length = _OPT_REPLY_HDR.unpack(
        await w.recv_bytes(_OPT_REPLY_HDR.size))
    if magic != OPT_REPLY_MAGIC:
        raise _ProtocolError(f"bad option reply magic 0x{magic:x}")
    if ropt != opt:
        raise _ProtocolError(f"reply to option {ropt} while waiting for option {opt}")
    if length > _MAX_OPT_REPLY:
        raise _ProtocolError(f"option reply of {length} bytes")
    return rtype, await w.recv_bytes(length) if length else b""


async def _abort(w: _Wire) -> None:
    """Soft disconnect during option haggling (best effort: we are failing anyway)."""
    with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        await _send_option(w, OPT_ABORT)


def _server_says(data: bytes) -> str:
    text = data.decode("utf-8", "replace").strip()
    return f" (server: {text})" if text else ""


def _option_error(addr: NBDAddress, opt: str, rtype: int, data: bytes) -> NBDError:
    name = _REP_NAMES.get(rtype, f"error 0x{rtype:x}")
    says = _server_says(data)
    if rtype == REP_ERR_UNKNOWN:
        return NBDError(errno.ENOENT, f"{addr}: the server at {addr.where} has no export "
                        f"named {addr.export!r}{says}")
    if rtype == REP_ERR_TLS_REQD:
        return NBDError(errno.EACCES, f"{addr}: the server requires TLS{says}; connect "
                        f"with an nbds:// or nbds+unix:// URI")
    if rtype == REP_ERR_SHUTDOWN:
        return NBDError(errno.ESHUTDOWN, f"{addr}: the server is shutting down{says}")
    if rtype == REP_ERR_POLICY:
        return NBDError(errno.EACCES, f"{addr}: the server refused {opt} ({name}){says}")
    return NBDError(errno.EPROTO, f"{addr}: the server refused {opt} ({name}){says}")


async def _negotiate(w: _Wire, addr: NBDAddress, tls_ctx: ssl.SSLContext | None
                     ) -> tuple[_Wire, _Export]:
    """The whole handshake on a connected stream; returns the wire to use from now on
    (TLS after STARTTLS) and what the server said about the export."""
    magic, second = struct.unpack(">QQ", await w.recv_bytes(16))
    if magic != NBDMAGIC:
        raise NBDError(errno.EPROTO, f"{addr}: {addr.where} is not an NBD server")
    if second == CLISERV_MAGIC:
        raise NBDError(errno.EPROTO, f"{addr}: the server speaks the oldstyle NBD handshake, "
                       "which is not supported (use a newstyle server, e.g. qemu-nbd, "
                       "nbdkit, nbd-server >= 3.10)")
    if second != IHAVEOPT:
        raise NBDError(errno.EPROTO, f"{addr}: unexpected NBD greeting 0x{second:x}")
    (hflags,) = struct.unpack(">H", await w.recv_bytes(2))
    fixed = bool(hflags & FLAG_FIXED_NEWSTYLE)
    no_zeroes = bool(hflags & FLAG_NO_ZEROES)
    await w.send(struct.pack(">I", (FLAG_C_FIXED_NEWSTYLE if fixed else 0)
                             | (FLAG_C_NO_ZEROES if no_zeroes else 0)))
    tls_version = None
    if tls_ctx is not None:
        w, tls_version = await _starttls(w, addr, tls_ctx, fixed)
    info = await _go(w, addr) if fixed else None
    if info is None:
        info = await _export_name(w, addr, no_zeroes)
    info.tls_version = tls_version
    return w, info


async def _starttls(w: _Wire, addr: NBDAddress, ctx: ssl.SSLContext,
                    fixed: bool) -> tuple[_Wire, str | None]:
    if not fixed:
        raise NBDError(errno.ENOTSUP, f"{addr}: the server does not support TLS (no fixed "
                       "newstyle handshake); refusing to continue without encryption")
    await _send_option(w, OPT_STARTTLS)
    rtype, data = await _option_reply(w, OPT_STARTTLS)
    if rtype != REP_ACK:
        await _abort(w)
        reason = _REP_NAMES.get(rtype, f"reply 0x{rtype:x}")
        raise NBDError(errno.ENOTSUP, f"{addr}: the server does not offer TLS ({reason})"
                       f"{_server_says(data)}; refusing to continue without encryption")
    tls = trio.SSLStream(w.stream, ctx, server_hostname=addr.tls_hostname or addr.host)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as e:
        cause = e.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise NBDError(errno.EACCES, f"{addr}: TLS: the server's certificate is not "
                           f"trusted: {cause.verify_message or cause}") from None
        raise NBDError(errno.EPROTO, f"{addr}: TLS handshake failed: {cause or e} (does the "
                       "server require a client certificate?)") from None
    return _Wire(tls), tls.version()


async def _go(w: _Wire, addr: NBDAddress) -> _Export | None:
    """NBD_OPT_GO; None if the server does not know it."""
    name = addr.export.encode()
    await _send_option(w, OPT_GO, struct.pack(">I", len(name)) + name
                       + struct.pack(">HH", 1, INFO_BLOCK_SIZE))
    info: _Export | None = None
    block: tuple[int, int, int] | None = None
    while True:
        rtype, data = await _option_reply(w, OPT_GO)
        if rtype == REP_INFO:
            if len(data) < 2:
                raise _ProtocolError("short NBD_REP_INFO")
            (itype,) = struct.unpack(">H", data[:2])
            if itype == INFO_EXPORT:
                if len(data) != 12:
                    raise _ProtocolError(f"NBD_INFO_EXPORT of {len(data)} bytes")
                info = _Export(*struct.unpack(">QH", data[2:]))
            elif itype == INFO_BLOCK_SIZE:
                if len(data) != 14:
                    raise _ProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes")
                block = struct.unpack(">III", data[2:])
        elif rtype == REP_ACK:
            if info is None:
                raise _ProtocolError("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
            if block is not None:
                info.min_block, _preferred, max_block = block
                info.max_block = max_block
                mb = info.min_block
                if mb < 1 or mb & (mb - 1) or mb > 65536 or max_block < mb:
                    raise _ProtocolError(f"bad block sizes {block}")
            return info
        elif rtype == REP_ERR_UNSUP:
            return None
        elif rtype & REP_FLAG_ERROR:
            await _abort(w)
            raise _option_error(addr, "NBD_OPT_GO", rtype, data)
        else:
            raise _ProtocolError(f"unexpected reply {rtype} to NBD_OPT_GO")


async def _export_name(w: _Wire, addr: NBDAddress, no_zeroes: bool) -> _Export:
    await _send_option(w, OPT_EXPORT_NAME, addr.export.encode())
    try:
        data = await w.recv_bytes(10 if no_zeroes else 134)
    except ConnectionResetError:
        raise NBDError(errno.ENOENT, f"{addr}: the server closed the connection after "
                       f"NBD_OPT_EXPORT_NAME: it probably has no export named "
                       f"{addr.export!r}") from None
    size, flags = struct.unpack(">QH", data[:10])
    return _Export(size, flags)


# ---------------------------------------------------------------------------------- connection
class _Req:
    __slots__ = ("acked_before", "buf", "cmd", "err", "event", "exc", "length", "offset",
                 "sent_at")

    def __init__(self, cmd: int, offset: int, length: int, buf: memoryview | None) -> None:
        self.cmd, self.offset, self.length = cmd, offset, length
        self.buf = buf  # where a read's payload goes; None: read and drop it
        self.err = 0  # the server's error value
        self.exc: OSError | None = None  # the connection failed before the reply
        self.event = trio.Event()
        self.acked_before = 0  # a flush: writes acknowledged when it was sent (it covers them)
        self.sent_at = 0.0


_STREAM_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
_FLUSH_FACTOR = 10  # while a FLUSH is outstanding, io_timeout counts this many times
_CLOSE_GRACE_S = 5.0  # how long a graceful close may wait for the pending requests


def _plain(e: BaseException) -> OSError:
    text = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
    return OSError((e.errno if isinstance(e, OSError) else None) or errno.ECONNRESET, text)
_WRITES = (CMD_WRITE, CMD_WRITE_ZEROES)


class _Conn:
    """One handshaken connection in the transmission phase, and its reader task."""

    def __init__(self, w: _Wire, label: str, io_timeout: float | None) -> None:
        self.w = w
        self.label = label
        self.io_timeout = math.inf if io_timeout is None else io_timeout
        self.send_lock = trio.StrictFIFOLock()  # held by whoever writes a message
        self.pending: dict[int, _Req] = {}
        self.next_handle = 1
        self.error: OSError | None = None  # set once (by _plain): why it is unusable
        self.closing = False  # NBD_CMD_DISC sent (or due): no new requests
        self.disc_sent = False
        self.reader_done = trio.Event()
        self.acked_writes = 0  # writes the server acknowledged on this connection
        self.flushed_writes = 0  # ... of which a successful flush covers
        self.flushes = 0  # FLUSH requests awaiting their reply
        self._reader_scope = trio.CancelScope()  # fail() stops the reader through it
        self._sending: trio.CancelScope | None = None  # ... and a send under way
        # The fence (see NBDImage.reconnect). ``in_doubt``: writes were pending when the
        # connection ended, so the server may still be running them. ``settled``: nothing
        # sent on this connection can change the export any more (none in doubt, or the
        # server has closed its end since).
        self.in_doubt = False
        self.settled = trio.Event()

    # -------------------------------------------------------------- state
    @property
    def alive(self) -> bool:
        return self.error is None and not self.closing

    def lost(self) -> OSError:
        why = self.error
        if why is None:
            text = "the server is shutting down" if self.closing else "closed"
        else:
            text = why.strerror or "closed"
        return OSError(errno.ECONNRESET, f"NBD connection to {self.label} lost: {text}")

    def _socket(self) -> trio.socket.SocketType:
        stream = self.w.stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        assert isinstance(stream, trio.SocketStream)
        return stream.socket

    def fail(self, why: BaseException) -> None:
        """Make the connection unusable: the reader is cancelled and fails everything
        pending at once; our sending side is shut, so that the server reads the end of
        the connection (the socket stays open for the fence: see ``read_loop``)."""
        if self.error is None:
            # Keep the message, not the exception: its traceback would hold the frames
            # of the request that failed, and with them views of the guest's data.
            self.error = _plain(why)
        self._reader_scope.cancel()  # no await needed
        if self._sending is not None:
            self._sending.cancel()  # a send blocked on a full socket (SHUT_WR does not wake
            # it on a Unix socket): its request is pending, so the reader fails it
        with contextlib.suppress(OSError):
            self._socket().shutdown(trio.socket.SHUT_WR)

    # -------------------------------------------------------------- requests
    async def submit(self, cmd: int, offset: int, length: int,
                     payload: Buffer | None = None, buf: memoryview | None = None) -> _Req:
        """Send one request. Once this returns, the request completes (reply or failure)
        and ``wait`` must be called; raises only if nothing was sent."""
        req = _Req(cmd, offset, length, buf)
        # No time limit on the queue for the wire: whoever holds it is bounded by the
        # server's progress, and a slow link with many requests queued is not a dead one.
        await self.send_lock.acquire()
        try:
            if self.error is not None or self.closing:
                raise self.lost()
            handle = self.next_handle
            self.next_handle += 1
            self.pending[handle] = req
            req.acked_before = self.acked_writes
            if cmd == CMD_FLUSH:
                self.flushes += 1
            header = _REQUEST.pack(REQUEST_MAGIC, 0, cmd, handle, offset, length)
            try:
                # A message once begun is finished even if the caller is cancelled: half a
                # message would end the connection for every other request on it. A server
                # that stops reading for io_timeout ends it instead, and so does fail().
                with trio.CancelScope(shield=True) as self._sending:
                    if payload is None:
                        await self.w.send(header, stall_s=self.io_timeout)
                    else:
                        await self.w.send(header, payload, stall_s=self.io_timeout)
            except _STREAM_ERRORS as e:  # TimeoutError too
                self.fail(e)  # the reader fails ``req``
            req.sent_at = trio.current_time()  # replies can only come once it is all out
        finally:
            self._sending = None
            self.send_lock.release()
        return req

    async def wait(self, req: _Req) -> OSError | None:
        """The outcome of a submitted request: None on success.

        ``io_timeout`` is a liveness check: the connection is declared lost when the server
        has answered nothing at all for that long while this request waits. While a flush
        is outstanding the limit is ``_FLUSH_FACTOR`` times longer, for every request: a
        server with a large write-back cache may take minutes to flush, and one that answers
        in order sends nothing else meanwhile."""
        try:
            while not req.event.is_set():
                limit = self.io_timeout * (_FLUSH_FACTOR if self.flushes else 1)
                deadline = max(self.w.last_rx, req.sent_at) + limit
                if trio.current_time() < deadline:  # else nothing heard for too long
                    with trio.move_on_at(deadline):
                        await req.event.wait()
                    continue
                req.buf = None
                self.fail(TimeoutError(errno.ETIMEDOUT, f"no reply from the server within "
                                       f"{limit:g} s"))
                await req.event.wait()  # the cancelled reader fails it at once
        except BaseException:
            req.buf = None  # cancelled: a late payload must not land in the caller's buffer
            raise
        if req.exc is not None:
            return req.exc
        if req.err == 0:
            return None
        err = req.err if req.err in NBD_ERRORS else errno.EINVAL
        if err == errno.ESHUTDOWN:
            await self.disconnect()  # the protocol wants a soft disconnect now
        return OSError(err, f"{os.strerror(err)} (NBD {_CMD_NAMES.get(req.cmd, req.cmd)} "
                       f"of {req.length} bytes at {req.offset} on {self.label})")

    async def disconnect(self) -> None:
        """Send NBD_CMD_DISC once; nothing is sent after it."""
        async with self.send_lock:
            if self.error is not None or self.disc_sent:
                return
            self.disc_sent = self.closing = True
            try:
                with trio.move_on_after(min(self.io_timeout, 5.0)):
                    await self.w.send(_REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
            except _STREAM_ERRORS as e:
                self.fail(e)

    async def close(self, graceful: bool) -> None:
        """Disconnect (NBD_CMD_DISC after the pending requests, if ``graceful`` and the
        connection is alive), stop the reader and close the stream."""
        with trio.move_on_after(_CLOSE_GRACE_S) as scope:
            scope.shield = True  # a close must finish even in a cancelled scope
            if graceful and self.alive:
                while self.pending:  # the requests in flight finish first
                    await next(iter(self.pending.values())).event.wait()
                await self.disconnect()
                await self.reader_done.wait()  # the server closes after NBD_CMD_DISC
                with contextlib.suppress(*_STREAM_ERRORS):
                    await self.w.stream.aclose()  # TLS: close_notify
        if self.error is None:
            self.error = ConnectionResetError(errno.ECONNRESET, "closed")
        self.fail(self.error)
        self._socket().close()  # also ends a fence's wait (read_loop): nobody waits for it

    # -------------------------------------------------------------- reader task
    async def read_loop(self) -> None:
        """Read replies until the connection ends; then, if writes were pending, wait for
        the server to close its end (the fence, see NBDImage.reconnect)."""
        try:
            with self._reader_scope:
                await self._read_replies()
            if self.in_doubt and not await self._server_closed():
                return  # no proof: ``settled`` stays unset
            self.settled.set()
        finally:
            self.reader_done.set()

    async def _server_closed(self) -> bool:
        """After the connection failed with writes pending: read (and drop) whatever comes
        until the server closes the connection. True on its EOF or reset; False if our
        own close or another error (e.g. TCP giving up on an unreachable host) ends the
        wait: then nothing says that the server is done with those writes."""
        sock = self._socket()
        with contextlib.suppress(OSError):
            sock.shutdown(trio.socket.SHUT_WR)  # the server must see the end to close
        try:
            while await sock.recv(1 << 16):
                pass
        except (ConnectionResetError, BrokenPipeError):
            return True
        except (OSError, trio.ClosedResourceError):
            return False
        return True

    async def _read_replies(self) -> None:
        w = self.w
        cur: _Req | None = None
        why: BaseException = ConnectionResetError(errno.ECONNRESET, "closed")
        try:
            while True:
                magic, err, handle = _SIMPLE_REPLY.unpack(
                    await w.recv_bytes(_SIMPLE_REPLY.size))
                if magic != SIMPLE_REPLY_MAGIC:
                    what = ("a structured reply" if magic == STRUCTURED_REPLY_MAGIC
                            else f"magic 0x{magic:08x}")
                    raise _ProtocolError(f"unexpected {what} from the server")
                cur = self.pending.pop(handle, None)
                if cur is None:
                    raise _ProtocolError(f"reply for unknown handle {handle}")
                if cur.cmd == CMD_FLUSH:
                    self.flushes -= 1
                if cur.cmd == CMD_READ and err == 0:
                    await w.recv_into(cur, cur.length)
                cur.err = err
                if err == 0 and cur.cmd in _WRITES:
                    self.acked_writes += 1
                elif err == 0 and cur.cmd == CMD_FLUSH:  # even if its caller gave up
                    self.flushed_writes = max(self.flushed_writes, cur.acked_before)
                if err == errno.ESHUTDOWN:
                    self.closing = True
                cur.event.set()
                cur = None
        except Exception as e:  # whatever it is, the connection is over
            why = e
        finally:  # also when cancelled: nobody may wait for ever
            if self.error is None:
                self.error = _plain(why)
            reqs = list(self.pending.values())
            self.pending.clear()
            self.flushes = 0
            if cur is not None:
                reqs.append(cur)
            self.in_doubt = any(r.cmd in _WRITES for r in reqs)
            for r in reqs:
                r.exc = self.lost()  # one each: raised in several tasks, one would gather
                r.event.set()        # all their tracebacks (and the buffers they hold)


async def _connect_stream(addr: NBDAddress) -> trio.SocketStream:
    try:
        if addr.socket_path is not None:
            return await trio.open_unix_socket(addr.socket_path)
        assert addr.host is not None
        return await trio.open_tcp_stream(addr.host, addr.port)  # sets TCP_NODELAY
    except OSError as e:
        raise NBDError(e.errno or errno.ECONNREFUSED,
                       f"{addr}: cannot connect to {addr.where}: {e.strerror or e}") from None


async def _open(addr: NBDAddress, tls: TLSConfig | None, connect_timeout: float,
                io_timeout: float | None, nursery: trio.Nursery) -> tuple[_Conn, _Export]:
    ctx: ssl.SSLContext | None = None
    if addr.tls:
        ctx = (tls or TLSConfig()).context(addr.tls_verify)
        if addr.socket_path is not None and addr.tls_hostname is None:
            # No host name to check over a Unix socket: the certificate must still be signed
            # by the CA, but its name is not checked (tls-hostname= in the URI checks one).
            ctx.check_hostname = False
    stream: trio.SocketStream | None = None
    try:
        with trio.fail_after(connect_timeout):
            stream = await _connect_stream(addr)
            w, info = await _negotiate(_Wire(stream), addr, ctx)
    except trio.TooSlowError:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise NBDError(errno.ETIMEDOUT, f"{addr}: no answer from {addr.where} within "
                       f"{connect_timeout:g} s while connecting") from None
    except NBDError:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise
    except BaseException as e:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        if not isinstance(e, (*_STREAM_ERRORS, ssl.SSLError)):
            raise  # cancelled, KeyboardInterrupt, ...
        cause = e.__cause__ if isinstance(e, trio.BrokenResourceError) else e
        text = (cause.strerror if isinstance(cause, OSError) else None) or cause or e
        raise NBDError(getattr(cause, "errno", None) or errno.EPROTO,
                       f"{addr}: NBD handshake with {addr.where} failed: {text}") from None
    if not info.flags & TFLAG_HAS_FLAGS:
        info.flags = 0
    conn = _Conn(w, addr.uri, io_timeout)
    nursery.start_soon(conn.read_loop, name=f"nbd-reader {addr.uri}")
    return conn, info


def _down(x: int, a: int) -> int:
    return x - x % a


def _up(x: int, a: int) -> int:
    return -(-x // a) * a


# ---------------------------------------------------------------------------------- image
@contextlib.asynccontextmanager
async def open_nbd(addr: "NBDAddress | str", tls: TLSConfig | None = None,
                   connect_timeout: float = 30.0, io_timeout: float | None = 60.0
                   ) -> AsyncIterator["NBDImage"]:
    """``NBDImage.connect`` with a nursery of its own for the reader task; closes on exit."""
    try:
        async with trio.open_nursery() as nursery:
            img = await NBDImage.connect(addr, nursery, tls, connect_timeout, io_timeout)
            try:
                yield img
            finally:
                await img.close()
    except BaseExceptionGroup as group:
        # The reader task keeps its errors to itself: a lone error is the caller's own
        # (or connect's), and it comes out as itself, not wrapped in a group.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


class NBDImage:
    """An NBD export with the interface of ``FileImage`` (see images.py), as coroutines.

    Any number of tasks may call at once; see the module docstring. Errors are OSError: the
    server's error value (EIO, ENOSPC, ...) or ECONNRESET once the connection is lost
    (until ``reconnect()``)."""

    is_block = False
    fd = -1  # no file descriptor: fstat, locks and identity() do not apply

    def __init__(self, addr: NBDAddress, tls: TLSConfig | None, timeout: float,
                 io_timeout: float | None, nursery: trio.Nursery, conn: _Conn,
                 info: _Export) -> None:
        self.addr = addr
        self.path = addr.uri
        self.size = info.size
        self._tls = tls
        self._timeout = timeout
        self._io_timeout = io_timeout
        self._nursery = nursery
        self._conn = conn
        self._reconnect_lock = trio.Lock()
        self._rmw_lock = trio.Lock()  # read-modify-write of partial minimum blocks
        self._closed = False
        self._lost_writes = False  # acknowledged, unflushed writes died with a connection
        # Counts connections: whoever wrote through one can tell that it was replaced.
        self.generation = 0
        self._set_export(info)

    def _set_export(self, info: _Export) -> None:
        self.read_only = bool(info.flags & TFLAG_READ_ONLY)
        self.can_flush = bool(info.flags & TFLAG_SEND_FLUSH)
        self.can_zero = bool(info.flags & TFLAG_SEND_WRITE_ZEROES)
        self._zero_ok = True  # until the server refuses a WRITE_ZEROES
        self.tls_version = info.tls_version
        mb = self.min_block = info.min_block
        self.max_block = info.max_block
        io = DEFAULT_MAX_IO if info.max_block is None else min(info.max_block, DEFAULT_MAX_IO)
        self._max_io = max(mb, _down(io, mb))
        zero = UNLIMITED_ZERO_STEP if info.max_block in (None, 0xFFFFFFFF) else info.max_block
        self._zero_step = max(mb, _down(min(zero, UNLIMITED_ZERO_STEP), mb))
        self._zero_write_step = max(mb, _down(min(len(ZERO_BLOCK), self._max_io), mb))

    @classmethod
    async def connect(cls, addr: "NBDAddress | str", nursery: trio.Nursery,
                      tls: TLSConfig | None = None, connect_timeout: float = 30.0,
                      io_timeout: float | None = 60.0) -> "NBDImage":
        """Connect and handshake; the reader task runs in ``nursery``. ``connect_timeout``
        bounds the connect and the handshake; ``io_timeout`` (None: none) bounds the wait for
        each reply: past it the connection is declared lost. ``tls`` is used for nbds://
        addresses (None there: the system's CA store, no client certificate). Raises
        NBDError (an OSError) with a message."""
        if isinstance(addr, str):
            parsed = parse_nbd_uri(addr)
            if parsed is None:
                raise ValueError(f"{addr!r} is not an NBD URI")
            addr = parsed
        conn, info = await _open(addr, tls, connect_timeout, io_timeout, nursery)
        return cls(addr, tls, connect_timeout, io_timeout, nursery, conn, info)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self.connected else "lost"
        return f"<NBDImage {self.path} size={self.size} {state}>"

    # ------------------------------------------------------------------ connection
    @property
    def connected(self) -> bool:
        return not self._closed and self._conn.alive

    async def reconnect(self) -> bool:
        """Open a new connection if the current one is lost; False if it was alive and
        nothing was done. Safe to call from several tasks that
        all saw the same failure: one reconnects, the others find it alive. Raises NBDError
        if the server cannot be reached or the export's size changed."""
        async with self._reconnect_lock:
            old = self._conn
            self._live()  # a closed image stays closed
            if old.alive:
                return False
            await self._fence(old)
            conn, info = await _open(self.addr, self._tls, self._timeout, self._io_timeout,
                                     self._nursery)
            if info.size != self.size:
                await conn.close(graceful=True)
                raise NBDError(errno.EIO, f"{self.path}: the export now has {info.size} "
                               f"bytes, it had {self.size}: refusing to reconnect")
            if old.acked_writes > old.flushed_writes and self.can_flush:
                # Writes the old connection had acknowledged may still have been only in
                # the server's cache: if it restarted, they are gone. A new connection's
                # flush does not vouch for them, so the next flush says so (as fsync
                # reports a lost write-back once).
                self._lost_writes = True
            self._set_export(info)
            self._conn = conn
            self.generation += 1
        await old.close(graceful=True)
        return True

    # The fence (issue 16 item 8, proved by tests/unit/test_nbd_fence.py). A write that
    # failed because its connection was lost (io_timeout on a slow server, a protocol
    # error) may still be running on the server. Before the fence, reconnect() opened the
    # next connection at once: a newer write to the same range, sent and acknowledged
    # there, could be overtaken by the old one, and the mirror counted the range as equal
    # (a clean bit, then "completed") while the export held the older data.
    #
    # Now no request goes out on a new connection while a write of the old one may still
    # land: when writes were pending at the loss, reconnect() first waits until the server
    # has closed the old connection (we shut our sending side, so that it reads the end;
    # its EOF or reset is the sign), for at most connect_timeout, then raises, and the next
    # call waits again. Writes that failed are the caller's to redo (the mirror marks them
    # dirty), and a redo can then only land after them. A loss with no write pending
    # (reads, flushes, an idle connection) reconnects at once.
    #
    # The assumption: a server closes a connection only once the requests it read on it
    # are done (or will never be done). nbdkit does (its worker threads are joined before
    # the socket is closed), and so does a server process that died (restarted, killed).
    # qemu-nbd does NOT: its client_close() shuts the socket down at once and lets the
    # requests already in its block layer finish afterwards, so there a write can land
    # after the EOF. No NBD request can fence that from the client (a flush on the new
    # connection does not wait for another connection's writes): whether a later write
    # of the same range lands after it is then up to qemu's block layer and the storage
    # below (test_a_server_that_closes_before_its_requests_end_is_not_fenced shows the
    # gap); there the fence only makes the new connection wait until qemu has seen the
    # old one end.
    # If the wait for the server's close ends without it (TCP gave up on the host), the
    # export's content is in doubt for good: reconnect() refuses from then on.
    async def _fence(self, old: _Conn) -> None:
        """Wait until no write of ``old`` (a lost connection) can still land (see above);
        NBDError if that is not known within connect_timeout."""
        with trio.move_on_after(self._timeout):
            await old.reader_done.wait()
        if old.settled.is_set():
            return
        if old.reader_done.is_set():
            raise NBDError(errno.EIO, f"{self.path}: writes sent on a lost connection may "
                           f"still change the export, and {self.addr.where} cannot tell "
                           "us when they are done: not reconnecting")
        raise NBDError(errno.ETIMEDOUT, f"{self.path}: writes sent on the lost connection "
                       f"may still be running: {self.addr.where} has not closed it within "
                       f"{self._timeout:g} s; not reconnecting before it does")

    async def close(self) -> None:
        """NBD_CMD_DISC (after the pending requests), then close. Idempotent."""
        async with self._reconnect_lock:
            if self._closed:
                return
            self._closed = True
        await self._conn.close(graceful=True)

    def _live(self) -> _Conn:
        if self._closed:
            raise OSError(errno.EBADF, f"{self.path}: the NBD connection is closed")
        return self._conn

    # ------------------------------------------------------------------ requests
    async def _run(self, cmd: int, offset: int, length: int, step: int,
                   data: memoryview | None = None, buf: memoryview | None = None,
                   zeros: bool = False) -> None:
        """[offset, offset + length) in pieces of ``step``, pipelined; waits for every
        piece it sent, then raises the first error."""
        conn = self._live()
        inflight: deque[_Req] = deque()
        first: OSError | None = None
        pos = 0
        try:
            while pos < length and first is None:
                if len(inflight) >= _WINDOW:
                    first = await conn.wait(inflight.popleft())
                    if first is not None:
                        break
                n = min(step, length - pos)
                payload: Buffer | None = None
                if data is not None:
                    payload = data[pos:pos + n]
                elif zeros:
                    payload = memoryview(ZERO_BLOCK)[:n]
                try:
                    inflight.append(await conn.submit(
                        cmd, offset + pos, n, payload,
                        None if buf is None else buf[pos:pos + n]))
                except OSError as e:
                    first = e
                pos += n
            while inflight:  # always: a read's reply must not land after we return
                err = await conn.wait(inflight.popleft())
                first = first or err
        except BaseException:
            for r in inflight:  # cancelled: disown the buffers of what is still in flight
                r.buf = None
            raise
        if first is not None:
            raise first

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise OSError(errno.EINVAL, f"{self.path}: negative offset or length")

    # ------------------------------------------------------------------ data
    async def pread_into(self, buf: memoryview, offset: int) -> int:
        """Fill ``buf`` from ``offset``; bytes past the end of the export read as zeros.
        Returns the bytes read from the export."""
        n = len(buf)
        self._check(offset, n)
        avail = max(0, min(n, self.size - offset))
        if avail < n:
            buf[avail:] = bytes(n - avail)
        if avail:
            await self._read(buf[:avail], offset)
        return avail

    async def pread(self, length: int, offset: int) -> bytes:
        self._check(offset, length)
        n = max(0, min(length, self.size - offset))
        out = bytearray(n)
        if n:
            await self._read(memoryview(out), offset)
        return bytes(out)

    async def _read(self, buf: memoryview, offset: int) -> None:
        mb, n = self.min_block, len(buf)
        if mb == 1 or (offset % mb == 0 and n % mb == 0):
            await self._run(CMD_READ, offset, n, self._max_io, buf=buf)
            return
        lo, hi = _down(offset, mb), min(_up(offset + n, mb), self.size)
        a, b = min(_up(offset, mb), offset + n), max(_down(offset + n, mb), offset)
        if a >= b:  # within at most two minimum blocks
            tmp = bytearray(hi - lo)
            await self._run(CMD_READ, lo, hi - lo, self._max_io, buf=memoryview(tmp))
            buf[:] = tmp[offset - lo:offset - lo + n]
            return
        if offset < a:
            tmp = bytearray(mb)
            await self._run(CMD_READ, a - mb, mb, mb, buf=memoryview(tmp))
            buf[:a - offset] = tmp[mb - (a - offset):]
        await self._run(CMD_READ, a, b - a, self._max_io, buf=buf[a - offset:b - offset])
        if b < offset + n:
            tmp = bytearray(hi - b)
            await self._run(CMD_READ, b, hi - b, self._max_io, buf=memoryview(tmp))
            buf[b - offset:] = tmp[:offset + n - b]

    async def pwrite(self, data: bytes | memoryview, offset: int) -> int:
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        self._check(offset, n)
        if offset + n > self.size:
            raise OSError(errno.ENOSPC, f"{self.path}: write of {n} bytes at {offset} "
                          f"beyond the end of the export ({self.size} bytes)")
        if n:
            await self._write(mv, offset)
        return n

    async def _write(self, mv: memoryview | None, offset: int,
                     length: int | None = None) -> None:
        """Write ``mv`` (or zeros when ``mv`` is None) at ``offset``, honouring the server's
        minimum block size with read-modify-write of partial blocks."""
        n = len(mv) if mv is not None else (length or 0)
        mb = self.min_block
        a, b = _up(offset, mb), _down(offset + n, mb)
        if mb == 1 or (a == offset and b == offset + n):
            await self._write_aligned(mv, offset, n)
            return
        if a >= b:  # no whole block inside: patch the one or two blocks around it
            await self._rmw(_down(offset, mb), min(_up(offset + n, mb), self.size), mv,
                            offset, n)
            return
        if offset < a:
            await self._rmw(a - mb, a, None if mv is None else mv[:a - offset], offset,
                            a - offset)
        await self._write_aligned(None if mv is None else mv[a - offset:b - offset], a,
                                  b - a)
        if b < offset + n:
            await self._rmw(b, min(b + mb, self.size), None if mv is None else
                            mv[b - offset:], b, offset + n - b)

    async def _rmw(self, lo: int, hi: int, mv: memoryview | None, offset: int,
                   n: int) -> None:
        async with self._rmw_lock:  # two partial writes to one block must not lose each other
            tmp = bytearray(hi - lo)
            await self._run(CMD_READ, lo, hi - lo, self._max_io, buf=memoryview(tmp))
            tmp[offset - lo:offset - lo + n] = bytes(n) if mv is None else mv
            await self._run(CMD_WRITE, lo, hi - lo, self._max_io, data=memoryview(tmp))

    async def _write_aligned(self, mv: memoryview | None, offset: int, n: int) -> None:
        if mv is not None:
            await self._run(CMD_WRITE, offset, n, self._max_io, data=mv)
            return
        if self.zeroes_cheaply:
            try:
                # NBD_CMD_FLAG_NO_HOLE unset: the server may punch a hole, and must make
                # the range read as zeros.
                await self._run(CMD_WRITE_ZEROES, offset, n, self._zero_step)
                return
            except OSError as e:
                if e.errno not in (errno.ENOTSUP, errno.EINVAL):
                    raise
                self._zero_ok = False  # write zero data from now on
        await self._run(CMD_WRITE, offset, n, self._zero_write_step, zeros=True)

    @property
    def zeroes_cheaply(self) -> bool:
        """NBD_CMD_WRITE_ZEROES works here (else zeros go over the wire as data)."""
        return self.can_zero and self._zero_ok

    async def write_zeroes(self, offset: int, length: int) -> None:
        """Make [offset, offset + length) read as zeros: NBD_CMD_WRITE_ZEROES where the
        server offers it (it may punch holes), else zero data in 1 MiB requests."""
        self._check(offset, 0)
        length = min(length, self.size - offset)
        if length > 0:
            await self._write(None, offset, length)

    async def fallocate(self, mode: int, offset: int, length: int) -> None:
        """A guest's fallocate(2): punch-hole and zero-range zero the range; a plain
        allocation changes no content and is a no-op (NBD cannot reserve space)."""
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise OSError(errno.EOPNOTSUPP, f"{self.path}: fallocate mode 0x{mode:x} is not "
                          "supported on an NBD export")
        if offset < 0 or length <= 0:
            raise OSError(errno.EINVAL, f"{self.path}: bad fallocate range")
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            await self.write_zeroes(offset, length)

    def forget_lost_writes(self) -> None:
        """The caller has seen ``generation`` change and dealt with the writes it made
        through the lost connection: the next flush need not fail for them."""
        self._lost_writes = False

    async def flush(self) -> None:
        """NBD_CMD_FLUSH: every write answered before it is on stable storage. A no-op on a
        server without NBD_FLAG_SEND_FLUSH (it has no volatile cache to flush). Fails once
        with EIO if writes acknowledged on an earlier, lost connection were never flushed."""
        if self._lost_writes:
            self._lost_writes = False
            raise OSError(errno.EIO, f"{self.path}: writes acknowledged on a lost connection "
                          "were never flushed: they may be lost")
        if self.can_flush:
            conn = self._live()
            e = await conn.wait(await conn.submit(CMD_FLUSH, 0, 0))
            if e is not None:
                raise e
