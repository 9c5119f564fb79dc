"""One command's output is bounded in memory: a FETCH of a large mailbox is produced in
batches, and a client that stops reading stops the FETCH (the transport's push-producer
pause), instead of making the node hold the whole answer."""

from __future__ import annotations

import re
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from yimaporc.imap import _fetch
from yimaporc.imap._protocol import ImapServerFactory
from yimaporc.testing.imap_memory import MemoryBackend, MemorySelected, MemoryStore, SimpleRenderer

#: The fake transport pauses its producer beyond this many unread bytes (a TCP
#: transport does the same with its bufferSize).
BUFFER = 64 * 1024


class SlowReaderTransport(StringTransport):
    """A memory transport whose client reads only when told: beyond BUFFER unread
    bytes it pauses the registered producer; read() takes everything and resumes it."""

    peak = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        unread = len(self.io.getvalue())
        self.peak = max(self.peak, unread)
        if unread >= BUFFER and self.producer is not None and self.producerState == "producing":
            self.producer.pauseProducing()
            self.producerState = "paused"

    def read(self) -> bytes:
        out = self.value()
        self.clear()
        if self.producer is not None and self.producerState == "paused":
            self.producerState = "producing"
            self.producer.resumeProducing()
        return out


def _mailbox(count: int, size: int) -> tuple[MemoryStore, ImapServerFactory, Clock]:
    clock = Clock()
    store = MemoryStore({"alice": "pw"})
    body = b"x" * (size - 2) + b"\r\n"
    for i in range(count):
        store.deliver("alice", b"Subject: m%d\r\n\r\n" % i + body)
    return store, ImapServerFactory(MemoryBackend(store), SimpleRenderer(), clock), clock


def _connect(factory: ImapServerFactory) -> tuple[Any, SlowReaderTransport]:
    proto = factory.buildProtocol(None)
    t = SlowReaderTransport()
    proto.makeConnection(t)
    proto.dataReceived(b"a LOGIN alice pw\r\nb SELECT INBOX\r\n")
    assert b"b OK" in t.read()
    return proto, t


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Octets the backend has loaded, per load() call."""
    calls: list[int] = []
    real = MemorySelected.load

    def load(self: MemorySelected, uids: list[int]) -> Any:
        d = real(self, uids)
        return d.addCallback(lambda raws: calls.append(sum(map(len, raws.values()))) or raws)

    monkeypatch.setattr(MemorySelected, "load", load)
    return calls


def test_fetch_of_a_large_mailbox_stops_while_the_client_does_not_read(
    loaded: list[int],
) -> None:
    """FETCH 1:* BODY.PEEK[] of 24 MB with a client that does not read leaves at most one
    batch plus the transport's buffer written and loaded; reading lets it finish, in order."""
    count, size = 48, 512 * 1024
    _, factory, clock = _mailbox(count, size)
    proto, t = _connect(factory)
    proto.dataReceived(b"f FETCH 1:* (BODY.PEEK[])\r\nn NOOP\r\n")
    clock.advance(0)
    bound = BUFFER + _fetch.BATCH_OCTETS + 64 * 1024
    assert t.peak < bound
    assert sum(loaded) <= _fetch.BATCH_OCTETS + size
    assert b"f OK" not in t.value() and b"n OK" not in t.value()
    out = b""
    for _ in range(10 * count):
        out += t.read()
        clock.advance(0)
        if b"n OK" in out:
            break
    assert t.peak < bound
    assert max(loaded) <= _fetch.BATCH_OCTETS
    assert sum(loaded) == count * (size + len(b"Subject: m0\r\n\r\n")) + (count - 10)
    seqs = [int(m) for m in re.findall(rb"^\* (\d+) FETCH ", out, re.M)]
    assert seqs == list(range(1, count + 1))
    assert out.index(b"f OK") < out.index(b"n OK")


def test_flags_fetch_of_many_messages_is_batched_too() -> None:
    """UID FETCH 1:* (FLAGS) of 5,000 messages to a client that does not read stops after
    the transport's buffer plus one batch of BATCH_MESSAGES responses."""
    _, factory, clock = _mailbox(5000, 16)
    proto, t = _connect(factory)
    proto.dataReceived(b"f UID FETCH 1:* (FLAGS)\r\n")
    clock.advance(0)
    sent = t.value().count(b" FETCH (")
    assert 0 < sent < 5000
    assert t.peak < BUFFER + _fetch.BATCH_MESSAGES * 100
    out = b""
    for _ in range(1000):
        out += t.read()
        clock.advance(0)
        if b"f OK" in out:
            break
    assert out.count(b" FETCH (UID ") == 5000


def test_connection_lost_while_a_fetch_waits_for_the_client_ends_it_quietly(
    loaded: list[int],
) -> None:
    """A client gone while its FETCH waits for room ends the FETCH: nothing more is loaded,
    no server error is counted, the session is released."""
    _, factory, clock = _mailbox(40, 256 * 1024)
    proto, _t = _connect(factory)
    proto.dataReceived(b"f FETCH 1:* (BODY.PEEK[])\r\n")
    clock.advance(0)
    before = len(loaded)
    assert proto._writable
    proto.connectionLost()
    clock.advance(0)
    assert len(loaded) == before
    assert proto.runner.server_errors == 0
    assert proto.runner.session is None and proto.runner.mailbox is None


def test_a_client_that_never_reads_is_timed_out() -> None:
    """A FETCH waiting for a client that neither reads nor sends anything for
    idle_timeout ends with BYE and the connection closed (it does not hold its batch and
    its slot forever); one that keeps reading is not timed out meanwhile."""
    clock = Clock()
    store = MemoryStore({"alice": "pw"})
    for i in range(40):
        store.deliver("alice", b"Subject: m%d\r\n\r\n" % i + b"x" * 200_000 + b"\r\n")
    factory = ImapServerFactory(MemoryBackend(store), SimpleRenderer(), clock, idle_timeout=60.0)
    reader, t1 = _connect(factory)
    stuck, t2 = _connect(factory)
    for proto in (reader, stuck):
        proto.dataReceived(b"f FETCH 1:* (BODY.PEEK[])\r\n")
    clock.advance(0)
    got = b""
    for _ in range(18):  # 90 s: the reader reads a batch every 5 s, the other never
        clock.advance(5.0)
        got += t1.read()
        clock.advance(0)
    assert t2.disconnecting and b"* BYE" in t2.value()
    assert b"f OK FETCH completed" in got and not t1.disconnecting
    assert factory.timed_out == 1
