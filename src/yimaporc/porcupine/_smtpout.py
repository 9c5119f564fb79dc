"""SMTP client connections to remote MXs, reused for every message queued for a host.

:class:`SmtpPool` keeps a queue of jobs per destination ``(host, port)``.  A
connection (twisted.mail's ``ESMTPClient``: EHLO, STARTTLS when offered, AUTH
to a smarthost) takes the next job of its destination after each message
(``RSET`` between them) and says ``QUIT`` when the queue is empty, so a burst
of mail for one MX goes over a few connections instead of one per message.
At most ``per_destination`` connections per host and ``total`` in all.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet import error as netError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IConnector
from twisted.internet.protocol import ClientFactory
from twisted.mail import smtp
from twisted.python.failure import Failure

from .._reactor import INodeReactor

CONNECT_TIMEOUT = 30.0
SMTP_TIMEOUT = 120.0

Destination = tuple[str, int]
#: ``(recipient, code, text)`` -> what became of one recipient.
Results = dict[str, Any]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def wire_body(body: bytes) -> bytes:
    """``body`` as DATA sends it: every line end CRLF (a bare CR or LF too, so no
    remote can take LF "." LF or CR "." CR for the end), lines starting with "."
    stuffed (RFC 5321 4.5.2); the final "." is the client's."""
    text = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return (b"\r\n" + text).replace(b"\r\n.", b"\r\n..")[2:]


@attrs.define(eq=False)
class Job:
    """One message for one destination; ``done`` fires with the raw RCPT replies
    ``[(rcpt, code, text)]`` and the message's own ``(code, text)``, or fails with a
    connection-level error."""

    sender: str
    rcpts: list[str]
    body: bytes
    done: Deferred[tuple[list[tuple[str, int, str]], tuple[int, str]]] = attrs.field(
        factory=Deferred
    )


class _Client(smtp.ESMTPClient):
    """One connection: sends its destination's queued jobs one after the other."""

    def __init__(
        self, pool: SmtpPool, dest: Destination, auth: tuple[bytes, bytes] | None, context: Any
    ) -> None:
        super().__init__(auth[1] if auth else None, context, pool.identity)
        if auth is not None:
            self.registerAuthenticator(smtp.PLAINAuthenticator(auth[0]))
            self.registerAuthenticator(smtp.LOGINAuthenticator(auth[0]))
        self.requireAuthentication = auth is not None
        self.requireTransportSecurity = False
        self.heloFallback = True
        self.timeout = SMTP_TIMEOUT  # type: ignore[assignment]
        self.pool = pool
        self.dest = dest
        self.job: Job | None = None
        self.error: BaseException | None = None
        self.sent = 0

    def callLater(self, period: float, func: Callable[[], object]) -> Any:
        """TimeoutMixin's timer, on the pool's reactor."""
        return self.pool.reactor.callLater(period, func)

    def getMailFrom(self) -> str | None:
        self.job = self.pool.next_job(self.dest)
        return None if self.job is None else self.job.sender

    def getMailTo(self) -> list[str]:
        assert self.job is not None
        return self.job.rcpts

    def getMailData(self) -> io.BytesIO:
        assert self.job is not None
        return io.BytesIO(wire_body(self.job.body))

    def transformChunk(self, chunk: bytes) -> bytes:
        """The chunk as :meth:`getMailData` made it (stock stuffs each 16 KiB chunk
        alone and misses a "." line at a chunk's start: the remote ends DATA there)."""
        self.resetTimeout()
        return chunk

    def sentMail(self, code: int, resp: bytes, numOk: int, addresses: Any, log: Any) -> None:
        self.sent += 1
        job, self.job = self.job, None
        if job is not None and not job.done.called:
            replies = [(_text(a), int(c), _text(t)) for a, c, t in addresses]
            job.done.callback((replies, (int(code), _text(resp))))

    def sendError(self, exc: BaseException) -> None:
        self.error = exc
        job, self.job = self.job, None
        if job is not None and not job.done.called:
            job.done.errback(Failure(exc))
        super().sendError(exc)

    def connectionLost(self, reason: Failure = netError.ConnectionDone) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)
        job, self.job = self.job, None
        if job is not None and not job.done.called:
            job.done.errback(reason)
        error = self.error
        if error is None and not self.sent:
            # Closed before any message went through: do not reconnect in a loop.
            error = (
                reason.value
                if reason.check(netError.ConnectionLost)
                else netError.ConnectionLost("closed before any message was sent")
            )
        self.pool.closed(self.dest, error)


class _Factory(ClientFactory):
    def __init__(self, pool: SmtpPool, dest: Destination) -> None:
        self.pool = pool
        self.dest = dest

    def buildProtocol(self, addr: IAddress | None) -> _Client:
        p = _Client(self.pool, self.dest, self.pool.auth_for(self.dest), self.pool.context)
        p.factory = self
        return p

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.pool.closed(self.dest, reason.value)


class SmtpPool:
    """Queues and connections per destination (see the module docstring)."""

    def __init__(
        self,
        reactor: INodeReactor,
        identity: bytes,
        context: Any,
        auth_for: Callable[[Destination], tuple[bytes, bytes] | None] = lambda d: None,
        per_destination: int = 2,
        total: int = 10,
    ) -> None:
        self.reactor = reactor
        self.identity = identity
        self.context = context
        self.auth_for = auth_for
        self.per_destination = per_destination
        self.total = total
        self.queues: dict[Destination, deque[Job]] = {}
        self.open: dict[Destination, int] = {}
        self.connections = 0
        self.connects = 0

    def send(self, dest: Destination, sender: str, rcpts: Sequence[str], body: bytes) -> Job:
        """Queue one message for ``dest``; its :class:`Job` says what became of it."""
        job = Job(sender, list(rcpts), body)
        self.queues.setdefault(dest, deque()).append(job)
        self._connect_if_needed(dest)
        return job

    def next_job(self, dest: Destination) -> Job | None:
        queue = self.queues.get(dest)
        return queue.popleft() if queue else None

    def closed(self, dest: Destination, error: BaseException | None) -> None:
        """A connection to ``dest`` ended (or never started, with ``error``)."""
        self.open[dest] -= 1
        self.connections -= 1
        queue = self.queues.get(dest)
        if error is not None and not self.open[dest] and queue:
            # Nobody can send these here now: the caller tries the next host, or later.
            waiting, self.queues[dest] = list(queue), deque()
            for job in waiting:
                job.done.errback(Failure(error))
        for other, jobs in list(self.queues.items()):
            if jobs:
                self._connect_if_needed(other)

    def _connect_if_needed(self, dest: Destination) -> None:
        queue = self.queues[dest]
        busy = self.open.get(dest, 0)
        if not queue or busy >= self.per_destination or self.connections >= self.total:
            return
        if busy and len(queue) <= busy:
            return  # the open connections take these when their message is done
        self.open[dest] = busy + 1
        self.connections += 1
        self.connects += 1
        self.reactor.connectTCP(dest[0], dest[1], _Factory(self, dest), timeout=CONNECT_TIMEOUT)
