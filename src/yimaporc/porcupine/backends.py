"""twisted.mail's SMTP, POP3 and IMAP4 servers, behind this node's mail store.

- SMTP: :class:`Delivery` (``IMessageDelivery``): local domain only unless a
  relay domain is configured, 550 for unknown users, 552 over the size limit,
  250 only after the body and its index row are durable.
- POP3: :class:`Pop3Mailbox` (``pop3.IMailbox``), a snapshot taken at login;
  deletions are applied at QUIT.
- IMAP4: :class:`Account` (``IAccount``), :class:`ImapMailbox`
  (``IMailbox``, ``IMessageCopier``) and :class:`ImapMessage` (``IMessage``).
  The server's synchronous calls are answered from an in-memory index that is
  refreshed at SELECT and after every change; bodies are read in the store's
  worker thread before FETCH answers.
- One cred checker (scrypt via the store) serves all three.
"""

from __future__ import annotations

import email.utils
import io
import time
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.mail import imap4, pop3, smtp
from zope.interface import implementer

from .mailstore import INBOX, AsyncMailStore, MessageRow, NoSuchMailbox, StoreError, normalise


def full_address(username: str | bytes, domain: str) -> str:
    """``demo`` -> ``demo@domain``; addresses stay as they are."""
    name = username.decode("utf-8", "replace") if isinstance(username, bytes) else username
    return normalise(name if "@" in name else f"{name}@{domain}")


