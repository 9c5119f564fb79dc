"""Batched datagram sending: many RTP packets per system call.

A delivery tick builds a session's due packets into one buffer of equal-size
datagrams (the last may be shorter) and hands it to a :class:`DatagramSender`,
which sends it by one of three paths:

``gso``
    one ``sendmsg`` per (up to) 64 KiB with a ``UDP_SEGMENT`` control message:
    the kernel cuts the buffer into datagrams (Linux >= 4.18, UDP GSO);
``sendmmsg``
    one ``sendmmsg(2)`` (through ctypes) per (up to) 64 datagrams, each an
    iovec into the same buffer: no copy, no Python object per datagram;
``sendto``
    one ``sendto`` per datagram (any platform).

``auto`` picks ``gso`` when the socket accepts the option, else ``sendmmsg``
when libc has it (IPv4), else ``sendto``; a GSO send the kernel refuses (a
device without segmentation offload answers EIO) switches an ``auto`` sender to
the next path for good.  Every path puts the same bytes on the wire.

The socket is non-blocking (a Twisted ``listenUDP`` port's): when the kernel's
buffer is full (EAGAIN) the rest of the batch is kept and sent first at the
next :meth:`DatagramSender.flush` (every tick calls it), up to
``max_pending`` bytes; beyond that the oldest are dropped and counted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import socket
import struct
from collections import deque
from typing import Any

__all__ = ["SEND_PATHS", "DatagramSender", "gso_supported", "sendmmsg_supported"]

SEND_PATHS = ("auto", "gso", "sendmmsg", "sendto")

SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
#: The kernel's limits: 64 segments per GSO send, and an IP datagram's 64 KiB.
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
MMSG_MAX = 64

#: What a batch may be given as: a writable buffer is sent without a copy.
Buffer = bytes | bytearray | memoryview

_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS)


def gso_supported(sock: socket.socket) -> bool:
    """True when the kernel knows ``UDP_SEGMENT`` for this (UDP) socket."""
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


# --- sendmmsg through ctypes --------------------------------------------------------


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_Iovec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


class _SockaddrIn(ctypes.Structure):
    _fields_ = [
        ("sin_family", ctypes.c_ushort),
        ("sin_port", ctypes.c_uint16),
        ("sin_addr", ctypes.c_uint8 * 4),
        ("sin_zero", ctypes.c_uint8 * 8),
    ]


def _libc_sendmmsg() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fn = libc.sendmmsg
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SENDMMSG = _libc_sendmmsg()


def sendmmsg_supported(sock: socket.socket) -> bool:
    """True when libc has ``sendmmsg`` and the socket is IPv4 (the address we build)."""
    return _SENDMMSG is not None and sock.family == socket.AF_INET


class _Mmsg:
    """Preallocated ``sendmmsg`` arguments: MMSG_MAX messages of one iovec each."""

    def __init__(self) -> None:
        self.iov = (_Iovec * MMSG_MAX)()
        self.msgs = (_Mmsghdr * MMSG_MAX)()
        for i in range(MMSG_MAX):
            hdr = self.msgs[i].msg_hdr
            hdr.msg_iov = ctypes.pointer(self.iov[i])
            hdr.msg_iovlen = 1
        self.addrs: dict[tuple[str, int], _SockaddrIn] = {}

    def address(self, addr: tuple[str, int]) -> _SockaddrIn:
        sa = self.addrs.get(addr)
        if sa is None:
            if len(self.addrs) >= 4096:
                self.addrs.clear()
            sa = _SockaddrIn()
            sa.sin_family = socket.AF_INET
            sa.sin_port = socket.htons(addr[1])
            sa.sin_addr[:] = list(socket.inet_aton(addr[0]))
            self.addrs[addr] = sa
        return sa


class DatagramSender:
    """Sends batches of equal-size datagrams from a buffer (see module doc)."""

    def __init__(
        self, sock: socket.socket, path: str = "auto", *, max_pending: int = 1 << 20
    ) -> None:
        if path not in SEND_PATHS:
            raise ValueError(f"send path must be one of {', '.join(SEND_PATHS)}: {path!r}")
        self.sock = sock
        self.requested = path
        self.path = self._resolve(path)
        self.max_pending = max_pending
        self._pending: deque[tuple[bytes, int, tuple[str, int]]] = deque()
        self._pending_bytes = 0
        self._mmsg = _Mmsg() if self.path == "sendmmsg" or path == "auto" else None
        self._cmsg: dict[int, list[tuple[int, int, bytes]]] = {}
        #: Datagrams handed to the kernel, system calls made, datagrams dropped
        #: (pending overflow or a hard error), EAGAIN answers, other errors.
        self.datagrams = 0
        self.syscalls = 0
        self.dropped = 0
        self.eagain = 0
        self.errors = 0

    def _resolve(self, path: str) -> str:
        if path == "gso" and not gso_supported(self.sock):
            raise ValueError("send path gso: this kernel has no UDP_SEGMENT")
        if path == "sendmmsg" and not sendmmsg_supported(self.sock):
            raise ValueError("send path sendmmsg: no sendmmsg in libc for this socket")
        if path != "auto":
            return path
        if gso_supported(self.sock):
            return "gso"
        if sendmmsg_supported(self.sock):
            return "sendmmsg"
        return "sendto"

    @property
    def pending(self) -> int:
        """Bytes kept after EAGAIN, sent first at the next :meth:`flush`."""
        return self._pending_bytes

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        """One datagram."""
        self.send_segments(data, len(data) or 1, addr)

    def send_segments(self, buf: Buffer, size: int, addr: tuple[str, int]) -> None:
        """Datagrams of ``size`` bytes cut from ``buf`` (the last may be shorter), in order."""
        if self._pending and not self.flush():
            self._keep(bytes(buf), size, addr)
            return
        sent = self._send(buf, size, addr)
        if sent < len(buf):
            self._keep(bytes(buf[sent:]), size, addr)

    def flush(self) -> bool:
        """Send what EAGAIN kept back; True when nothing is left."""
        while self._pending:
            buf, size, addr = self._pending[0]
            sent = self._send(buf, size, addr)
            if sent < len(buf):
                self._pending_bytes -= sent
                self._pending[0] = (buf[sent:], size, addr)
                return False
            self._pending.popleft()
            self._pending_bytes -= len(buf)
        return True

    def _keep(self, buf: bytes, size: int, addr: tuple[str, int]) -> None:
        self._pending.append((buf, size, addr))
        self._pending_bytes += len(buf)
        while self._pending_bytes > self.max_pending and self._pending:
            old, osize, _ = self._pending.popleft()
            self._pending_bytes -= len(old)
            self.dropped += -(-len(old) // osize)

    # --- the paths: each returns how many bytes (whole datagrams) left ------------------

    def _send(self, buf: Buffer, size: int, addr: tuple[str, int]) -> int:
        if self.path == "gso":
            return self._send_gso(buf, size, addr)
        if self.path == "sendmmsg":
            return self._send_mmsg(buf, size, addr)
        return self._send_each(buf, size, addr)

    def _failed(self, exc: OSError, buf_len: int, done: int, size: int) -> int | None:
        """After an error at byte ``done``: None to retry, else the bytes to report
        as handled (EAGAIN: ``done``, the rest is kept; other errors: all, dropped)."""
        if exc.errno == errno.EINTR:
            return None
        if exc.errno in _AGAIN:
            self.eagain += 1
            return done
        if exc.errno == errno.ECONNREFUSED:
            return None  # an earlier datagram's ICMP error, reported now: send again
        self.errors += 1
        self.dropped += -(-(buf_len - done) // size)
        return buf_len

    def _send_each(self, buf: Buffer, size: int, addr: tuple[str, int]) -> int:
        view = memoryview(buf)
        n, at, retries = len(buf), 0, 0
        sendto = self.sock.sendto
        while at < n:
            try:
                sendto(view[at : at + size], addr)
            except OSError as exc:
                got = self._failed(exc, n, at, size)
                if got is None and retries < 3:
                    retries += 1
                    continue
                return n if got is None else got
            self.syscalls += 1
            self.datagrams += 1
            at += size
        return n

    def _send_gso(self, buf: Buffer, size: int, addr: tuple[str, int]) -> int:
        n = len(buf)
        if n <= size:
            return self._send_each(buf, size, addr)
        view = memoryview(buf)
        step = size * max(1, min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size))
        cmsg = self._cmsg.get(size)
        if cmsg is None:
            cmsg = self._cmsg[size] = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
        sendmsg = self.sock.sendmsg
        at, retries = 0, 0
        while at < n:
            chunk = view[at : at + step]
            try:
                if len(chunk) <= size:
                    self.sock.sendto(chunk, addr)
                else:
                    sendmsg([chunk], cmsg, 0, addr)
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT) and (
                    self.requested == "auto"
                ):
                    # The kernel takes the option but this route cannot segment.
                    self.path = "sendmmsg" if sendmmsg_supported(self.sock) else "sendto"
                    if self._mmsg is None:
                        self._mmsg = _Mmsg()
                    return at + self._send(view[at:].tobytes(), size, addr)
                got = self._failed(exc, n, at, size)
                if got is None and retries < 3:
                    retries += 1
                    continue
                return n if got is None else got
            self.syscalls += 1
            self.datagrams += -(-len(chunk) // size)
            at += len(chunk)
        return n

    def _send_mmsg(self, buf: Buffer, size: int, addr: tuple[str, int]) -> int:
        mm = self._mmsg
        assert mm is not None and _SENDMMSG is not None
        n = len(buf)
        if isinstance(buf, bytearray) or (isinstance(buf, memoryview) and not buf.readonly):
            holder: Any = (ctypes.c_char * n).from_buffer(buf) if n else None
            base = ctypes.addressof(holder) if n else 0
        else:
            holder = ctypes.c_char_p(bytes(buf))
            base = ctypes.cast(holder, ctypes.c_void_p).value or 0
        sa = mm.address(addr)
        name, namelen = ctypes.addressof(sa), ctypes.sizeof(sa)
        fd = self.sock.fileno()
        at, retries = 0, 0
        try:
            while at < n:
                count = min(MMSG_MAX, -(-(n - at) // size))
                for i in range(count):
                    off = at + i * size
                    mm.iov[i].iov_base = base + off
                    mm.iov[i].iov_len = min(size, n - off)
                    hdr = mm.msgs[i].msg_hdr
                    hdr.msg_name = name
                    hdr.msg_namelen = namelen
                r = _SENDMMSG(fd, mm.msgs, count, 0)
                if r < 0:
                    e = ctypes.get_errno()
                    got = self._failed(OSError(e, "sendmmsg"), n, at, size)
                    if got is None and retries < 3:
                        retries += 1
                        continue
                    return n if got is None else got
                self.syscalls += 1
                self.datagrams += r
                at = min(n, at + r * size)
        finally:
            del holder  # releases the bytearray's export before it may be resized
        return n
