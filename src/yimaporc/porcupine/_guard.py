"""Guards in front of twisted.mail's POP3 and IMAP servers against hostile clients.

- :class:`ClientErrors`: per-protocol counters of client mistakes (answered with
  the protocol's error, never logged as a traceback) and of server errors (a
  traceback at most once a minute per protocol and exception type, then only
  counted), shown in ``/api/status`` under ``client_errors``.
- :class:`GatedLines`: a linear receive buffer (``bytearray`` and an offset;
  stock ``LineReceiver`` re-slices its buffer per line, quadratic in the
  pipeline depth) with input gating: the protocol stops reading (the
  transport is paused) while too many commands wait for their answers, or
  while the transport's write buffer is full (the protocol registers itself
  as the transport's streaming producer).  Unread input beyond a cap closes
  the connection.
- :func:`list_match`: IMAP LIST/LSUB wildcard matching in O(len(pattern) x
  len(name)) (twisted's ``wildcardToRegexp`` backtracks exponentially).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from ..cluster.rpc import PeerUnavailable

log = Logger()

#: Seconds between two tracebacks of the same (protocol, exception type).
TRACEBACK_INTERVAL = 60.0


class ClientErrors:
    """Counters of rejected client input and of server errors, per protocol."""

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.counts: Counter[str] = Counter()
        self._last_logged: dict[tuple[str, str], float] = {}
        #: Per protocol: sessions opened, open now and commands read (``sessions`` in
        #: status, ``yimaporc_mail_sessions*``/``_commands_total`` in /metrics).
        self.sessions: Counter[str] = Counter()
        self.open_sessions: Counter[str] = Counter()
        self.commands: Counter[str] = Counter()

    def opened(self, proto: str) -> None:
        """A session of ``proto`` began."""
        self.sessions[proto] += 1
        self.open_sessions[proto] += 1

    def closed(self, proto: str) -> None:
        """A session of ``proto`` ended (once per :meth:`opened`)."""
        self.open_sessions[proto] = max(0, self.open_sessions[proto] - 1)

    def command(self, proto: str) -> None:
        """A client sent one command of ``proto``."""
        self.commands[proto] += 1

    def activity(self) -> dict[str, dict[str, int]]:
        """``{proto: {sessions, open, commands}}`` for ``/api/status``."""
        return {
            p: {
                "sessions": self.sessions[p],
                "open": self.open_sessions[p],
                "commands": self.commands[p],
            }
            for p in sorted(set(self.sessions) | set(self.commands))
        }

    def client(self, proto: str, kind: str) -> None:
        """Count one client mistake (already answered with the protocol's error)."""
        self.counts[f"{proto}.{kind}"] += 1

    def server(self, proto: str, failure: Failure, what: str) -> None:
        """Count a server-side error; log its traceback at most once a minute per
        (protocol, exception type)."""
        name = failure.type.__name__ if failure.type is not None else "?"
        if failure.check(PeerUnavailable):
            # A peer down or cut off: expected under faults, a counter and a warning
            # (rate-limited by the node's log observer), never a traceback.
            self.counts[f"{proto}.peer_unavailable"] += 1
            log.warn(
                "{proto}: {what} deferred: {e}", proto=proto, what=what, e=failure.getErrorMessage()
            )
            return
        self.counts[f"{proto}.server_error"] += 1
        key = (proto, name)
        now = self.now()
        last = self._last_logged.get(key)
        if last is None or now - last >= TRACEBACK_INTERVAL:
            self._last_logged[key] = now
            log.failure(
                "{proto}: {what} failed (further {name} errors counted, not logged, for {s:.0f} s)",
                failure,
                proto=proto,
                what=what,
                name=name,
                s=TRACEBACK_INTERVAL,
            )

    def status(self) -> dict[str, int]:
        """The counters, for ``/api/status``."""
        return dict(sorted(self.counts.items()))


class GatedLines:
    """Mixin for a line protocol (``LineReceiver`` or ``LineOnlyReceiver``): a linear
    receive loop that stops while :meth:`_hold` reasons are set.

    The host class provides ``MAX_LENGTH``, ``delimiter``, ``lineReceived``,
    ``lineLengthExceeded``, ``transport``; ``line_mode``/``rawDataReceived`` when it
    has a raw mode.  It calls :meth:`_gate_start` from ``connectionMade``.
    """

    #: Most input bytes held unread (while paused) before the connection closes.
    MAX_BUFFERED = 256 * 1024

    _inbuf: bytearray
    _busy = False
    _holds: frozenset[str] = frozenset()
    _closed = False
    _drop = False

    def _gate_start(self) -> None:
        self._inbuf = bytearray()
        self._holds = frozenset()
        t: Any = self.transport  # type: ignore[attr-defined]
        if hasattr(t, "registerProducer") and getattr(t, "producer", None) is None:
            t.registerProducer(self, True)

    # --- IPushProducer, called by the transport about its write buffer ----------------

    def pauseProducing(self) -> None:
        """The transport's write buffer is full: stop reading commands."""
        self._hold("output")

    def resumeProducing(self) -> None:
        """The transport drained its write buffer.

        If the connection is closing (``loseConnection`` was called while the output
        was paused), let go of the transport instead: a FileDescriptor that finds a
        paused producer when its buffer drains resumes it and does not close, so the
        socket (with reading stopped) stayed open forever, in CLOSE-WAIT once the
        client left.  Unregistering the producer makes it close.
        """
        t: Any = self.transport  # type: ignore[attr-defined]
        if t is not None and getattr(t, "disconnecting", False):
            if getattr(t, "producer", None) is self:
                t.unregisterProducer()
            return
        self._release("output")

    def stopProducing(self) -> None:
        """The connection is going: read nothing more."""
        self._closed = True

    # --- holds -----------------------------------------------------------------------

    @property
    def paused(self) -> bool:  # type: ignore[override]
        return bool(self._holds) or self._closed

    def _hold(self, reason: str) -> None:
        if reason in self._holds:
            return
        was = bool(self._holds)
        self._holds = self._holds | {reason}
        if not was:
            t: Any = self.transport  # type: ignore[attr-defined]
            if t is not None and hasattr(t, "pauseProducing"):
                t.pauseProducing()

    def _release(self, reason: str) -> None:
        if reason not in self._holds:
            return
        self._holds = self._holds - {reason}
        if not self._holds:
            t: Any = self.transport  # type: ignore[attr-defined]
            if t is not None and hasattr(t, "resumeProducing") and not self._closed:
                t.resumeProducing()
            self.dataReceived(b"")

    def _drop_buffered(self) -> None:
        """Discard input received and not yet processed (e.g. plaintext after STARTTLS)."""
        if self._busy:
            self._drop = True  # the receive loop drops the rest of its buffer
        else:
            del self._inbuf[:]

    def _too_much_input(self) -> None:
        """Unread input over :attr:`MAX_BUFFERED`: say so and close (host overrides)."""
        self.transport.loseConnection()  # type: ignore[attr-defined]

    # --- the receive loop ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Split lines (or hand raw data on) while no hold is set; linear in the input."""
        buf = self._inbuf
        buf += data
        if self._busy:
            return
        self._busy = True
        pos = 0
        delim: bytes = self.delimiter  # type: ignore[attr-defined]
        limit: int = self.MAX_LENGTH  # type: ignore[attr-defined]
        t: Any = self.transport  # type: ignore[attr-defined]
        try:
            while pos < len(buf) and not self.paused:
                if t is not None and t.disconnecting:
                    pos = len(buf)
                    return
                if getattr(self, "line_mode", 1):
                    end = buf.find(delim, pos)
                    if end < 0:
                        if len(buf) - pos > limit:
                            line = bytes(buf[pos:])
                            pos = len(buf)
                            self.lineLengthExceeded(line)  # type: ignore[attr-defined]
                        return
                    line = bytes(buf[pos:end])
                    pos = end + len(delim)
                    if len(line) > limit:
                        pos = len(buf)
                        self.lineLengthExceeded(line)  # type: ignore[attr-defined]
                        return
                    self.lineReceived(line)  # type: ignore[attr-defined]
                    if self._drop:
                        self._drop = False
                        pos = len(buf)
                else:
                    chunk = bytes(buf[pos:])
                    pos = len(buf)
                    self.rawDataReceived(chunk)  # type: ignore[attr-defined]
        finally:
            del buf[:pos]
            self._busy = False
        if len(buf) > self.MAX_BUFFERED and not self._closed:
            self._closed = True
            del buf[:]
            self._too_much_input()


def _collapse(pattern: str) -> str:
    """Runs of wildcards as one: any run holding ``*`` is ``*``, else ``%``."""
    out: list[str] = []
    run = ""
    for ch in pattern:
        if ch in "*%":
            run += ch
            continue
        if run:
            out.append("*" if "*" in run else "%")
            run = ""
        out.append(ch)
    if run:
        out.append("*" if "*" in run else "%")
    return "".join(out)


def list_match_steps(pattern: str, name: str, delimiter: str) -> tuple[bool, int]:
    """(does ``name`` match the LIST ``pattern``, steps taken).

    ``*`` matches any run of characters, ``%`` any run without the hierarchy
    delimiter (RFC 3501 6.3.8).  A set-of-positions simulation of the pattern's
    automaton: at most 2 x (len(pattern) + 1) x (len(name) + 1) steps.
    """
    p = _collapse(pattern)
    steps = 0
    if sum(1 for ch in p if ch not in "*%") > len(name):
        return False, 1
    m = len(p)

    def closure(states: set[int]) -> set[int]:
        nonlocal steps
        out = set(states)
        for i in sorted(states):
            while i < m and p[i] in "*%":
                i += 1
                out.add(i)
                steps += 1
        return out

    cur = closure({0})
    for ch in name:
        nxt: set[int] = set()
        for i in cur:
            steps += 1
            if i >= m:
                continue
            c = p[i]
            if c == "*" or (c == "%" and ch != delimiter):
                nxt.add(i)
            elif c == ch:
                nxt.add(i + 1)
        if not nxt:
            return False, steps
        cur = closure(nxt)
    return m in cur, steps


def list_match(pattern: str, name: str, delimiter: str) -> bool:
    """Whether mailbox ``name`` matches the LIST/LSUB ``pattern`` (linear time)."""
    return list_match_steps(pattern, name, delimiter)[0]
