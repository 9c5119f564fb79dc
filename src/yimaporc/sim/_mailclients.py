"""Scripted SMTP, POP3 and IMAP clients for the mail scenario (:mod:`.mail`).

Each client is a :class:`Conversation`: a list of commands, each sent once the reply
to the previous one is complete, parsed just enough to know when a reply ends (an
SMTP last line ``NNN``+space, a POP3 status line or a dot-terminated listing, an
IMAP tagged line with ``{n}`` literals read raw).  The first refusal (SMTP 4xx/5xx,
POP3 ``-ERR``, IMAP ``NO``/``BAD``) ends the conversation, so does the client's
timeout; ``done`` gets the replies so far and whether every command succeeded.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import attrs
from twisted.internet.interfaces import IAddress, IConnector, IDelayedCall, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure

#: How a reply ends.
SMTP = "smtp"
POP_LINE = "pop"
POP_MULTI = "pop+"
IMAP = "imap"

_LITERAL = re.compile(rb"\{(\d+)\}\r\n$")


@attrs.frozen
class Step:
    """One command (None: only wait for the server's greeting) and its reply kind."""

    send: bytes | None
    kind: str
    tag: bytes = b""


Done = Callable[[list[bytes], bool], None]


class Conversation(Protocol):
    """Send the steps one by one; ``done(replies, ok)`` once (end, refusal, loss)."""

    def __init__(self, steps: list[Step], done: Done, clock: IReactorTime, timeout: float) -> None:
        self.steps = steps
        self.done = done
        self.clock = clock
        self.timeout = timeout
        self.replies: list[bytes] = []
        self._buf = bytearray()
        self._reply = bytearray()
        self._literal = 0
        self._multi = False
        self._finished = False
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timer = self.clock.callLater(self.timeout, self._expired)
        if self.steps and self.steps[0].send is not None:
            self._send_current()

    def _expired(self) -> None:
        self._timer = None
        self._finish(False)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _send_current(self) -> None:
        step = self.steps[len(self.replies)]
        self._multi = False
        assert step.send is not None and self.transport is not None
        self.transport.write(step.send)

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        while not self._finished and len(self.replies) < len(self.steps):
            if self._literal:
                if len(self._buf) < self._literal:
                    return
                self._reply += self._buf[: self._literal]
                del self._buf[: self._literal]
                self._literal = 0
                continue
            end = self._buf.find(b"\r\n")
            if end < 0:
                return
            line = bytes(self._buf[: end + 2])
            del self._buf[: end + 2]
            self._reply += line
            m = _LITERAL.search(line)
            if m is not None:
                self._literal = int(m.group(1))
                continue
            step = self.steps[len(self.replies)]
            verdict = self._complete(step, line)
            if verdict is None:
                continue
            self.replies.append(bytes(self._reply))
            self._reply = bytearray()
            if not verdict:
                self._finish(False)
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            if len(self.replies) == len(self.steps):
                self._finish(True)
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            self._send_current()

    def _complete(self, step: Step, line: bytes) -> bool | None:
        """None: the reply goes on; else whether it is a success."""
        if step.kind == SMTP:
            if len(line) >= 4 and line[3:4] == b"-":
                return None
            return line[:1] in (b"2", b"3")
        if step.kind == POP_LINE:
            return line.startswith(b"+OK")
        if step.kind == POP_MULTI:
            if not self._multi:
                if not line.startswith(b"+OK"):
                    return False
                self._multi = True
                return None
            return True if line == b".\r\n" else None
        # IMAP: untagged lines until the tagged status
        if line.startswith(step.tag + b" "):
            return line[len(step.tag) + 1 :].startswith(b"OK")
        return None if step.tag else line.startswith(b"* OK")

    def _finish(self, ok: bool) -> None:
        if self._finished:
            return
        self._finished = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.done(self.replies, ok)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._finish(False)


class ConversationFactory(ClientFactory):
    """Builds one :class:`Conversation`; a failed connect ends it too."""

    def __init__(self, steps: list[Step], done: Done, clock: IReactorTime, timeout: float) -> None:
        self.steps = steps
        self.done = done
        self.clock = clock
        self.timeout = timeout
        self.protocol_made: Conversation | None = None
        self._failed = False

    def buildProtocol(self, addr: IAddress | None) -> Conversation:
        proto = Conversation(self.steps, self.done, self.clock, self.timeout)
        self.protocol_made = proto
        return proto

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        if self.protocol_made is None and not self._failed:
            self._failed = True
            self.done([], False)


def smtp_steps(sender: str, rcpt: str, message: bytes) -> list[Step]:
    """Greeting, EHLO, MAIL, RCPT, DATA, the message, QUIT."""
    body = message.replace(b"\r\n.", b"\r\n..")
    return [
        Step(None, SMTP),
        Step(b"EHLO sim.client\r\n", SMTP),
        Step(b"MAIL FROM:<%s>\r\n" % sender.encode(), SMTP),
        Step(b"RCPT TO:<%s>\r\n" % rcpt.encode(), SMTP),
        Step(b"DATA\r\n", SMTP),
        Step(body + b"\r\n.\r\n", SMTP),
        Step(b"QUIT\r\n", SMTP),
    ]


def imap_steps(user: str, password: str) -> list[Step]:
    """Login, SELECT INBOX (UIDNEXT), every message's UID and Subject, LOGOUT."""
    return [
        Step(None, IMAP),
        Step(b"a1 LOGIN %s %s\r\n" % (user.encode(), password.encode()), IMAP, b"a1"),
        Step(b"a2 SELECT INBOX\r\n", IMAP, b"a2"),
        Step(b"a3 UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n", IMAP, b"a3"),
        Step(b"a4 LOGOUT\r\n", IMAP, b"a4"),
    ]


def pop3_steps(user: str, password: str) -> list[Step]:
    """Greeting, USER, PASS, UIDL, QUIT."""
    return [
        Step(None, POP_LINE),
        Step(b"USER %s\r\n" % user.encode(), POP_LINE),
        Step(b"PASS %s\r\n" % password.encode(), POP_LINE),
        Step(b"UIDL\r\n", POP_MULTI),
        Step(b"QUIT\r\n", POP_LINE),
    ]


_UIDNEXT = re.compile(rb"\[UIDNEXT (\d+)\]")
_FETCH = re.compile(rb"^\* \d+ FETCH \(", re.M)
_UID = re.compile(rb"UID (\d+)")
_SUBJECT = re.compile(rb"Subject: *(\S+)", re.I)


def parse_imap(replies: list[bytes]) -> tuple[list[tuple[str, int]], int] | None:
    """``((subject, uid) pairs, UIDNEXT)`` from a complete :func:`imap_steps` run; None
    when SELECT or the FETCH was refused (``a3 NO [UNAVAILABLE]``: a node holding the
    mail is out of reach), which is a refusal, not a listing of nothing."""
    if len(replies) < 4:
        return None
    m = _UIDNEXT.search(replies[2])
    if m is None or not _tagged_ok(replies[3], b"a3"):
        return None
    listing: list[tuple[str, int]] = []
    for chunk in _FETCH.split(replies[3])[1:]:
        uid, subject = _UID.search(chunk), _SUBJECT.search(chunk)
        if uid is not None:
            listing.append((subject.group(1).decode() if subject else "?", int(uid.group(1))))
    return listing, int(m.group(1))


def _tagged_ok(reply: bytes, tag: bytes) -> bool:
    """``reply`` ends with ``TAG OK ...`` (the command completed)."""
    return re.search(rb"(?:^|\r\n)" + re.escape(tag) + rb" OK\b", reply) is not None


_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")


def parse_uidvalidity(replies: list[bytes]) -> int | None:
    """The INBOX's UIDVALIDITY from the SELECT reply of an :func:`imap_steps` run."""
    m = _UIDVALIDITY.search(replies[2]) if len(replies) >= 3 else None
    return int(m.group(1)) if m is not None else None


def parse_uidl(replies: list[bytes]) -> list[str] | None:
    """The unique ids of a complete :func:`pop3_steps` run."""
    if len(replies) < 4 or not replies[3].startswith(b"+OK"):
        return None  # -ERR [SYS/TEMP]: refused, not an empty mailbox
    lines = replies[3].split(b"\r\n")[1:]
    return [line.split(b" ", 1)[1].decode() for line in lines if line and line != b"."]
