"""An in-memory IMAP backend for tests: the reference implementation of
:mod:`yimaporc.imap.interfaces`.

:class:`MemoryStore` holds users' mailboxes (new users get INBOX plus
Sent/Drafts/Trash/Junk/Archive with their special-use attributes), with
UIDs, flags and MODSEQs; every change wakes the sessions watching the
mailbox (IDLE).  :class:`MemoryBackend` can answer through a ``delay``
callable (e.g. one returning Deferreds fired by a ``task.Clock``) to test
that commands stay in order when the backend answers late.

:class:`SimpleRenderer` and the SEARCH evaluator here cover what tests need
(whole message, HEADER/TEXT/HEADER.FIELDS sections, partials, a basic
ENVELOPE); the production renderer is ``yimaporc.imap._message``.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from yimaporc.imap._commands import BodySection, FetchAtt
from yimaporc.imap._view import MailboxView
from yimaporc.imap.interfaces import (
    BACKEND_EXTENSIONS,
    AppendResult,
    CopyResult,
    IImapBackend,
    IImapSession,
    ImapError,
    IMessageRenderer,
    ISelectedMailbox,
    MailboxListing,
    MailboxStatus,
    MessageInfo,
    Snapshot,
)

SPECIAL = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Junk": "\\Junk", "Archive": "\\Archive"}  # fmt: skip
PERMANENT = ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")


@attrs.define
class MemoryMessage:
    """One stored message."""

    uid: int
    raw: bytes
    flags: set[str]
    internal_date: float
    modseq: int

    def info(self) -> MessageInfo:
        return MessageInfo(
            self.uid, tuple(sorted(self.flags)), len(self.raw), self.internal_date, self.modseq
        )


@attrs.define
class MemoryMailbox:
    """One mailbox of one user."""

    name: str
    uidvalidity: int
    special_use: tuple[str, ...] = ()
    subscribed: bool = True
    uidnext: int = 1
    modseq: int = 1
    messages: list[MemoryMessage] = attrs.Factory(list)
    watchers: list[Callable[[], None]] = attrs.Factory(list)
    cached: Snapshot | None = None
    #: Tombstones: UID -> the MODSEQ of its expunge (QRESYNC).
    expunged: dict[int, int] = attrs.Factory(dict)

    def snapshot(self) -> Snapshot:
        """The current snapshot; the same object until the next change."""
        if self.cached is None:
            self.cached = Snapshot(
                tuple(m.info() for m in self.messages), self.uidnext, self.modseq
            )
        return self.cached

    def changed(self) -> None:
        self.cached = None
        for w in list(self.watchers):
            w()

    def remove(self, uids: set[int]) -> None:
        """Expunge ``uids`` at one new MODSEQ, leaving tombstones."""
        gone = [m.uid for m in self.messages if m.uid in uids]
        if not gone:
            return
        self.modseq += 1
        self.messages = [m for m in self.messages if m.uid not in uids]
        for uid in gone:
            self.expunged[uid] = self.modseq
        self.changed()

    def add(self, raw: bytes, flags: tuple[str, ...], date: float) -> int:
        self.modseq += 1
        self.cached = None
        uid = self.uidnext
        self.uidnext += 1
        self.messages.append(MemoryMessage(uid, raw, set(flags), date, self.modseq))
        return uid


class MemoryStore:
    """Users and their mailboxes."""

    def __init__(
        self, users: dict[str, str], now: Callable[[], float] = lambda: 1_700_000_000.0
    ) -> None:
        self.passwords = dict(users)
        self.now = now
        self.boxes: dict[str, dict[str, MemoryMailbox]] = {}
        self._validity = 1000
        for user in users:
            self.boxes[user] = {}
            for name in ("INBOX", *SPECIAL):
                self._new(user, name, (SPECIAL[name],) if name in SPECIAL else ())

    def _new(self, user: str, name: str, special: tuple[str, ...] = ()) -> MemoryMailbox:
        self._validity += 1
        box = MemoryMailbox(name, self._validity, special)
        self.boxes[user][name] = box
        return box

    def box(self, user: str, name: str, code: str = "NONEXISTENT") -> MemoryMailbox:
        """The mailbox, or ImapError with ``code``."""
        found = self.boxes[user].get(name)
        if found is None:
            raise ImapError(f"no mailbox {name}", code)
        return found

    def deliver(
        self, user: str, raw: bytes, mailbox: str = "INBOX", flags: tuple[str, ...] = ()
    ) -> int:
        """Store a message as a delivery would; its UID."""
        box = self.box(user, mailbox)
        uid = box.add(raw, flags, self.now())
        box.changed()
        return uid


@implementer(IImapBackend)
class MemoryBackend:
    """Logs users in to a :class:`MemoryStore`."""

    supports_modseq = True

    def __init__(
        self,
        store: MemoryStore,
        delay: Callable[[Any], Deferred[Any]] | None = None,
        extensions: tuple[str, ...] = BACKEND_EXTENSIONS,
    ) -> None:
        #: What this backend offers (tests pass fewer to check what is advertised).
        self.extensions = extensions
        self.store = store
        self.delay = delay or succeed
        self.sessions: list[MemorySession] = []

    def login(self, user: str, password: str) -> Deferred[Any]:
        if self.store.passwords.get(user) != password:
            raise ImapError("invalid credentials", "AUTHENTICATIONFAILED")
        session = MemorySession(self, user)
        self.sessions.append(session)
        return self.delay(session)


@implementer(IImapSession)
class MemorySession:
    """One logged-in user."""

    delimiter = "/"

    def __init__(self, backend: MemoryBackend, user: str) -> None:
        self.backend = backend
        self.store = backend.store
        self.user = user
        self.open: list[MemorySelected] = []
        self.logged_out = False

    def _later(self, value: Any) -> Deferred[Any]:
        return self.backend.delay(value)

    def list_mailboxes(self) -> Deferred[list[MailboxListing]]:
        boxes = self.store.boxes[self.user].values()
        return self._later([MailboxListing(b.name, b.special_use, b.subscribed) for b in boxes])

    def create(self, name: str, special_use: tuple[str, ...]) -> Deferred[None]:
        if name in self.store.boxes[self.user]:
            raise ImapError("mailbox exists", "ALREADYEXISTS")
        self.store._new(self.user, name, special_use)
        return self._later(None)

    def delete(self, name: str) -> Deferred[None]:
        self.store.box(self.user, name)
        del self.store.boxes[self.user][name]
        return self._later(None)

    def rename(self, old: str, new: str) -> Deferred[None]:
        box = self.store.box(self.user, old)
        if new in self.store.boxes[self.user]:
            raise ImapError("mailbox exists", "ALREADYEXISTS")
        if old == "INBOX":
            # RFC 3501 6.3.5: the messages move to the new name, INBOX stays, empty.
            target = self.store._new(self.user, new)
            for m in box.messages:
                target.add(m.raw, tuple(m.flags), m.internal_date)
            box.remove({m.uid for m in box.messages})
            return self._later(None)
        del self.store.boxes[self.user][old]
        box.name = new
        self.store.boxes[self.user][new] = box
        return self._later(None)

    def subscribe(self, name: str, on: bool) -> Deferred[None]:
        self.store.box(self.user, name).subscribed = on
        return self._later(None)

    def status(self, name: str) -> Deferred[MailboxStatus]:
        b = self.store.box(self.user, name)
        unseen = sum(1 for m in b.messages if "\\Seen" not in m.flags)
        deleted = sum(1 for m in b.messages if "\\Deleted" in m.flags)
        size = sum(len(m.raw) for m in b.messages)
        st = MailboxStatus(
            len(b.messages), b.uidnext, b.uidvalidity, unseen, 0, b.modseq, size, deleted
        )
        return self._later(st)

    def append(
        self, name: str, message: bytes, flags: tuple[str, ...], date: float | None
    ) -> Deferred[AppendResult]:
        box = self.store.box(self.user, name, "TRYCREATE")
        uid = box.add(message, flags, self.store.now() if date is None else date)
        box.changed()
        return self._later(AppendResult(box.uidvalidity, uid))

    def append_many(
        self, name: str, messages: list[tuple[bytes, tuple[str, ...], float | None]]
    ) -> Deferred[list[AppendResult]]:
        """MULTIAPPEND: every message added, then one change notice (no other session can
        run in between), or none when the mailbox is missing."""
        if "MULTIAPPEND" not in self.backend.extensions:
            raise ImapError("MULTIAPPEND is not supported", status="BAD")
        box = self.store.box(self.user, name, "TRYCREATE")
        now = self.store.now()
        uids = [box.add(m, f, now if d is None else d) for m, f, d in messages]
        box.changed()
        return self._later([AppendResult(box.uidvalidity, uid) for uid in uids])

    def select(self, name: str, readonly: bool) -> Deferred[MemorySelected]:
        box = self.store.box(self.user, name)
        sel = MemorySelected(self, box, readonly)
        self.open.append(sel)
        return self._later(sel)

    def logout(self) -> None:
        self.logged_out = True


@implementer(ISelectedMailbox)
class MemorySelected:
    """A mailbox opened by one session."""

    flags = PERMANENT
    permanent_flags = PERMANENT

    def __init__(self, session: MemorySession, box: MemoryMailbox, readonly: bool) -> None:
        self.session = session
        self.box = box
        self.name = box.name
        self.uidvalidity = box.uidvalidity
        self.readonly = readonly
        self.closed = False
        self._watch: Callable[[], None] | None = None

    def _later(self, value: Any) -> Deferred[Any]:
        return self.session.backend.delay(value)

    def snapshot(self) -> Deferred[Snapshot]:
        return self._later(self.box.snapshot())

    def load(self, uids: list[int]) -> Deferred[dict[int, bytes]]:
        wanted = set(uids)
        return self._later({m.uid: m.raw for m in self.box.messages if m.uid in wanted})

    def store(self, uids: list[int], mode: str, flags: tuple[str, ...], unchanged_since: int | None) -> Deferred[list[int]]:  # fmt: skip
        wanted = set(uids)
        modified = []
        for m in self.box.messages:
            if m.uid not in wanted:
                continue
            if unchanged_since is not None and m.modseq > unchanged_since:
                modified.append(m.uid)
                continue
            new = (
                set(flags)
                if mode == ""
                else (m.flags | set(flags) if mode == "+" else m.flags - set(flags))
            )
            if new != m.flags:
                self.box.modseq += 1
                m.flags = new
                m.modseq = self.box.modseq
        self.box.changed()
        return self._later(modified)

    def expunge(self, uids: list[int] | None) -> Deferred[None]:
        self.box.remove(
            {
                m.uid
                for m in self.box.messages
                if "\\Deleted" in m.flags and (uids is None or m.uid in uids)
            }
        )
        return self._later(None)

    def tombstones(self) -> Deferred[dict[int, int]]:
        return self._later(dict(self.box.expunged))

    def copy(self, uids: list[int], dest: str) -> Deferred[CopyResult]:
        target = self.session.store.box(self.session.user, dest, "TRYCREATE")
        src, dst = [], []
        for m in self.box.messages:
            if m.uid in uids:
                src.append(m.uid)
                dst.append(target.add(m.raw, tuple(m.flags), m.internal_date))
        target.changed()
        return self._later(CopyResult(target.uidvalidity, tuple(src), tuple(dst)))

    def move(self, uids: list[int], dest: str) -> Deferred[CopyResult]:
        target = self.session.store.box(self.session.user, dest, "TRYCREATE")
        result = self.copy(uids, dest)
        if target is not self.box:
            self.box.remove(set(uids))
        return result

    def search(self, criteria: tuple[Any, ...], charset: str | None, view: list[MessageInfo]) -> Deferred[list[int]]:  # fmt: skip
        raws = {m.uid: m for m in self.box.messages}
        out = []
        seqs = MailboxView(Snapshot(tuple(view), 0))
        for i, info in enumerate(view):
            m = raws.get(info.uid)
            if m is not None and _match_all(list(criteria), m, i + 1, seqs):
                out.append(info.uid)
        return self._later(out)

    def watch(self, callback: Callable[[], None] | None) -> None:
        if self._watch is not None and self._watch in self.box.watchers:
            self.box.watchers.remove(self._watch)
        self._watch = callback
        if callback is not None:
            self.box.watchers.append(callback)

    def close(self) -> None:
        self.watch(None)
        self.closed = True


# -- a small SEARCH evaluator -------------------------------------------------------------

_FLAG_KEYS = {"SEEN": "\\Seen", "FLAGGED": "\\Flagged", "DELETED": "\\Deleted", "ANSWERED": "\\Answered", "DRAFT": "\\Draft"}  # fmt: skip


def _match_all(tokens: list[Any], m: MemoryMessage, seq: int, view: MailboxView) -> bool:
    ok = True
    while tokens:
        ok = _match_one(tokens, m, seq, view) and ok
    return ok


def _text(tokens: list[Any]) -> bytes:
    if not tokens:
        raise ImapError("search key needs an argument", status="BAD")
    t = tokens.pop(0)
    return t if isinstance(t, bytes) else str(t).encode()


_SEQ_SET = re.compile(r"(?:[0-9]+|\*)(?::(?:[0-9]+|\*))?(?:,(?:[0-9]+|\*)(?::(?:[0-9]+|\*))?)*")


def _number(raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > 20:
        raise ImapError("expected a number", status="BAD")
    return int(raw)


def _header(raw: bytes, name: bytes) -> bytes:
    head = raw.split(b"\r\n\r\n", 1)[0]
    out = []
    for line in re.split(rb"\r?\n(?![ \t])", head):
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower():
            out.append(value)
    return b"\n".join(out)


def _match_one(tokens: list[Any], m: MemoryMessage, seq: int, view: MailboxView) -> bool:
    t = tokens.pop(0)
    if isinstance(t, list):
        return _match_all(list(t), m, seq, view)
    if isinstance(t, bytes):
        raise ImapError("unexpected string in SEARCH", status="BAD")
    key = t.upper()
    if key == "ALL":
        return True
    if key in _FLAG_KEYS:
        return _FLAG_KEYS[key] in m.flags
    if key.startswith("UN") and key[2:] in _FLAG_KEYS:
        return _FLAG_KEYS[key[2:]] not in m.flags
    if key in ("NEW", "RECENT"):
        return False
    if key == "OLD":
        return True
    if key == "NOT":
        return not _match_one(tokens, m, seq, view)
    if key == "OR":
        a = _match_one(tokens, m, seq, view)
        b = _match_one(tokens, m, seq, view)
        return a or b
    if key in ("KEYWORD", "UNKEYWORD"):
        has = _text(tokens).decode() in m.flags
        return has if key == "KEYWORD" else not has
    if key == "UID":
        uids = _text(tokens).decode("ascii", "replace")
        if not _SEQ_SET.fullmatch(uids):
            raise ImapError("bad UID set", status="BAD")
        return m.uid in view.resolve(uids, True)
    if key in ("LARGER", "SMALLER", "MODSEQ"):
        n = _number(_text(tokens))
        if key == "MODSEQ":
            return m.modseq >= n
        return len(m.raw) > n if key == "LARGER" else len(m.raw) < n
    if key in ("TEXT", "BODY"):
        needle = _text(tokens).lower()
        hay = m.raw if key == "TEXT" else m.raw.split(b"\r\n\r\n", 1)[-1]
        return needle in hay.lower()
    if key in ("SUBJECT", "FROM", "TO", "CC", "BCC"):
        return _text(tokens).lower() in _header(m.raw, key.encode()).lower()
    if key == "HEADER":
        name = _text(tokens)
        return _text(tokens).lower() in _header(m.raw, name).lower()
    if _SEQ_SET.fullmatch(key):
        try:
            return m.uid in view.resolve(key, False)
        except ImapError:
            return False
    raise ImapError(f"unsupported search key {key[:20]}", status="BAD")


# -- a small renderer -----------------------------------------------------------------


@implementer(IMessageRenderer)
class SimpleRenderer:
    """FETCH data for tests: whole-message sections and a basic ENVELOPE."""

    def render(self, raw: bytes, item: Any, internal_date: float) -> Any:
        head, sep, body = raw.partition(b"\r\n\r\n")
        head += sep
        if isinstance(item, FetchAtt):
            if item.name == "RFC822":
                return raw
            if item.name == "RFC822.HEADER":
                return head
            if item.name == "RFC822.TEXT":
                return body
            if item.name == "ENVELOPE":

                def h(n: bytes) -> bytes | None:
                    v = _header(raw, n).strip()
                    return v or None

                def addrs(n: bytes) -> Any:
                    v = h(n)
                    if v is None:
                        return None
                    pairs = email.utils.getaddresses([v.decode("utf-8", "replace")])
                    out = []
                    for name, addr in pairs:
                        mbox, _, host = addr.partition("@")
                        out.append((name.encode() or None, None, mbox.encode(), host.encode()))
                    return tuple(out)

                frm = addrs(b"From")
                return (h(b"Date"), h(b"Subject"), frm, addrs(b"Sender") or frm,
                        addrs(b"Reply-To") or frm, addrs(b"To"), addrs(b"Cc"), addrs(b"Bcc"),
                        h(b"In-Reply-To"), h(b"Message-ID"))  # fmt: skip
            if item.name in ("BODY", "BODYSTRUCTURE"):
                return (
                    b"text",
                    b"plain",
                    (b"charset", b"us-ascii"),
                    None,
                    None,
                    b"7bit",
                    len(body),
                    body.count(b"\n"),
                )
            raise ImapError(f"cannot render {item.name}")
        assert isinstance(item, BodySection)
        if item.part not in ((), (1,)):
            data = b""
        elif item.text is None:
            data = raw if not item.part else body
        elif item.text == "HEADER":
            data = head
        elif item.text == "TEXT":
            data = body
        elif item.text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            names = {f.lower() for f in item.fields}
            lines = re.split(rb"(?<=\n)(?![ \t])", head)
            keep = [ln for ln in lines if ln.strip() and (ln.split(b":", 1)[0].decode("latin-1").strip().lower() in names) == (item.text == "HEADER.FIELDS")]  # fmt: skip
            data = b"".join(keep) + b"\r\n"
        else:
            data = b""
        if item.partial is not None:
            origin, count = item.partial
            data = data[origin : origin + count]
        return data


SAMPLE = (
    b"From: Bob <bob@example.org>\r\nTo: alice@example.org\r\nSubject: hello\r\n"
    b"Message-ID: <1@example.org>\r\nDate: Sat, 05 Dec 2026 10:00:00 +0000\r\n\r\nhello world\r\n"
)


def serve(argv: list[str] | None = None) -> None:
    """``python -m yimaporc.testing.imap_memory HOST PORT [--tls=CERT,KEY] [USER:PASSWORD ...]``:
    an IMAP server over a fresh store (alice/pw with one message, bob/pw2, and the
    accounts named) for client tests, with STARTTLS (and LOGIN only under TLS) when given
    a PEM certificate and key; prints ``READY port``."""
    import sys

    from twisted.internet import reactor as _reactor

    from yimaporc.imap._protocol import ImapServerFactory

    reactor: Any = _reactor

    args = argv if argv is not None else sys.argv[1:]
    host, port = args[:2]
    tls: Any = None
    for a in args[2:]:
        if a.startswith("--tls="):
            from pathlib import Path

            from twisted.internet.ssl import PrivateCertificate

            cert, key = (Path(f).read_bytes() for f in a[len("--tls=") :].split(","))
            tls = PrivateCertificate.loadPEM(cert + key).options()
    extra = dict(a.split(":", 1) for a in args[2:] if not a.startswith("--"))
    store = MemoryStore({"alice": "pw", "bob": "pw2", **extra})
    store.deliver("alice", SAMPLE)
    factory = ImapServerFactory(MemoryBackend(store), SimpleRenderer(), reactor, tls=tls)
    listening = reactor.listenTCP(int(port), factory, interface=host)
    print(f"READY {listening.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    serve()
