"""The relay's receive path: a run of datagrams in one read (UDP GRO).

The nodes send a relayed session's packets to its RTSP node in runs, one
``sendmsg`` with ``UDP_SEGMENT`` each (:mod:`.sendpath`).  Read back one
``recvfrom`` at a time, every datagram of the run costs the relay a system
call and a trip through the reactor's read loop and the protocol.  With
``UDP_GRO`` set on the receiving socket the kernel keeps such a run whole (on
loopback it never splits it; from a NIC it coalesces a flow's datagrams) and one
``recvmsg`` returns the concatenated datagrams with their size in a control
message: :class:`BatchUdpPort` hands them to the protocol in one call,
``datagramsReceived(data, size, addr)`` (``size``-byte datagrams, the last may
be shorter).  Without GRO (an older kernel, another platform) the port reads
one datagram per call as Twisted's does, ``datagramReceived(data, addr)``.

:func:`listen_udp_batched` opens such a port on a POSIX reactor and falls back
to ``reactor.listenUDP`` elsewhere (the simulation kernel, memory reactors).
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any, Protocol

from twisted.internet import udp
from twisted.internet.interfaces import IListeningPort
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from .._reactor import INodeReactor

__all__ = ["SOL_UDP", "UDP_GRO", "BatchUdpPort", "enable_gro", "listen_udp_batched",
           "segment_size"]  # fmt: skip

SOL_UDP = 17
UDP_GRO = 104  # linux/udp.h; the control message carries the segment size (an int)
#: The largest read: a GRO buffer holds up to 64 KB of datagrams.
MAX_READ = 65535
_INT = struct.Struct("=i")  # the control message's int, in the host's byte order
_CMSG_SPACE = socket.CMSG_SPACE(_INT.size)
_NO_DATA = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)
_REFUSED = (errno.ECONNREFUSED,)


class BatchReceiver(Protocol):
    """What :class:`BatchUdpPort` calls (beside ``datagramReceived``)."""

    def datagramsReceived(self, data: bytes, size: int, addr: Any) -> None: ...


def enable_gro(sock: socket.socket) -> bool:
    """Ask the kernel to hand over runs of datagrams whole; False where it cannot."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except (OSError, AttributeError):
        return False
    return True


def segment_size(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    """The datagram size of a GRO read (None: one datagram, or no such message)."""
    for level, kind, value in ancdata:
        if level == SOL_UDP and kind == UDP_GRO:
            n = _INT.unpack_from(value)[0] if len(value) >= _INT.size else 0
            return n or None
    return None


class BatchUdpPort(udp.Port):
    """A UDP port whose reads may return a run of datagrams (see the module doc)."""

    log = Logger()

    def __init__(
        self,
        port: int,
        proto: DatagramProtocol,
        interface: str = "",
        reactor: INodeReactor | None = None,
    ) -> None:
        super().__init__(port, proto, interface, MAX_READ, reactor)
        #: True once the kernel took UDP_GRO on this socket.
        self.gro = False
        #: Reads (system calls that returned data) and the datagrams they carried.
        self.reads = 0
        self.datagrams = 0

    def startListening(self) -> None:
        super().startListening()
        self.gro = enable_gro(self.socket)

    def doRead(self) -> None:
        """Read until the socket is empty (or ``maxThroughput`` bytes), a run per read."""
        read = 0
        batch = getattr(self.protocol, "datagramsReceived", None)
        while read < self.maxThroughput:
            try:
                data, anc, _flags, addr = self.socket.recvmsg(self.maxPacketSize, _CMSG_SPACE)
            except OSError as se:
                no = se.args[0]
                if no in _NO_DATA:
                    return
                if no in _REFUSED:
                    if self._connectedAddr:
                        self.protocol.connectionRefused()
                    return
                raise
            read += len(data)
            self.reads += 1
            size = segment_size(anc) if anc else None
            if self.addressFamily == socket.AF_INET6:
                addr = addr[:2]
            try:
                if size is not None and size < len(data):
                    self.datagrams += -(-len(data) // size)
                    if batch is not None:
                        batch(data, size, addr)
                    else:
                        for at in range(0, len(data), size):
                            self.protocol.datagramReceived(data[at : at + size], addr)
                else:
                    self.datagrams += 1
                    self.protocol.datagramReceived(data, addr)
            except Exception:
                self.log.failure("udp: the protocol failed on a datagram")


def listen_udp_batched(
    reactor: INodeReactor, proto: DatagramProtocol, port: int = 0, interface: str = ""
) -> IListeningPort:
    """A :class:`BatchUdpPort` on a POSIX reactor, else ``reactor.listenUDP``."""
    if isinstance(reactor, PosixReactorBase):
        p = BatchUdpPort(port, proto, interface, reactor)
        p.startListening()
        return p
    listening: IListeningPort = reactor.listenUDP(port, proto, interface=interface)
    return listening
