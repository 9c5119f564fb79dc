"""IMAP keywords are bounded: length, per message, distinct per mailbox; a STORE or
APPEND past a bound is NO [LIMIT] as a whole, counted, nothing half-applied."""

from __future__ import annotations

import re

from test_imap_protocol import Client, setup, tagged

from yimaporc.imap._keywords import DEFAULT_KEYWORD_LIMITS as LIM
from yimaporc.testing.imap_memory import MemoryStore

MSG = b"Subject: k\r\n\r\nbody\r\n"


def kws(prefix: str, n: int, start: int = 0) -> bytes:
    return " ".join(f"{prefix}{i}" for i in range(start, start + n)).encode()


def flags(store: MemoryStore) -> list[set[str]]:
    return [set(m.flags) for m in store.boxes["alice"]["INBOX"].messages]


def selected() -> tuple[MemoryStore, Client]:
    store, factory, _ = setup()
    cl = Client(factory)
    cl.run(b"a LOGIN alice pw\r\nb SELECT INBOX\r\n")
    return store, cl


def test_store_of_too_many_keywords_at_once_is_limit_and_changes_nothing() -> None:
    """STORE 1:* +FLAGS with more keywords than a message may carry: NO [LIMIT], counted,
    no message changed (not the first, not any)."""
    store, cl = selected()
    before = flags(store)
    for mode in (b"+FLAGS", b"FLAGS"):
        out = cl.run(
            b"c STORE 1:* " + mode + b" (\\Flagged " + kws("k", LIM.per_message + 1) + b")\r\n"
        )
        assert tagged(out) == [(b"c", b"NO")] and b"c NO [LIMIT]" in out
        assert b"FETCH" not in out
    assert flags(store) == before
    assert cl.proto.runner.keyword_limit == 2 and cl.proto.runner.failed == 2
    out = cl.run(b"d STORE 1:* +FLAGS (" + kws("k", LIM.per_message) + b")\r\n")
    assert tagged(out) == [(b"d", b"OK")]
    assert all(len([f for f in fs if f[0] != "\\"]) == LIM.per_message for fs in flags(store))


def test_keywords_added_one_command_at_a_time_stop_at_the_message_bound() -> None:
    """Growing a message's keywords command by command stops at the bound; adding ones
    it has (in any case), removing and replacing still work."""
    store, cl = selected()
    for i in range(0, LIM.per_message, 16):
        assert tagged(cl.run(b"c STORE 1 +FLAGS (" + kws("k", 16, i) + b")\r\n")) == [(b"c", b"OK")]
    assert b"c NO [LIMIT]" in cl.run(b"c STORE 1 +FLAGS (extra)\r\n")
    assert tagged(cl.run(b"d STORE 1 +FLAGS (K0 \\Seen)\r\n")) == [(b"d", b"OK")]
    assert tagged(cl.run(b"e STORE 1 -FLAGS (k0 K0)\r\n")) == [(b"e", b"OK")]
    assert tagged(cl.run(b"f STORE 1 +FLAGS (extra)\r\n")) == [(b"f", b"OK")]
    assert b"g NO [LIMIT]" in cl.run(b"g STORE 1 +FLAGS (more)\r\n")
    assert tagged(cl.run(b"h STORE 1 FLAGS (x y)\r\n")) == [(b"h", b"OK")]
    assert flags(store)[0] == {"x", "y"}
    assert cl.proto.runner.keyword_limit == 2


def test_a_keyword_longer_than_the_bound_is_limit() -> None:
    """A keyword of more than ``length`` octets is refused in STORE and APPEND."""
    store, cl = selected()
    long = b"k" * (LIM.length + 1)
    assert b"c NO [LIMIT]" in cl.run(b"c STORE 1 +FLAGS (ok " + long + b")\r\n")
    assert b"d NO [LIMIT]" in cl.run(b"d APPEND INBOX (" + long + b") {5+}\r\nhello\r\n")
    assert len(flags(store)) == 2 and "ok" not in flags(store)[0]
    ok = b"k" * LIM.length
    assert tagged(cl.run(b"e STORE 1 +FLAGS (" + ok + b")\r\n")) == [(b"e", b"OK")]
    assert cl.proto.runner.keyword_limit == 2


def test_mailbox_bound_on_distinct_keywords_and_permanentflags() -> None:
    """PERMANENTFLAGS lists \\* while a new keyword can be made; at the mailbox bound a new
    keyword is NO [LIMIT] (STORE and APPEND to it), keywords it has still go on."""
    store, factory, _ = setup()
    full = LIM.per_mailbox // LIM.per_message
    for n in range(full):
        count = LIM.per_message - (1 if n == full - 1 else 0)  # one short of the bound
        store.deliver("alice", MSG, flags=tuple(f"m{n}k{i}" for i in range(count)))
    cl = Client(factory)
    out = cl.run(b"a LOGIN alice pw\r\nb SELECT INBOX\r\n")
    assert re.search(rb"\[PERMANENTFLAGS \([^)]*\\\*\)\]", out)
    assert tagged(cl.run(b"c STORE 1 +FLAGS (last)\r\n")) == [(b"c", b"OK")]
    assert b"d NO [LIMIT]" in cl.run(b"d STORE 2 +FLAGS (beyond)\r\n")
    assert b"e NO [LIMIT]" in cl.run(b"e APPEND INBOX (beyond) {5+}\r\nhello\r\n")
    assert tagged(cl.run(b"f STORE 2 +FLAGS (LAST m2k0)\r\n")) == [(b"f", b"OK")]
    assert tagged(cl.run(b"g APPEND INBOX (m0k1) {5+}\r\nhello\r\n")) == [(b"g", b"OK")]
    # another mailbox is not this one's bound
    assert tagged(cl.run(b"h APPEND Archive (beyond) {5+}\r\nhello\r\n")) == [(b"h", b"OK")]
    out = cl.run(b"i SELECT INBOX\r\n")
    assert re.search(rb"\[PERMANENTFLAGS \([^)*]*\)\]", out) and b"\\*" not in out
    assert cl.proto.runner.keyword_limit == 2
    assert all("beyond" not in fs for fs in flags(store))


def test_multiappend_with_one_message_past_a_bound_stores_none() -> None:
    """MULTIAPPEND is all or nothing: one message with too many keywords refuses all."""
    store, cl = selected()
    cl.send(b"c APPEND INBOX (a) {5+}\r\nhello (" + kws("k", LIM.per_message + 1) + b") {3+}\r\n")
    out = cl.run(b"bye\r\n")
    assert b"c NO [LIMIT]" in out
    assert len(flags(store)) == 2
