"""UIDPLUS when the backend stored a message but cannot name its UID yet (Porcupine's
"unnumbered" mail, numbered after a partition heals): no APPENDUID/COPYUID naming UID
0 or -1 (RFC 4315 allows only nz-numbers; mbsync records such a UID and loses track
of the pushed message), the plain OK instead, which tells clients to look it up."""

from __future__ import annotations

import re
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from yimaporc.imap._protocol import ImapServerFactory
from yimaporc.imap.interfaces import AppendResult, CopyResult
from yimaporc.testing.imap_memory import (
    MemoryBackend,
    MemorySelected,
    MemorySession,
    MemoryStore,
    SimpleRenderer,
)


def session(data: bytes) -> bytes:
    store = MemoryStore({"alice": "pw"})
    for i in range(3):
        store.deliver("alice", b"Subject: m%d\r\n\r\nbody\r\n" % i)
    backend = MemoryBackend(store, extensions=("MULTIAPPEND",))
    proto = ImapServerFactory(backend, SimpleRenderer(), Clock()).buildProtocol(None)
    t = StringTransport()
    proto.makeConnection(t)
    proto.dataReceived(data)
    return t.value()


@pytest.mark.parametrize("unknown", [0, -1])
def test_append_with_an_unknown_uid_has_no_appenduid(
    monkeypatch: pytest.MonkeyPatch, unknown: int
) -> None:
    """APPEND (single and MULTIAPPEND) whose UID is not known yet answers a plain OK,
    never ``APPENDUID v 0`` or ``-1``; one known UID among unknown ones is not enough."""
    real_append = MemorySession.append
    real_many = MemorySession.append_many

    def append(self: Any, *a: Any) -> Deferred[AppendResult]:
        return real_append(self, *a).addCallback(lambda r: AppendResult(r.uidvalidity, unknown))

    def append_many(self: Any, *a: Any) -> Deferred[list[AppendResult]]:
        def some_unknown(rs: list[AppendResult]) -> list[AppendResult]:
            return [rs[0], *(AppendResult(r.uidvalidity, unknown) for r in rs[1:])]

        return real_many(self, *a).addCallback(some_unknown)

    monkeypatch.setattr(MemorySession, "append", append)
    monkeypatch.setattr(MemorySession, "append_many", append_many)
    out = session(
        b"a LOGIN alice pw\r\n"
        b"b APPEND INBOX {10+}\r\nSubject:\r\n\r\n"
        b"c APPEND INBOX {10+}\r\nSubject:\r\n {10+}\r\nSubject:\r\n\r\n"
    )
    assert re.search(rb"^b OK APPEND completed\r$", out, re.M), out
    assert re.search(rb"^c OK APPEND completed\r$", out, re.M), out
    assert b"APPENDUID" not in out


@pytest.mark.parametrize("command", [b"COPY", b"MOVE"])
def test_copy_with_an_unknown_destination_uid_has_no_copyuid(
    monkeypatch: pytest.MonkeyPatch, command: bytes
) -> None:
    """COPY/MOVE whose new copies are not all numbered yet answers OK without COPYUID
    (never a uid-set with 0 or -1 in it), and the session goes on."""
    real_copy = MemorySelected.copy

    def copy(self: Any, *a: Any) -> Deferred[CopyResult]:
        def unknown(r: CopyResult) -> CopyResult:
            return CopyResult(r.uidvalidity, r.source_uids, (r.dest_uids[0], 0, -1))

        return real_copy(self, *a).addCallback(unknown)

    monkeypatch.setattr(MemorySelected, "copy", copy)
    out = session(
        b"a LOGIN alice pw\r\nb CREATE Keep\r\nc SELECT INBOX\r\nd "
        + command
        + b" 1:3 Keep\r\ne NOOP\r\n"
    )
    assert re.search(rb"^d OK ", out, re.M), out
    assert b"COPYUID" not in out
    assert re.search(rb"^e OK ", out, re.M), out