@implementer(ICredentialsChecker)
class StoreChecker:
    """Checks user name and password against the store's scrypt hashes."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, store: AsyncMailStore, domain: str) -> None:
        self.store = store
        self.domain = domain

    def requestAvatarId(self, creds: Any) -> Deferred[Any]:
        """The normalised address if the password matches."""
        address = full_address(creds.username, self.domain)
        password = creds.password.decode("utf-8", "replace")

        def checked(ok: bool) -> bytes:
            if not ok:
                raise error.UnauthorizedLogin("wrong user name or password")
            return address.encode("utf-8")

        return self.store.check_password(address, password).addCallback(checked)


# --- SMTP ---------------------------------------------------------------------


@implementer(smtp.IMessage)
class StoredMessage:
    """Collects one message for one recipient; stores it durably at end of data."""

    def __init__(self, store: AsyncMailStore, address: str, limit: int) -> None:
        self.store = store
        self.address = address
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.too_big = False

    def lineReceived(self, line: bytes) -> None:
        """One line of DATA (already dot-unstuffed)."""
        if self.too_big:
            return
        self.size += len(line) + 2
        if self.size > self.limit:
            self.too_big = True
            self.parts = []
            return
        self.parts.append(line)

    def eomReceived(self) -> Deferred[Any]:
        """Store, then let the server say 250."""
        if self.too_big:
            # A Deferred, not a raise: twisted.mail calls eomReceived unguarded.
            return fail(smtp.SMTPServerError(552, "5.3.4 Message size exceeds fixed maximum"))
        data = b"\r\n".join(self.parts) + b"\r\n"
        self.parts = []
        return self.store.append(self.address, INBOX, data)

    def connectionLost(self) -> None:
        """The client vanished mid-DATA: nothing was stored."""
        self.parts = []


@implementer(smtp.IMessageDelivery)
class Delivery:
    """Decides who may receive mail here."""

    log = Logger()

    def __init__(
        self,
        store: AsyncMailStore,
        domain: str,
        hostname: str,
        max_size: int,
        relay_domains: Sequence[str] = (),
    ) -> None:
        self.store = store
        self.domain = domain.lower()
        self.hostname = hostname
        self.max_size = max_size
        self.relay_domains = {d.lower() for d in relay_domains}

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:
        """A Received: header naming this node."""
        client = helo[0].decode("ascii", "replace") if helo and helo[0] else "unknown"
        ip = helo[1].decode("ascii", "replace") if helo and len(helo) > 1 and helo[1] else "?"
        when = email.utils.formatdate(time.time())
        return (
            f"Received: from {client} ([{ip}]) by {self.hostname} (yimaporc porcupine); {when}"
        ).encode("ascii", "replace")

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        """Any sender may send to our users."""
        return origin

    def validateTo(self, user: smtp.User) -> Deferred[Any]:
        """Local users only (or configured relay domains, which we refuse to forward)."""
        domain = user.dest.domain.decode("ascii", "replace").lower()
        local = user.dest.local.decode("utf-8", "replace")
        if domain != self.domain:
            raise smtp.SMTPBadRcpt(user, code=550, resp="5.7.1 Relaying denied")
        address = normalise(f"{local}@{domain}")

        def exists(ok: bool) -> Any:
            if not ok:
                raise smtp.SMTPBadRcpt(user, code=550, resp="5.1.1 No such user here")
            # twisted.mail feeds our receivedHeader() in as the first line.
            return lambda: StoredMessage(self.store, address, self.max_size)

        return self.store.has_user(address).addCallback(exists)


class LimitedESMTP(smtp.ESMTP):
    """ESMTP with SIZE/8BITMIME/PIPELINING advertised and bounded lines and commands."""

    log = Logger()

    MAX_LINE = 4096
    MAX_BAD = 20

    def __init__(self, *args: Any, max_size: int = 25 << 20, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_size = max_size
        self.MAX_LENGTH = self.MAX_LINE
        self._bad = 0

    def extensions(self) -> dict[bytes, list[bytes]]:
        """The EHLO keywords."""
        ext = super().extensions()
        if not ext.get(b"AUTH"):
            del ext[b"AUTH"]
        ext[b"SIZE"] = [str(self.max_size).encode()]
        # None = keyword without arguments (an empty list would be omitted).
        ext[b"8BITMIME"] = None  # type: ignore[assignment]
        ext[b"PIPELINING"] = None  # type: ignore[assignment]
        ext[b"ENHANCEDSTATUSCODES"] = None  # type: ignore[assignment]
        return ext

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line over the limit: 500 and close."""
        self.sendCode(500, b"5.5.2 Line too long")
        self.transport.loseConnection()  # type: ignore[union-attr]

    def sendCode(self, code: int, message: bytes = b"") -> None:
        """Count errors; close sessions that do nothing but err."""
        super().sendCode(code, message)
        if code >= 500:
            self._bad += 1
            if self._bad > self.MAX_BAD:
                super().sendCode(421, b"4.7.0 Too many errors, closing")
                self.transport.loseConnection()  # type: ignore[union-attr]

    def _messageHandled(self, results: Any) -> None:
        # Stock ESMTP answers every failure with a permanent 550; a size error is
        # 552 and a storage error must be temporary (451) so the sender retries.
        if not isinstance(results, list):
            return super()._messageHandled(results)  # type: ignore[no-any-return]
        failures = [r for ok, r in results if not ok]
        if not failures:
            self.sendCode(250, b"2.0.0 Stored")
            return None
        for f in failures:
            if f.check(smtp.SMTPServerError):
                resp = f.value.resp
                self.sendCode(f.value.code, resp if isinstance(resp, bytes) else resp.encode())
                return None
        for f in failures:
            self.log.failure("mail: storing a message failed", f)
        self.sendCode(451, b"4.3.0 Could not store the message, try again later")
        return None

    def do_MAIL(self, rest: bytes) -> Any:
        """Refuse MAIL FROM with a SIZE= above the limit before any data is sent."""
        for param in rest.split()[1:]:
            key, _, value = param.partition(b"=")
            if key.upper() == b"SIZE" and value.isdigit() and int(value) > self.max_size:
                self.sendCode(552, b"5.3.4 Message size exceeds fixed maximum")
                return None
        return super().do_MAIL(rest)


# --- POP3 ---------------------------------------------------------------------


@implementer(pop3.IMailbox)
class Pop3Mailbox:
    """The INBOX as it was at login; DELE marks, QUIT removes."""

    def __init__(self, store: AsyncMailStore, address: str, uidvalidity: int,
                 rows: list[MessageRow], bodies: dict[int, bytes]) -> None:  # fmt: skip
        self.store = store
        self.address = address
        self.uidvalidity = uidvalidity
        self.rows = [r for r in rows if r.uid in bodies]
        self.bodies = bodies
        self.deleted: set[int] = set()

    def listMessages(self, index: int | None = None) -> Any:
        """Sizes (0 for deleted messages)."""
        if index is not None:
            self._check(index)
            return 0 if index in self.deleted else self.rows[index].size
        return [0 if i in self.deleted else r.size for i, r in enumerate(self.rows)]

    def getMessage(self, index: int) -> io.BytesIO:
        """The message as a file."""
        self._check(index)
        if index in self.deleted:
            raise ValueError("message deleted")
        # twisted.mail's POP3 adds CRLF to each LF-terminated line it sends.
        return io.BytesIO(self.bodies[self.rows[index].uid].replace(b"\r\n", b"\n"))

    def getUidl(self, index: int) -> bytes:
        """A unique id that survives sessions: UIDVALIDITY.UID."""
        self._check(index)
        return f"{self.uidvalidity}.{self.rows[index].uid}".encode()

    def deleteMessage(self, index: int) -> None:
        """Mark for deletion at QUIT."""
        self._check(index)
        self.deleted.add(index)

    def undeleteMessages(self) -> None:
        """RSET."""
        self.deleted.clear()

    def sync(self) -> Deferred[Any]:
        """QUIT: remove what was deleted."""
        uids = [self.rows[i].uid for i in sorted(self.deleted)]
        return self.store.remove(self.address, INBOX, uids) if uids else succeed(None)

    def _check(self, index: int) -> None:
        if not 0 <= index < len(self.rows):
            raise ValueError("no such message")


