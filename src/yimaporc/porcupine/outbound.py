"""Outbound mail: the durable queue of mail for other domains, and its delivery.

Authenticated users' mail for other domains is spooled by
:class:`~.delivery.OutboundSpool` (fsynced before the 250).  This module sends it:

- :class:`RetryPolicy` and :func:`settle` are the pure core: after an attempt,
  which recipients are done, which failed for good (bounce), which wait for the
  next attempt (backoff: 1, 5, 15, 30 min, 1, 2, 4 h, then every 4 h) and when
  a message has waited too long (default 5 days: bounced as expired);
- :class:`OutboundSender` is the Twisted shell: it loads the spool at start,
  wakes at the next due attempt, routes each recipient domain (``--transport
  DOMAIN=HOST:PORT``, else ``--smarthost``, else MX records through
  twisted.names, falling back to the domain's own address), sends with
  twisted.mail's ESMTP client (STARTTLS when offered, AUTH to a smarthost),
  at most :data:`PER_DESTINATION` connections per destination and
  :data:`CONCURRENT` in all, rewrites the envelope file with the attempt's
  state (so a SIGKILL loses no retry), and sends an RFC 3464 delivery status
  notification to the sender on permanent failure or expiry, never for a
  message from the null sender ``<>``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import error as netError
from twisted.internet.defer import (
    Deferred,
    gatherResults,
    inlineCallbacks,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.names import dns
from twisted.names import error as dnsError
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from .._reactor import INodeReactor
from ._smtpout import SmtpPool

log = Logger()

BACKOFF = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
EXPIRE = 5 * 86400.0
PER_DESTINATION = 2
CONCURRENT = 10
#: Seconds a message may wait before the queue counts as stuck (one warning line).
STUCK_AFTER = 3600.0


@attrs.frozen
class Entry:
    """One queued message: who it is still for, and its attempts so far."""

    ident: str
    sender: str
    recipients: tuple[str, ...]
    queued_at: float
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""

    def to_json(self) -> dict[str, Any]:
        """The envelope file's content (``from``/``to`` as the spool writes them)."""
        return {
            "from": self.sender,
            "to": list(self.recipients),
            "queued_at": self.queued_at,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "last_error": self.last_error,
        }

    @classmethod
    def from_json(cls, ident: str, doc: Mapping[str, Any], default_time: float) -> Entry:
        """An entry from its envelope file (a fresh spool file has only from/to)."""
        return cls(
            ident,
            str(doc["from"]),
            tuple(str(r) for r in doc["to"]),
            float(doc.get("queued_at", default_time)),
            int(doc.get("attempts", 0)),
            float(doc.get("next_attempt", 0.0)),
            str(doc.get("last_error", "")),
        )


@attrs.frozen
class Outcome:
    """One recipient's result: an SMTP code and text (2xx done, 4xx retry, 5xx failed)."""

    code: int
    text: str

    @property
    def permanent(self) -> bool:
        """True for a 5xx: no retry, a bounce."""
        return 500 <= self.code < 600

    @property
    def delivered(self) -> bool:
        """True for a 2xx."""
        return 200 <= self.code < 300


@attrs.frozen
class RetryPolicy:
    """When to try again, and when to give up."""

    backoff: tuple[float, ...] = BACKOFF
    expire: float = EXPIRE

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt."""
        return self.backoff[min(attempts, len(self.backoff)) - 1]


@attrs.frozen
class Settled:
    """What an attempt leaves: the entry to keep (None: done) and the failures to bounce."""

    entry: Entry | None
    bounce: tuple[tuple[str, Outcome], ...]
    delivered: tuple[str, ...]


def settle(
    entry: Entry, results: Mapping[str, Outcome], now: float, policy: RetryPolicy
) -> Settled:
    """Fold one attempt's per-recipient ``results`` into ``entry`` (pure)."""
    delivered = tuple(r for r in entry.recipients if r in results and results[r].delivered)
    failed = [(r, results[r]) for r in entry.recipients if r in results and results[r].permanent]
    waiting = [r for r in entry.recipients if r not in delivered and r not in dict(failed)]
    attempts = entry.attempts + 1
    last = next(
        (f"{results[r].code} {results[r].text}" for r in waiting if r in results), entry.last_error
    )
    if waiting and now - entry.queued_at >= policy.expire:
        expired = Outcome(450, f"4.4.7 delivery time expired after {attempts} attempts: {last}")
        failed += [(r, expired) for r in waiting]
        waiting = []
    if not waiting:
        return Settled(None, tuple(failed), delivered)
    kept = attrs.evolve(
        entry,
        recipients=tuple(waiting),
        attempts=attempts,
        next_attempt=now + policy.delay(attempts),
        last_error=last,
    )
    return Settled(kept, tuple(failed), delivered)


