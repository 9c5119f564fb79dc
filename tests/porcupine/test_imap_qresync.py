"""CONDSTORE/QRESYNC through the IMAP shell over Porcupine's store and over the in-memory
reference backend: one scripted resync, the same transcript from both (MODSEQ values
aside, which only have to order)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from mailtest_helpers import ImmediateReactor, SyncPool, fast_hash, result_of
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from yimaporc.imap import ImapServerFactory
from yimaporc.porcupine.service import MailService
from yimaporc.porcupine.throttle import ThrottlePolicy
from yimaporc.testing.imap_memory import MemoryBackend, MemoryStore, SimpleRenderer

MSGS = [f"From: b@example.org\r\nSubject: m{i}\r\n\r\nbody {i}\r\n".encode() for i in range(5)]


class Client:
    """One connection over a StringTransport; every command completes synchronously."""

    def __init__(self, factory: object) -> None:
        self.proto = factory.buildProtocol(None)  # type: ignore[attr-defined]
        self.t = StringTransport()
        self.proto.makeConnection(self.t)
        self.t.clear()

    def run(self, line: str) -> str:
        self.proto.dataReceived(line.encode() + b"\r\n")
        out: bytes = self.t.value()
        self.t.clear()
        return out.decode()


def porcupine(tmp_path: Path) -> Callable[[], Client]:
    svc = MailService(
        ImmediateReactor(),
        node_id="n1",
        data_dir=tmp_path,
        domain="example.org",
        threadpool=SyncPool(),  # type: ignore[arg-type]
        auth_throttle=ThrottlePolicy(delay=0.0, max_delay=0.0),
    )
    svc.profiles._hash = fast_hash  # type: ignore[method-assign]
    result_of(svc.replicator.add("alice@example.org", "pw", 1))
    for raw in MSGS:
        result_of(svc.delivery.deliver(["alice@example.org"], raw))
    return lambda: Client(svc.factories["imap"])


def memory(tmp_path: Path) -> Callable[[], Client]:
    store = MemoryStore({"alice": "pw"})
    for raw in MSGS:
        store.deliver("alice", raw)
    factory = ImapServerFactory(MemoryBackend(store), SimpleRenderer(), Clock())
    return lambda: Client(factory)


def number(out: str, code: str) -> int:
    m = re.search(rf"\[{code} (\d+)\]", out)
    assert m, out
    return int(m.group(1))


def modseqs(out: str) -> dict[int, int]:
    """UID -> MODSEQ of the FETCH responses in ``out``."""
    return {int(u): int(m) for u, m in re.findall(r"FETCH \(UID (\d+) .*?MODSEQ \((\d+)\)", out)}


def resync(connect: Callable[[], Client]) -> list[str]:
    """A mobile client's day: it sees HIGHESTMODSEQ, another session flags, expunges and
    stores conditionally, the client comes back with QRESYNC; the lines it gets, with
    MODSEQ values checked against each other and then masked."""
    seen: list[str] = []
    other = connect()
    other.run("o LOGIN alice pw")
    other.run("o SELECT INBOX")
    other.run("o STORE 1 +FLAGS.SILENT (\\Deleted)")
    other.run("o EXPUNGE")  # UID 1 goes before the client's modseq: not reported

    client = connect()
    client.run("a LOGIN alice pw")
    seen.append(client.run("a ENABLE QRESYNC"))
    out = client.run("b SELECT INBOX")
    h1, validity = number(out, "HIGHESTMODSEQ"), number(out, "UIDVALIDITY")
    seen.append(client.run("c LOGOUT"))

    other.run("o STORE 2 +FLAGS (\\Flagged)")  # UID 3
    other.run("o STORE 3 +FLAGS.SILENT (\\Deleted)")  # UID 4
    other.run("o EXPUNGE")
    out = other.run(f"o UID STORE 3,5 (UNCHANGEDSINCE {h1}) +FLAGS (\\Answered)")
    seen.append(re.sub(r"MODSEQ \(\d+\)", "MODSEQ (n)", out))

    client = connect()
    client.run("a LOGIN alice pw")
    client.run("a ENABLE QRESYNC")
    out = client.run(f"b SELECT INBOX (QRESYNC ({validity} {h1} 1:5))")
    h2 = number(out, "HIGHESTMODSEQ")
    changed = modseqs(out)
    assert h2 > h1 and changed and all(m > h1 for m in changed.values()), out
    seen.append(re.sub(r"(MODSEQ \(|HIGHESTMODSEQ |UIDVALIDITY )\d+", r"\1n", out))
    out = client.run(f"c UID FETCH 1:* (FLAGS) (CHANGEDSINCE {h1} VANISHED)")
    assert all(m > h1 for m in modseqs(out).values())
    seen.append(re.sub(r"MODSEQ \(\d+\)", "MODSEQ (n)", out))
    out = client.run(f"d UID FETCH 1:* (FLAGS) (CHANGEDSINCE {max(changed.values())})")
    seen.append(out)
    out = client.run(f"s UID SEARCH MODSEQ {h1 + 1}")
    assert f"(MODSEQ {max(changed.values())})" in out, out
    seen.append(out)
    seen.append(client.run(f"s UID SEARCH RETURN (COUNT) MODSEQ {h1 + 1}"))
    # the other session sees the client's expunge as VANISHED once QRESYNC is on
    other.run("o ENABLE QRESYNC")
    client.run("e UID STORE 5 +FLAGS.SILENT (\\Deleted)")
    client.run("f UID EXPUNGE 5")
    seen.append(re.sub(r"MODSEQ \(\d+\)", "MODSEQ (n)", other.run("o NOOP")))
    seen.append(client.run("g EXAMINE INBOX"))
    return [re.sub(r"(HIGHESTMODSEQ |UIDVALIDITY |MODSEQ \(|MODSEQ )\d+", r"\1n", x) for x in seen]


WANT_SELECT = [
    "* VANISHED (EARLIER) 4",
    "* 2 FETCH (UID 3 FLAGS (\\Flagged) MODSEQ (n))",
    "* 3 FETCH (UID 5 FLAGS (\\Answered) MODSEQ (n))",
]


def test_resync_transcript_porcupine_equals_memory(tmp_path: Path) -> None:
    """The scripted QRESYNC resync gives the same lines over Porcupine's store as over the
    in-memory backend: VANISHED (EARLIER) names only what went after the client's
    modseq, the changed messages come with their MODSEQ, UNCHANGEDSINCE answers
    [MODIFIED] for a message changed since, SEARCH MODSEQ names the highest MODSEQ
    found, the other session gets VANISHED."""
    mem = resync(memory(tmp_path / "m"))
    porc = resync(porcupine(tmp_path / "p"))
    assert porc == mem
    select = porc[3].splitlines()
    for line in WANT_SELECT:
        assert line in select, porc[3]
    assert "[MODIFIED 3]" in porc[2]  # UID 3 was flagged after h1; UID 5 changed
    assert "* VANISHED (EARLIER) 4" in porc[4] and "UID 3 " in porc[4]
    assert porc[5] == "d OK FETCH completed\r\n"  # nothing changed since the last MODSEQ
    assert "* SEARCH 3 5 (MODSEQ n)" in porc[6]  # the highest MODSEQ found (RFC 7162)
    assert '* ESEARCH (TAG "s") UID COUNT 2 MODSEQ n' in porc[7]
    assert "* VANISHED 5" in porc[8] and "EXPUNGE" not in porc[8]
    assert "* OK [CLOSED]" in porc[9]