# --- IMAP4 --------------------------------------------------------------------


@implementer(imap4.IMessage)
class ImapMessage:
    """One message for IMAP4Server's FETCH/SEARCH."""

    def __init__(self, row: MessageRow, body: bytes | None) -> None:
        self.row = row
        self.body = body or b""
        self._part: _Part | None = None

    def _parsed(self) -> Any:
        if self._part is None:
            self._part = _Part(self.body)
        return self._part

    def getUID(self) -> int:
        return self.row.uid

    def getFlags(self) -> list[str]:
        return list(self.row.flags)

    def getInternalDate(self) -> str:
        return email.utils.formatdate(self.row.internal_date)

    def getHeaders(self, negate: bool, *names: Any) -> dict[str, str]:
        return self._parsed().getHeaders(negate, *names)  # type: ignore[no-any-return]

    def getBodyFile(self) -> io.BytesIO:
        return self._parsed().getBodyFile()  # type: ignore[no-any-return]

    def getSize(self) -> int:
        return len(self.body)

    def isMultipart(self) -> bool:
        return bool(self._parsed().isMultipart())

    def getSubPart(self, part: int) -> Any:
        return self._parsed().getSubPart(part)


class _Part:
    """A MIME part parsed with the email package, shaped like imap4.IMessagePart."""

    def __init__(self, raw: bytes) -> None:
        import email.parser
        import email.policy

        self.raw = raw
        self.msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw)
        sep = raw.find(b"\r\n\r\n")
        self.body = raw[sep + 4 :] if sep >= 0 else b""

    def getHeaders(self, negate: bool, *names: Any) -> dict[str, str]:
        wanted = {(n.decode() if isinstance(n, bytes) else n).lower() for n in names}
        out = {}
        for k, v in self.msg.items():
            if not names or ((k.lower() in wanted) != negate):
                out[k.lower()] = str(v)
        # RFC 2045 default, so BODYSTRUCTURE says TEXT/PLAIN rather than NIL.
        if "content-type" in wanted and not negate and "content-type" not in out:
            out["content-type"] = "text/plain; charset=us-ascii"
        return out

    def getBodyFile(self) -> io.BytesIO:
        return io.BytesIO(self.body)

    def getSize(self) -> int:
        return len(self.raw)

    def isMultipart(self) -> bool:
        return bool(self.msg.is_multipart())

    def getSubPart(self, part: int) -> _Part:
        payload = self.msg.get_payload()
        if not isinstance(payload, list) or not 0 <= part < len(payload):
            raise IndexError(part)
        sub: Any = payload[part]
        return _Part(sub.as_bytes().replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n"))


@implementer(imap4.IMailbox, imap4.IMessageCopier)
class ImapMailbox:
    """A selected mailbox: index cached in memory, refreshed after every change."""

    log = Logger()

    def __init__(self, account: Account, name: str, uidvalidity: int, uidnext: int,
                 rows: list[MessageRow], writeable: bool) -> None:  # fmt: skip
        self.account = account
        self.name = name
        self.uidvalidity = uidvalidity
        self.uidnext = uidnext
        self.rows = rows
        self.writeable = writeable
        self.listeners: list[Any] = []

    def _refresh(self, _: Any = None) -> Deferred[None]:
        def got(info_rows: tuple[Any, list[MessageRow]]) -> None:
            info, rows = info_rows
            old = len(self.rows)
            self.uidnext, self.rows = info.uidnext, rows
            if len(rows) != old:
                for listener in self.listeners:
                    listener.newMessages(len(rows), None)

        st = self.account.store
        return st.run(
            lambda: (
                st.store.mailbox(self.account.address, self.name),
                st.store.messages(self.account.address, self.name),
            )
        ).addCallback(got)

    def getFlags(self) -> list[str]:
        return [r"\Seen", r"\Answered", r"\Flagged", r"\Deleted", r"\Draft"]

    def getHierarchicalDelimiter(self) -> str:
        return "/"

    def getUIDValidity(self) -> int:
        return self.uidvalidity

    def getUIDNext(self) -> int:
        return self.uidnext

    def getUID(self, message: int) -> int:
        return self.rows[message - 1].uid

    def getMessageCount(self) -> int:
        return len(self.rows)

    def getRecentCount(self) -> int:
        return 0

    def getUnseenCount(self) -> int:
        return sum(1 for r in self.rows if r"\Seen" not in r.flags)

    def isWriteable(self) -> bool:
        return self.writeable

    def destroy(self) -> None:
        """Called when the mailbox is deleted."""

    def requestStatus(self, names: Iterable[str]) -> dict[str, int]:
        return imap4.statusRequestHelper(self, names)  # type: ignore[no-any-return]

    def addListener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def removeListener(self, listener: Any) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)

    def addMessage(
        self, message: Any, flags: Iterable[Any] = (), date: Any = None
    ) -> Deferred[int]:
        data = message.read()
        flag_names = [f.decode() if isinstance(f, bytes) else f for f in flags or ()]
        internal = None
        if date:
            parsed = email.utils.parsedate_tz(date.decode() if isinstance(date, bytes) else date)
            internal = email.utils.mktime_tz(parsed) if parsed else None
        d = self.account.store.append(self.account.address, self.name, data, flag_names, internal)
        return d.addCallback(lambda uid: self._refresh().addCallback(lambda _: uid))

    def expunge(self) -> Deferred[list[int]]:
        deleted = [r.uid for r in self.rows if r"\Deleted" in r.flags]
        seqs = [i + 1 for i, r in enumerate(self.rows) if r.uid in set(deleted)]
        d = self.account.store.remove(self.account.address, self.name, deleted)
        return d.addCallback(self._refresh).addCallback(lambda _: seqs)

    def _select(self, messages: Any, uid: bool) -> list[tuple[int, MessageRow]]:
        if not self.rows:
            return []
        if uid:
            messages.last = self.rows[-1].uid
            wanted = set(messages)
            return [(i + 1, r) for i, r in enumerate(self.rows) if r.uid in wanted]
        messages.last = len(self.rows)
        return [(n, self.rows[n - 1]) for n in messages if 1 <= n <= len(self.rows)]

    def fetch(self, messages: Any, uid: bool) -> Deferred[list[tuple[int, ImapMessage]]]:
        picked = self._select(messages, uid)

        def built(bodies: dict[int, bytes]) -> list[tuple[int, ImapMessage]]:
            return [(n, ImapMessage(r, bodies.get(r.uid))) for n, r in picked]

        return self.account.store.read_many([r for _, r in picked]).addCallback(built)

    def store(
        self, messages: Any, flags: Iterable[Any], mode: int, uid: bool
    ) -> Deferred[dict[int, list[str]]]:
        names = {f.decode() if isinstance(f, bytes) else f for f in flags}
        picked = self._select(messages, uid)
        changes: dict[int, set[str]] = {}
        for _, r in picked:
            current = set(r.flags)
            changes[r.uid] = (
                names if mode == 0 else (current | names if mode > 0 else current - names)
            )
        d = self.account.store.set_flags(self.account.address, self.name, changes)

        def answer(_: Any) -> dict[int, list[str]]:
            return {n: sorted(changes[r.uid]) for n, r in picked}

        return d.addCallback(self._refresh).addCallback(answer)

    def copy(self, message: ImapMessage) -> Deferred[int]:
        """COPY: twisted.mail calls this on the destination mailbox."""
        d = self.account.store.append(
            self.account.address, self.name, message.body, message.row.flags,
            message.row.internal_date,
        )  # fmt: skip
        return d.addCallback(lambda uid: self._refresh().addCallback(lambda _: uid))


