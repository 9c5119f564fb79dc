"""The relay's receive path: a node's run of datagrams in one read (UDP GRO).

Real loopback sockets on 127.0.170.1 (this suite's own address), read by calling
``doRead`` directly (a memory reactor holds the port, nothing runs it): a run the
sender passed to the kernel in one ``sendmsg`` with ``UDP_SEGMENT`` is on the
receiving socket before ``sendmsg`` returns, so what one read brings is exact.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactorClock

from yimaporc.testing.yima import UdpClock
from yimaporc.yima.recvpath import (
    SOL_UDP,
    UDP_GRO,
    BatchUdpPort,
    listen_udp_batched,
    segment_size,
)

HOST = "127.0.170.1"
UDP_SEGMENT = 103


class _Recorder(DatagramProtocol):
    def __init__(self) -> None:
        self.single: list[bytes] = []
        self.runs: list[tuple[bytes, int]] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.single.append(data)

    def datagramsReceived(self, data: bytes, size: int, addr: Any) -> None:
        self.runs.append((data, size))


class _SingleOnly(DatagramProtocol):
    def __init__(self) -> None:
        self.single: list[bytes] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.single.append(data)


@pytest.fixture
def sender() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    yield s
    s.close()


def _listen(proto: DatagramProtocol) -> BatchUdpPort:
    port = BatchUdpPort(0, proto, HOST, MemoryReactorClock())
    port.startListening()
    return port


def _datagrams(count: int, size: int, last: int) -> list[bytes]:
    out = [bytes([i]) * size for i in range(count)]
    return [*out, b"z" * last] if last else out


def _send_run(tx: socket.socket, parts: list[bytes], size: int, to: Any) -> None:
    tx.sendmsg([b"".join(parts)], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0, to)


def test_a_gso_run_arrives_in_one_read_and_one_call(sender: socket.socket) -> None:
    """Six datagrams sent as one GSO run (the last shorter) come out of one read, handed
    to the protocol in one datagramsReceived call with their size; the port counts one
    read and six datagrams."""
    proto = _Recorder()
    port = _listen(proto)
    try:
        assert port.gro, "this kernel takes UDP_GRO (Linux >= 5.0)"
        parts = _datagrams(5, 1328, 100)
        _send_run(sender, parts, 1328, (HOST, port.getHost().port))
        port.doRead()
        assert proto.single == []
        assert proto.runs == [(b"".join(parts), 1328)]
        assert (port.reads, port.datagrams) == (1, 6)
    finally:
        port.stopListening()


def test_plain_datagrams_arrive_one_per_read(sender: socket.socket) -> None:
    """Datagrams sent one by one stay one per read and per datagramReceived call."""
    proto = _Recorder()
    port = _listen(proto)
    try:
        for d in (b"one", b"two", b"three"):
            sender.sendto(d, (HOST, port.getHost().port))
        port.doRead()
        assert proto.single == [b"one", b"two", b"three"] and proto.runs == []
        assert (port.reads, port.datagrams) == (3, 3)
    finally:
        port.stopListening()


def test_a_protocol_without_the_batch_method_gets_every_datagram(sender: socket.socket) -> None:
    """A plain DatagramProtocol under a GRO socket still gets each datagram of a run on
    its own, in order."""
    proto = _SingleOnly()
    port = _listen(proto)
    try:
        parts = _datagrams(3, 500, 7)
        _send_run(sender, parts, 500, (HOST, port.getHost().port))
        port.doRead()
        assert proto.single == parts
        assert (port.reads, port.datagrams) == (1, 4)
    finally:
        port.stopListening()


def test_segment_size_reads_the_gro_control_message_only() -> None:
    """The size comes from the SOL_UDP/UDP_GRO message (host-order int); other or
    empty messages mean one datagram."""
    assert segment_size([(SOL_UDP, UDP_GRO, struct.pack("=i", 1328))]) == 1328
    assert segment_size([(socket.SOL_SOCKET, UDP_GRO, struct.pack("=i", 1328))]) is None
    assert segment_size([(SOL_UDP, UDP_GRO, b"")]) is None
    assert segment_size([]) is None


def test_off_a_posix_reactor_the_port_is_the_reactors_own() -> None:
    """listen_udp_batched falls back to reactor.listenUDP (simulation, memory reactors)."""
    clock = UdpClock()
    proto = _Recorder()
    port = listen_udp_batched(clock, proto, interface=HOST)
    assert not isinstance(port, BatchUdpPort)
    assert clock.protocols[port.getHost().port] is proto