def domain_of(address: str) -> str:
    """The lower-cased domain of ``local@domain``."""
    return address.rpartition("@")[2].lower()


def by_domain(recipients: Iterable[str]) -> dict[str, list[str]]:
    """Recipients grouped by domain, in order."""
    out: dict[str, list[str]] = {}
    for r in recipients:
        out.setdefault(domain_of(r), []).append(r)
    return out


def parse_hostport(value: str, default_port: int = 25) -> tuple[str, int]:
    """``HOST[:PORT]`` (``[v6]:PORT`` too) as ``(host, port)``; ValueError if malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or "]" in port:
        host, port = value, str(default_port)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not HOST:PORT: {value!r}")
    return host, int(port)


def make_bounce(
    hostname: str,
    entry: Entry,
    failures: Sequence[tuple[str, Outcome]],
    original: bytes,
    now: float,
) -> bytes:
    """An RFC 3464 delivery status notification for ``failures`` of ``entry``:
    a human part, a ``message/delivery-status`` part and the original's headers."""
    boundary = f"=_{entry.ident}"
    human = [f"Your message could not be delivered to {len(failures)} recipient(s):", ""]
    human += [f"<{rcpt}>: {o.code} {o.text}" for rcpt, o in failures]
    status = [f"Reporting-MTA: dns; {hostname}", f"Arrival-Date: {formatdate(entry.queued_at)}"]
    for rcpt, o in failures:
        status += ["", f"Final-Recipient: rfc822; {rcpt}", "Action: failed",
                   f"Status: {_status(o)}", f"Diagnostic-Code: smtp; {o.code} {o.text}"]  # fmt: skip
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{entry.sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {formatdate(now, usegmt=True)}",
        f"Message-ID: {make_msgid(domain=hostname)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        *human,
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        *status,
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    headers = original.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].replace(b"\n", b"\r\n")
    tail = f"\r\n--{boundary}--\r\n".encode()
    return "\r\n".join(head).encode("utf-8", "replace") + b"\r\n" + headers + tail


def _status(o: Outcome) -> str:
    """The enhanced status code in ``o``'s text, else one derived from its class."""
    head = o.text.split(" ", 1)[0]
    parts = head.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        return head
    return "5.0.0" if o.permanent else "4.0.0"


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@attrs.define
class Routes:
    """Where mail for a domain goes: transport overrides, a smarthost, or MX."""

    transports: dict[str, tuple[str, int]] = attrs.field(factory=dict)
    smarthost: tuple[str, int] | None = None
    smarthost_auth: tuple[bytes, bytes] | None = None