@implementer(imap4.IAccount)
class Account:
    """A logged-in IMAP user."""

    def __init__(self, store: AsyncMailStore, address: str) -> None:
        self.store = store
        self.address = address

    def addMailbox(self, name: str, mbox: Any = None) -> Deferred[bool]:
        return self.create(name)

    def create(self, pathspec: str) -> Deferred[bool]:
        name = pathspec.rstrip("/")

        def failed(f: Any) -> bool:
            f.trap(StoreError)
            return False

        return self.store.create_mailbox(self.address, name).addCallbacks(lambda _: True, failed)

    def select(self, name: str, rw: bool = True) -> Deferred[ImapMailbox | None]:
        def load() -> ImapMailbox | None:
            s = self.store.store
            try:
                info = s.mailbox(self.address, name)
            except NoSuchMailbox:
                return None
            return ImapMailbox(
                self,
                info.name,
                info.uidvalidity,
                info.uidnext,
                s.messages(self.address, info.name),
                rw,
            )

        return self.store.run(load)

    def delete(self, name: str) -> Deferred[None]:
        def failed(f: Any) -> None:
            f.trap(StoreError)
            raise imap4.MailboxException(str(f.value))

        return self.store.delete_mailbox(self.address, name).addErrback(failed)

    def rename(self, oldname: str, newname: str) -> Deferred[None]:
        def failed(f: Any) -> None:
            f.trap(StoreError)
            raise imap4.MailboxException(str(f.value))

        return self.store.rename_mailbox(self.address, oldname, newname).addErrback(failed)

    def isSubscribed(self, name: str) -> Deferred[bool]:
        return self.store.run(lambda: self.store.store.mailbox(self.address, name).subscribed)

    def subscribe(self, name: str) -> Deferred[None]:
        return self.store.subscribe(self.address, name, True)

    def unsubscribe(self, name: str) -> Deferred[None]:
        return self.store.subscribe(self.address, name, False)

    def listMailboxes(self, ref: str, wildcard: str) -> Deferred[list[tuple[str, Any]]]:
        import re

        wanted = (ref or "") + (wildcard.decode() if isinstance(wildcard, bytes) else wildcard)
        pattern = re.compile(imap4.wildcardToRegexp(wanted, "/").pattern, re.IGNORECASE)

        def load() -> list[tuple[str, Any]]:
            s = self.store.store
            out = []
            for info in s.mailboxes(self.address):
                if pattern.match(info.name):
                    out.append(
                        (
                            info.name,
                            ImapMailbox(self, info.name, info.uidvalidity, info.uidnext, [], False),
                        )
                    )
            return out

        return self.store.run(load)


