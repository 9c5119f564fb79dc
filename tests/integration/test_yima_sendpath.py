"""The batched send paths on real loopback sockets: the same datagrams from each."""

from __future__ import annotations

import errno
import select
import socket
from typing import Any

import pytest

from yimaporc.yima.sendpath import (
    DatagramSender,
    gso_supported,
    sendmmsg_supported,
)

SIZE = 1340  # a Yima RTP packet: 24-byte header + 7 x 188 bytes


def _pair() -> tuple[socket.socket, socket.socket]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    tx.setblocking(False)
    return rx, tx


def _receive(rx: socket.socket, count: int, timeout: float = 10.0) -> list[bytes]:
    out: list[bytes] = []
    while len(out) < count:
        ready, _, _ = select.select([rx], [], [], timeout)
        if not ready:
            break
        out.append(rx.recv(65536))
    return out


def _batch(n: int, last: int) -> tuple[bytes, list[bytes]]:
    """``n`` full datagrams and a short one, each distinct; the buffer and the list."""
    grams = [bytes((i * 7 + k) & 0xFF for k in range(SIZE)) for i in range(n)]
    grams.append(bytes((255 - k) & 0xFF for k in range(last)))
    return b"".join(grams), grams


def _paths() -> list[str]:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        out = ["sendto"]
        if sendmmsg_supported(probe):
            out.append("sendmmsg")
        if gso_supported(probe):
            out.append("gso")
        return out
    finally:
        probe.close()


@pytest.mark.parametrize("path", ["gso", "sendmmsg", "sendto"])
def test_every_path_puts_the_same_datagrams_on_the_wire(path: str) -> None:
    """Each send path delivers exactly the datagrams cut from the buffer, in order, byte for byte."""
    if path not in _paths():
        pytest.fail(f"this kernel/libc lacks {path}: the node would fall back, test here")
    rx, tx = _pair()
    try:
        buf, grams = _batch(150, 500)
        sender = DatagramSender(tx, path)
        assert sender.path == path
        sender.send_segments(bytearray(buf), SIZE, rx.getsockname())
        sender.send_segments(buf, SIZE, rx.getsockname())  # bytes too
        got = _receive(rx, 2 * len(grams))
        assert got == grams + grams
        assert sender.datagrams == 2 * len(grams)
        assert sender.dropped == 0 and sender.pending == 0
        # System calls per batch of 151: GSO 48 per call, sendmmsg 64, sendto one each.
        expected = {"gso": 2 * 4, "sendmmsg": 2 * 3, "sendto": 2 * 151}[path]
        assert sender.syscalls == expected
    finally:
        rx.close()
        tx.close()


def test_single_datagram_and_exact_multiple() -> None:
    """A lone datagram and a buffer of whole segments (no short tail) go out unchanged on every path."""
    for path in _paths():
        rx, tx = _pair()
        try:
            sender = DatagramSender(tx, path)
            sender.send(b"hello", rx.getsockname())
            grams = [bytes([i]) * SIZE for i in range(3)]
            sender.send_segments(b"".join(grams), SIZE, rx.getsockname())
            assert _receive(rx, 4) == [b"hello", *grams], path
        finally:
            rx.close()
            tx.close()


def test_auto_picks_the_best_path_the_socket_has() -> None:
    """``auto`` resolves to gso where the kernel has it, else sendmmsg, else sendto."""
    rx, tx = _pair()
    try:
        sender = DatagramSender(tx, "auto")
        assert sender.path == _paths()[-1]
    finally:
        rx.close()
        tx.close()


def test_unknown_path_is_refused() -> None:
    """A send path outside auto|gso|sendmmsg|sendto is a ValueError naming the choices."""
    rx, tx = _pair()
    try:
        with pytest.raises(ValueError, match="auto, gso, sendmmsg, sendto"):
            DatagramSender(tx, "splice")
    finally:
        rx.close()
        tx.close()


class _Full:
    """A socket whose buffer fills after ``room`` sendto calls, then empties on demand."""

    family = socket.AF_INET

    def __init__(self, room: int) -> None:
        self.room = room
        self.wire: list[bytes] = []

    def sendto(self, data: Any, addr: Any) -> int:
        if self.room <= 0:
            raise BlockingIOError(errno.EAGAIN, "full")
        self.room -= 1
        self.wire.append(bytes(data))
        return len(data)

    def getsockopt(self, *args: Any) -> int:
        raise OSError(errno.ENOPROTOOPT, "no")

    def fileno(self) -> int:
        return -1


def test_eagain_keeps_the_rest_for_the_next_flush_in_order() -> None:
    """On EAGAIN the unsent datagrams are kept and go first, in order, once the socket drains."""
    sock = _Full(room=3)
    sender = DatagramSender(sock, "sendto")  # type: ignore[arg-type]
    buf, grams = _batch(5, 100)
    sender.send_segments(buf, SIZE, ("127.0.0.1", 9))
    assert sock.wire == grams[:3]
    assert sender.eagain == 1 and sender.pending == len(buf) - 3 * SIZE
    sender.send_segments(b"x" * 10, SIZE, ("127.0.0.1", 9))  # still full: queued behind
    assert sock.wire == grams[:3]
    sock.room = 100
    assert sender.flush()
    assert sock.wire == [*grams, b"x" * 10]
    assert sender.pending == 0 and sender.dropped == 0


def test_pending_overflow_drops_the_oldest_and_counts_them() -> None:
    """Beyond ``max_pending`` bytes kept after EAGAIN, the oldest batches are dropped and counted."""
    sock = _Full(room=0)
    sender = DatagramSender(sock, "sendto", max_pending=4 * SIZE)  # type: ignore[arg-type]
    for _ in range(3):
        sender.send_segments(b"a" * (2 * SIZE), SIZE, ("127.0.0.1", 9))
    assert sender.dropped == 2 and sender.pending == 4 * SIZE
    sock.room = 10
    assert sender.flush()
    assert len(sock.wire) == 4


class _NoSegmentation:
    """A real socket whose GSO sends fail with EIO (a route that cannot segment)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.family = sock.family

    def sendmsg(self, *args: Any) -> int:
        raise OSError(errno.EIO, "no segmentation offload")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_auto_falls_back_when_the_route_refuses_gso() -> None:
    """An ``auto`` sender whose GSO send gets EIO switches path and still delivers every datagram."""
    if "gso" not in _paths():
        pytest.fail("this kernel lacks UDP GSO")
    rx, tx = _pair()
    try:
        sender = DatagramSender(_NoSegmentation(tx), "auto")  # type: ignore[arg-type]
        assert sender.path == "gso"
        buf, grams = _batch(70, 10)
        sender.send_segments(buf, SIZE, rx.getsockname())
        assert sender.path in ("sendmmsg", "sendto")
        assert _receive(rx, len(grams)) == grams
    finally:
        rx.close()
        tx.close()