class OutboundSender(Service):
    """Sends the spooled mail; one per node, for the node's own spool."""

    name = "mail-outbound"

    def __init__(
        self,
        reactor: INodeReactor,
        pool: ThreadPool,
        root: Path,
        hostname: str,
        bounce: Callable[[bytes, str, bytes], Deferred[Any]],
        routes: Routes | None = None,
        resolver: Any = None,
        policy: RetryPolicy | None = None,
        tls: Any = None,
        stuck_after: float | None = None,
    ) -> None:
        self.reactor = reactor
        #: A message queued this long (s) makes the queue *stuck*: one warning, and one
        #: line when no message is that old any more.
        self.stuck_after = STUCK_AFTER if stuck_after is None else stuck_after
        self._stuck = False
        self.pool = pool
        self.root = Path(root)
        self.hostname = hostname
        self.bounce = bounce
        self.routes = routes or Routes()
        self.resolver = resolver
        self.policy = policy or RetryPolicy()
        self.tls = tls
        self.entries: dict[str, Entry] = {}
        self._busy: set[str] = set()
        self.smtp = SmtpPool(
            reactor,
            hostname.encode("ascii", "replace"),
            tls or _opportunistic(),
            lambda dest: self.routes.smarthost_auth if dest == self.routes.smarthost else None,
            PER_DESTINATION,
            CONCURRENT,
        )
        self._timer: IDelayedCall | None = None
        self._loaded: Deferred[Any] | None = None
        self.counts = {"delivered": 0, "bounced": 0, "deferred": 0, "attempts": 0}

    # --- life cycle ------------------------------------------------------------

    def startService(self) -> None:
        """Load the spool (in the pool), then send what is due."""
        super().startService()
        self._loaded = deferToThreadPool(self.reactor, self.pool, self._load)
        self._loaded.addCallback(self._adopt)
        self._loaded.addErrback(lambda f: log.failure("outbound: cannot read the spool", f))

    def stopService(self) -> Deferred[Any] | None:
        """Stop waking up; attempts under way finish or are retried after a restart."""
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return None

    def _load(self) -> list[Entry]:
        out: list[Entry] = []
        if not self.root.is_dir():
            return out
        for path in sorted(self.root.glob("*.json")):
            try:
                doc = json.loads(path.read_bytes())
                out.append(Entry.from_json(path.stem, doc, path.stat().st_mtime))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warn("outbound: unreadable envelope {path}: {e}", path=str(path), e=e)
        return out

    def _adopt(self, entries: list[Entry]) -> None:
        for e in entries:
            self.entries.setdefault(e.ident, e)
        if entries:
            log.info("outbound: {n} queued messages", n=len(entries))
        self.wake()

    # --- the queue -------------------------------------------------------------

    def queued(self, ident: str, sender: str, recipients: Sequence[str]) -> None:
        """A message was just spooled: send it now."""
        now = float(self.reactor.seconds())
        self.entries[ident] = Entry(ident, sender, tuple(recipients), now)
        self.wake()

    def flush(self, ident: str | None = None) -> int:
        """Make ``ident`` (or every message) due now; how many were."""
        hit = [e for e in self.entries.values() if ident is None or e.ident == ident]
        for e in hit:
            self.entries[e.ident] = attrs.evolve(e, next_attempt=0.0)
        self.wake()
        return len(hit)

    def delete(self, ident: str) -> Deferred[bool]:
        """Drop a queued message without a bounce; fires True if it existed."""
        if ident not in self.entries:
            return succeed(False)
        del self.entries[ident]
        return deferToThreadPool(self.reactor, self.pool, self._remove_files, ident).addCallback(
            lambda _: True
        )

    def listing(self) -> list[dict[str, Any]]:
        """The queue, oldest first."""
        return [
            {"id": e.ident, **e.to_json()}
            for e in sorted(self.entries.values(), key=lambda e: e.queued_at)
        ]

    def status(self) -> dict[str, Any]:
        """Queue length, age of the oldest message (s) and counters."""
        now = float(self.reactor.seconds())
        oldest = min((e.queued_at for e in self.entries.values()), default=now)
        return {
            "length": len(self.entries),
            "oldest_age": round(now - oldest, 1),
            **self.counts,
            "connections": self.smtp.connections,
            "connects": self.smtp.connects,
        }

    def wake(self) -> None:
        """Start every due attempt; sleep until the next one."""
        if not self.running:
            return
        now = float(self.reactor.seconds())
        self._check_stuck(now)
        for e in list(self.entries.values()):
            if e.ident not in self._busy and e.next_attempt <= now:
                self._busy.add(e.ident)
                self._attempt(e).addBoth(self._attempted, e.ident)
        pending = [e.next_attempt for e in self.entries.values() if e.ident not in self._busy]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if pending:
            delay = max(0.0, min(pending) - now)
            self._timer = self.reactor.callLater(delay, self.wake)

    def _check_stuck(self, now: float) -> None:
        oldest = min(self.entries.values(), key=lambda e: e.queued_at, default=None)
        stuck = oldest is not None and now - oldest.queued_at >= self.stuck_after
        if stuck and not self._stuck and oldest is not None:
            log.warn(
                "outbound: queue stuck: {n} message(s) queued, the oldest ({ident}, to "
                "{domains}) for {age:.0f} s after {attempts} attempt(s); last error: {error}",
                n=len(self.entries),
                ident=oldest.ident,
                domains=",".join(sorted(by_domain(oldest.recipients)))[:200],
                age=now - oldest.queued_at,
                attempts=oldest.attempts,
                error=oldest.last_error or "none yet",
                event="queue_stuck",
            )
        elif self._stuck and not stuck:
            log.info(
                "outbound: queue no longer stuck: {n} message(s) queued, none for {limit:.0f} s",
                n=len(self.entries),
                limit=self.stuck_after,
                event="queue_unstuck",
            )
        self._stuck = stuck

    def _attempted(self, result: object, ident: str) -> None:
        self._busy.discard(ident)
        if isinstance(result, Failure):
            log.failure("outbound: attempt for {ident} failed", result, ident=ident)
            entry = self.entries.get(ident)
            if entry is not None:
                # Back off as after a temporary failure, or the next wake-up (at once)
                # would try again in a loop.
                attempts = entry.attempts + 1
                now = float(self.reactor.seconds())
                self.entries[ident] = attrs.evolve(
                    entry,
                    attempts=attempts,
                    next_attempt=now + self.policy.delay(attempts),
                    last_error=f"local error: {result.getErrorMessage()}",
                )
        self.wake()

    @inlineCallbacks
    def _attempt(self, entry: Entry) -> Any:
        try:
            body = yield deferToThreadPool(
                self.reactor, self.pool, (self.root / f"{entry.ident}.eml").read_bytes
            )
        except FileNotFoundError:
            log.warn("outbound: {ident} has no message file; dropped", ident=entry.ident)
            self.entries.pop(entry.ident, None)
            yield deferToThreadPool(self.reactor, self.pool, self._remove_files, entry.ident)
            return
        self.counts["attempts"] += 1
        results: dict[str, Outcome] = {}
        groups = by_domain(entry.recipients)
        outcomes = yield gatherResults(
            [
                self._to_domain(domain, entry.sender, rcpts, body)
                for domain, rcpts in groups.items()
            ],
            consumeErrors=True,
        )
        for got in outcomes:
            results.update(got)
        now = float(self.reactor.seconds())
        done = settle(entry, results, now, self.policy)
        self.counts["delivered"] += len(done.delivered)
        if done.bounce:
            self.counts["bounced"] += len(done.bounce)
            for rcpt, o in done.bounce:
                log.warn("outbound: {rcpt} failed for good: {code} {text}", rcpt=rcpt,
                         code=o.code, text=o.text)  # fmt: skip
            if entry.sender:
                dsn = make_bounce(self.hostname, entry, done.bounce, body, now)
                yield self.bounce(b"", entry.sender, dsn)
        if entry.ident not in self.entries:
            return  # deleted while under way
        if done.entry is None:
            del self.entries[entry.ident]
            yield deferToThreadPool(self.reactor, self.pool, self._remove_files, entry.ident)
        else:
            self.counts["deferred"] += 1
            self.entries[entry.ident] = done.entry
            yield deferToThreadPool(self.reactor, self.pool, self._persist, done.entry)

    def _persist(self, entry: Entry) -> None:
        tmp = self.root / "tmp" / f"{entry.ident}.json"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(json.dumps(entry.to_json()).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / f"{entry.ident}.json")

    def _remove_files(self, ident: str) -> None:
        for suffix in (".json", ".eml"):
            try:
                os.unlink(self.root / f"{ident}{suffix}")
            except FileNotFoundError:
                pass

    # --- one domain ------------------------------------------------------------

    @inlineCallbacks
    def _to_domain(self, domain: str, sender: str, rcpts: list[str], body: bytes) -> Any:
        try:
            hosts = yield self._hosts(domain)
        except dnsError.DomainError:
            return {r: Outcome(550, f"5.1.2 no such domain: {domain}") for r in rcpts}
        except Exception as e:  # DNS timeouts, server failures: try again later
            return {r: Outcome(451, f"4.4.3 cannot look up {domain}: {e}") for r in rcpts}
        last = "no mail exchanger"
        for host, port in hosts:
            try:
                got = yield self._send(host, port, sender, rcpts, body)
            except (
                netError.ConnectError,
                netError.DNSLookupError,
                netError.ConnectionLost,
                smtp.SMTPConnectError,
            ) as e:
                last = f"{host}:{port}: {e}"
                continue
            return got
        return {
            r: Outcome(451, f"4.4.1 no answer from any host for {domain}: {last}") for r in rcpts
        }

    def _hosts(self, domain: str) -> Deferred[list[tuple[str, int]]]:
        if domain in self.routes.transports:
            return succeed([self.routes.transports[domain]])
        if self.routes.smarthost is not None:
            return succeed([self.routes.smarthost])
        if self.resolver is None:
            from twisted.names import client

            self.resolver = client.createResolver()

        def mx(result: Any) -> list[tuple[str, int]]:
            answers = [a for a in result[0] if a.type == dns.MX]
            if not answers:
                return [(domain, 25)]
            ordered = sorted(answers, key=lambda a: a.payload.preference)
            names = [str(a.payload.name) for a in ordered]
            if names == [""] or names == ["."]:
                raise dnsError.DomainError(f"{domain} accepts no mail (null MX)")
            return [(n, 25) for n in names]

        # NXDOMAIN fails with DNSNameError (a DomainError: permanent); no MX
        # records at all means the domain's own address (RFC 5321 5.1).
        d: Deferred[Any] = self.resolver.lookupMailExchange(domain)
        return d.addCallback(mx)

    def _send(
        self, host: str, port: int, sender: str, rcpts: list[str], body: bytes
    ) -> Deferred[dict[str, Outcome]]:
        """Send one message over the pool's connection to ``host:port`` (reused)."""
        job = self.smtp.send((host, port), sender, rcpts, body)

        def sent(result: tuple[list[tuple[str, int, str]], tuple[int, str]]) -> dict[str, Outcome]:
            replies, (code, text) = result
            whole = None if 200 <= code < 300 else Outcome(code if 400 <= code < 600 else 451, text)
            return _per_recipient(rcpts, replies, whole)

        def refused(f: Failure) -> dict[str, Outcome]:
            if f.check(smtp.SMTPClientError) and not f.check(smtp.SMTPConnectError):
                err: smtp.SMTPClientError = f.value  # type: ignore[assignment]
                code = err.code if 400 <= err.code < 600 else 451
                return {r: Outcome(code, _text(err.resp)) for r in rcpts}
            f.raiseException()
            raise AssertionError("unreachable")

        return job.done.addCallbacks(sent, refused)


def _opportunistic() -> Any:
    """TLS for STARTTLS to any MX: encrypt when offered, without verifying the peer
    (as MTAs do when no DANE/MTA-STS policy applies; a smarthost may be given its own)."""
    from twisted.internet.ssl import CertificateOptions

    return CertificateOptions()


def _per_recipient(
    rcpts: Sequence[str], replies: Sequence[tuple[Any, int, Any]], whole: Outcome | None
) -> dict[str, Outcome]:
    """Each recipient's outcome: its own RCPT reply if refused there, else the message's."""
    own = {_text(a): Outcome(int(c), _text(t)) for a, c, t in replies}
    out = {}
    for r in rcpts:
        mine = own.get(r)
        if mine is not None and not mine.delivered:
            out[r] = mine
        elif whole is not None:
            out[r] = whole
        else:
            out[r] = mine or Outcome(250, "2.0.0 accepted")
    return out