def _as_text(query: Any) -> Any:
    if isinstance(query, bytes):
        return query.decode("utf-8", "replace")
    if isinstance(query, list):
        return [_as_text(q) for q in query]
    return query


class ImapServer(imap4.IMAP4Server):
    """IMAP4Server, bounded: literals above ``MAX_LITERAL`` are refused."""

    MAX_LITERAL = 64 << 20

    def _fileLiteral(self, size: int) -> Any:
        # Stock IMAP4Server spools APPEND literals of any size; refuse huge ones.
        if size > self.MAX_LITERAL:
            raise imap4.IllegalClientResponse(
                f"Literal too long; at most {self.MAX_LITERAL} octets"
            )
        return super()._fileLiteral(size)

    def do_SEARCH(self, tag: bytes, charset: Any, query: Any, uid: int = 0) -> Any:
        # Stock IMAP4Server compares bytes search terms with str header values.
        return super().do_SEARCH(tag, charset, _as_text(query), uid)

    select_SEARCH = (do_SEARCH, *imap4.IMAP4Server.select_SEARCH[1:])  # type: ignore[assignment]

    def _cbAppendGotMailbox(
        self, mbox: Any, tag: bytes, flags: Any, date: Any, message: Any
    ) -> Any:
        # Stock IMAP4Server fails APPEND without a flag list (flags is None).
        return super()._cbAppendGotMailbox(mbox, tag, flags or [], date, message)


@implementer(portal.IRealm)
class MailRealm:
    """Gives a logged-in user their POP3 INBOX snapshot or IMAP account."""

    def __init__(self, store: AsyncMailStore) -> None:
        self.store = store

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Deferred[Any]:
        address = avatar_id.decode("utf-8")
        if imap4.IAccount in interfaces:
            return succeed((imap4.IAccount, Account(self.store, address), lambda: None))
        if pop3.IMailbox in interfaces:

            def load() -> Pop3Mailbox:
                s = self.store.store
                info = s.mailbox(address, INBOX)
                rows = s.messages(address, INBOX)
                return Pop3Mailbox(self.store, address, info.uidvalidity, rows, s.read_many(rows))

            return self.store.run(load).addCallback(lambda box: (pop3.IMailbox, box, lambda: None))
        raise error.UnauthorizedLogin("no avatar for the requested interfaces")
