"""The contract every IImapBackend keeps (run here against the in-memory backend; a
Porcupine adaptor subclasses ImapBackendContract with its own ``make`` and ``deliver``)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from yimaporc.imap.interfaces import (
    AppendResult,
    CopyResult,
    IImapBackend,
    IImapSession,
    ImapError,
    ISelectedMailbox,
    Snapshot,
)
from yimaporc.testing.imap_memory import MemoryBackend, MemoryStore


def result(value: Any) -> Any:
    """The result of a value or an already fired Deferred (raises its failure)."""
    d: Deferred[Any] = maybeDeferred(lambda: value) if not isinstance(value, Deferred) else value
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the backend answered asynchronously; override result() for it"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


class ImapBackendContract:
    """Behaviour the IMAP shell relies on. Subclasses give ``make()`` (a backend with the
    user ``alice``/``pw``) and ``deliver(raw)`` (a message into alice's INBOX)."""

    def make(self) -> Any:
        raise NotImplementedError

    def deliver(self, backend: Any, raw: bytes) -> None:
        raise NotImplementedError

    def session(self) -> tuple[Any, Any]:
        backend = self.make()
        return backend, result(backend.login("alice", "pw"))

    def test_interfaces(self) -> None:
        """The backend, its sessions and selected mailboxes provide the interfaces."""
        backend, session = self.session()
        assert verifyObject(IImapBackend, backend)
        assert verifyObject(IImapSession, session)
        assert verifyObject(ISelectedMailbox, result(session.select("INBOX", False)))

    def test_login_failure_code(self) -> None:
        """A wrong password is ImapError with AUTHENTICATIONFAILED."""
        with pytest.raises(ImapError) as err:
            result(self.make().login("alice", "wrong"))
        assert err.value.code == "AUTHENTICATIONFAILED"

    def test_missing_mailboxes(self) -> None:
        """SELECT of a missing mailbox is NONEXISTENT; APPEND and COPY to one TRYCREATE;
        CREATE of an existing one ALREADYEXISTS."""
        _, session = self.session()
        result(session.create("Dup", ()))
        for call, code in (
            (lambda: session.select("Nope", False), "NONEXISTENT"),
            (lambda: session.append("Nope", b"x", (), None), "TRYCREATE"),
            (lambda: result(session.select("INBOX", False)).copy([1], "Nope"), "TRYCREATE"),
            (lambda: session.create("Dup", ()), "ALREADYEXISTS"),
        ):
            with pytest.raises(ImapError) as err:
                result(call())
            assert err.value.code == code

    def test_snapshot_follows_changes(self) -> None:
        """Snapshots list messages in ascending UID order with flags and growing MODSEQs;
        append, store and expunge show in the next snapshot."""
        backend, session = self.session()
        box = result(session.select("INBOX", False))
        before: Snapshot = result(box.snapshot())
        appended: AppendResult = result(
            session.append("INBOX", b"Subject: a\r\n\r\nx\r\n", ("\\Seen",), None)
        )
        assert appended.uidvalidity == box.uidvalidity and appended.uid >= before.uidnext
        snap: Snapshot = result(box.snapshot())
        uids = [m.uid for m in snap.messages]
        assert uids == sorted(uids) and uids[-1] == appended.uid
        assert snap.uidnext > appended.uid
        assert result(box.store([appended.uid], "+", ("\\Deleted",), None)) == []
        after = {m.uid: m for m in result(box.snapshot()).messages}[appended.uid]
        assert set(after.flags) == {"\\Seen", "\\Deleted"}
        if backend.supports_modseq:
            assert after.modseq > {m.uid: m for m in snap.messages}[appended.uid].modseq
        result(box.expunge([appended.uid]))
        assert appended.uid not in [m.uid for m in result(box.snapshot()).messages]

    def test_conditional_store_and_tombstones(self) -> None:
        """With MODSEQs: STATUS HIGHESTMODSEQ covers every message; STORE UNCHANGEDSINCE
        below a message's MODSEQ leaves it alone and names it, at or above it changes it
        to a higher MODSEQ; an expunge leaves a tombstone above the MODSEQs before it."""
        backend, session = self.session()
        if not backend.supports_modseq:
            pytest.skip("no MODSEQs")
        for body in (b"Subject: a\r\n\r\nx\r\n", b"Subject: b\r\n\r\ny\r\n"):
            result(session.append("INBOX", body, (), None))
        box = result(session.select("INBOX", False))
        snap: Snapshot = result(box.snapshot())
        one, two = snap.messages[-2:]
        status = result(session.status("INBOX"))
        assert status.highestmodseq >= max(m.modseq for m in snap.messages) >= 1
        assert result(box.store([one.uid, two.uid], "+", ("\\Seen",), one.modseq)) == (
            [two.uid] if two.modseq > one.modseq else []
        )
        now = {m.uid: m for m in result(box.snapshot()).messages}
        assert "\\Seen" in now[one.uid].flags and now[one.uid].modseq > one.modseq
        if two.modseq > one.modseq:
            assert "\\Seen" not in now[two.uid].flags and now[two.uid].modseq == two.modseq
        top = max(m.modseq for m in now.values())
        result(box.store([two.uid], "+", ("\\Deleted",), None))
        result(box.expunge([two.uid]))
        tombs = result(box.tombstones())
        assert tombs[two.uid] > top
        assert result(session.status("INBOX")).highestmodseq >= tombs[two.uid]

    def test_copy_move_load(self) -> None:
        """COPY and MOVE return pairs of UIDs; load returns the octets."""
        backend, session = self.session()
        raw = b"Subject: c\r\n\r\nbody\r\n"
        self.deliver(backend, raw)
        box = result(session.select("INBOX", False))
        uid = result(box.snapshot()).messages[-1].uid
        assert result(box.load([uid])) == {uid: raw}
        copied: CopyResult = result(box.copy([uid], "Archive"))
        assert copied.source_uids == (uid,) and len(copied.dest_uids) == 1
        moved: CopyResult = result(box.move([uid], "Trash"))
        assert moved.source_uids == (uid,)
        assert uid not in [m.uid for m in result(box.snapshot()).messages]

    def test_watch_wakes_on_delivery(self) -> None:
        """A watching mailbox is called when mail arrives (IDLE), and not after watch(None)."""
        backend, session = self.session()
        box = result(session.select("INBOX", False))
        calls: list[int] = []
        box.watch(lambda: calls.append(1))
        self.deliver(backend, b"Subject: w\r\n\r\nx\r\n")
        assert calls
        box.watch(None)
        n = len(calls)
        self.deliver(backend, b"Subject: w2\r\n\r\nx\r\n")
        assert len(calls) == n

    def test_listing_and_status(self) -> None:
        """The listing has INBOX and the special-use mailboxes; STATUS counts messages."""
        backend, session = self.session()
        listing = {m.name: m for m in result(session.list_mailboxes())}
        assert "INBOX" in listing
        uses = {a for m in listing.values() for a in m.attributes}
        assert {"\\Sent", "\\Drafts", "\\Trash", "\\Junk", "\\Archive"} <= uses
        self.deliver(backend, b"Subject: s\r\n\r\nx\r\n")
        st = result(session.status("INBOX"))
        assert st.messages >= 1 and st.unseen >= 1 and st.uidnext > 1

    def test_rename_inbox_moves_its_messages(self) -> None:
        """RENAME INBOX moves its messages to the new name and leaves INBOX, empty
        (RFC 3501 6.3.5); a backend must not rename INBOX itself away."""
        backend, session = self.session()
        self.deliver(backend, b"Subject: r\r\n\r\nx\r\n")
        result(session.rename("INBOX", "Old"))
        names = {m.name for m in result(session.list_mailboxes())}
        assert {"INBOX", "Old"} <= names
        assert result(session.status("INBOX")).messages == 0
        assert result(session.status("Old")).messages == 1
        box = result(session.select("Old", False))
        [m] = result(box.snapshot()).messages
        assert result(box.load([m.uid])) == {m.uid: b"Subject: r\r\n\r\nx\r\n"}

    def test_multiappend_stores_all_or_none(self) -> None:
        """A backend offering MULTIAPPEND stores every message of append_many under
        ascending UIDs with their flags and dates, and nothing when the mailbox is missing."""
        backend, session = self.session()
        assert "MULTIAPPEND" in backend.extensions
        msgs = [
            (b"Subject: m1\r\n\r\none\r\n", ("\\Seen",), None),
            (b"Subject: m2\r\n\r\ntwo\r\n", ("$Label",), 1_600_000_000.0),
            (b"Subject: m3\r\n\r\nthree\r\n", (), None),
        ]
        out = result(session.append_many("Archive", msgs))
        assert [type(r) for r in out] == [AppendResult] * 3
        uids = [r.uid for r in out]
        assert uids == sorted(uids) and len(set(uids)) == 3
        box = result(session.select("Archive", False))
        snap = result(box.snapshot()).messages
        assert [m.uid for m in snap] == uids
        assert "\\Seen" in snap[0].flags and "$Label" in snap[1].flags
        assert snap[1].internal_date == 1_600_000_000.0
        assert result(box.load(uids)) == {u: m for u, (m, _, _) in zip(uids, msgs, strict=True)}
        with pytest.raises(ImapError) as err:
            result(session.append_many("Nope", msgs))
        assert err.value.code == "TRYCREATE"
        assert "Nope" not in {m.name for m in result(session.list_mailboxes())}


class TestMemoryBackend(ImapBackendContract):
    """The in-memory reference backend keeps the contract."""

    def make(self) -> Any:
        return MemoryBackend(MemoryStore({"alice": "pw"}))

    def deliver(self, backend: Any, raw: bytes) -> None:
        backend.store.deliver("alice", raw)
