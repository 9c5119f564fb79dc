"""Node logging: bounded rotation, text or JSON lines, and a per-source rate limit.

twistd builds its log observer after the tap's ``makeService``; a tap hands it a
better one by wrapping its service in :func:`with_log_observer`, which sets the
observer as the application's ``ILogObserver`` component (twistd's documented
hook). :func:`node_log_observer` builds it from the twistd options (``--logfile``,
``--nodaemon``) and the node's ``--log-format``, ``--log-max-bytes`` and
``--log-max-files``: the file rotates at ``max_bytes`` and only ``max_files``
rotated files are kept (older ones are deleted).

:class:`RateLimitedObserver` sits in front of the file: at most ``per_key``
events with the same source key (namespace, format or normalised text, failure
type, and the event's ``log_source_key`` field when a module sets one, e.g. a
client address) and at most ``total`` events of any kind per ``interval``
seconds reach the file; what is held back is summarised in one
``suppressed N log events like ...`` line per key when the interval ends.
"""

from __future__ import annotations

import re
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import IO, Any

from twisted.application.service import IService, IServiceCollection, MultiService
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile
from zope.interface import implementer

from ._reactor import IClockThreads

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_FILES",
    "RateLimitedObserver",
    "node_log_observer",
    "source_key",
    "with_log_observer",
]

DEFAULT_MAX_BYTES = 10_000_000
DEFAULT_MAX_FILES = 5
#: Rate limit defaults: events per source key, events in all, per interval (seconds).
PER_KEY = 20
TOTAL = 500
INTERVAL = 10.0
#: Distinct keys tracked per interval; beyond, new keys share one overflow key.
MAX_KEYS = 4096
#: Per-key summary lines written at the end of an interval; the rest share one line.
MAX_SUMMARIES = 20

_VARYING = re.compile(r"0x[0-9a-fA-F]+|\d+")
_OVERFLOW = ("", "(other sources)", "")

Key = tuple[str, ...]


def _event_text(event: LogEvent) -> str:
    fmt = event.get("log_format")
    if fmt is not None and fmt != "{log_text}":
        return str(fmt)
    text = event.get("log_text")
    if text is None:
        message = event.get("message") or ()
        text = " ".join(str(m) for m in message) if message else ""
    why = event.get("why")
    if not text and why:
        text = str(why)
    return _VARYING.sub("#", str(text)[:200])


def source_key(event: LogEvent) -> Key:
    """What counts as "the same event": namespace, format (or normalised legacy text),
    failure type, and the event's own ``log_source_key`` (e.g. a peer address) if any."""
    failure = event.get("log_failure")
    failure_type = failure.type.__name__ if failure is not None else ""
    key: Key = (str(event.get("log_namespace", "")), _event_text(event), failure_type)
    source = event.get("log_source_key")
    if source is not None:
        key += (str(source),)
    return key


@implementer(ILogObserver)
class RateLimitedObserver:
    """Pass events on to ``observer`` within per-key and total budgets per interval.

    ``clock`` gives the time; ``schedule(delay, f)`` runs ``f`` later (by default
    ``clock.callLater``; a node passes a thread-safe variant because events may be
    emitted from threads). Held-back events are counted and summarised.
    """

    def __init__(
        self,
        observer: ILogObserver,
        clock: IReactorTime,
        per_key: int = PER_KEY,
        total: int = TOTAL,
        interval: float = INTERVAL,
        key: Callable[[LogEvent], Key] = source_key,
        schedule: Callable[[float, Callable[[], None]], object] | None = None,
    ) -> None:
        self.observer = observer
        self.clock = clock
        self.per_key = per_key
        self.total = total
        self.interval = interval
        self.key = key
        self.schedule = schedule or clock.callLater
        self.suppressed_total = 0
        self._lock = threading.Lock()
        self._window_end: float | None = None
        self._counts: dict[Key, int] = {}
        self._passed = 0
        self._held: dict[Key, int] = {}
        self._flush_scheduled = False

    def __call__(self, event: LogEvent) -> None:
        """Forward ``event`` or count it as suppressed."""
        key = self.key(event)
        with self._lock:
            now = self.clock.seconds()
            summaries = self._roll(now) if self._due(now) else []
            if key not in self._counts and len(self._counts) >= MAX_KEYS:
                key = _OVERFLOW
            seen = self._counts.get(key, 0)
            forward = seen < self.per_key and self._passed < self.total
            if forward:
                self._counts[key] = seen + 1
                self._passed += 1
            else:
                self._held[key] = self._held.get(key, 0) + 1
                self.suppressed_total += 1
                if not self._flush_scheduled and self._window_end is not None:
                    self._flush_scheduled = True
                    self.schedule(max(self._window_end - now, 0.0), self.flush)
        self._emit(summaries)
        if forward:
            self.observer(event)

    def flush(self) -> None:
        """End the current interval if it is over, writing its summaries."""
        with self._lock:
            self._flush_scheduled = False
            now = self.clock.seconds()
            summaries = self._roll(now) if self._due(now) else []
        self._emit(summaries)

    def _due(self, now: float) -> bool:
        return self._window_end is None or now >= self._window_end

    def _roll(self, now: float) -> list[LogEvent]:
        """Start a new interval at ``now``; return the summaries of the old one."""
        held = sorted(self._held.items(), key=lambda kv: -kv[1])
        self._window_end = now + self.interval
        self._counts = {}
        self._passed = 0
        self._held = {}
        return list(self._summaries(held, now))

    def _summaries(self, held: list[tuple[Key, int]], now: float) -> Iterable[LogEvent]:
        for key, n in held[:MAX_SUMMARIES]:
            yield {
                "log_namespace": "yimaporc.logs",
                "log_level": LogLevel.warn,
                "log_time": now,
                "log_format": "suppressed {suppressed} log events like {sample!r} "
                "({namespace}) in {interval} s",
                "suppressed": n,
                "sample": " ".join(k for k in key[1:] if k),
                "namespace": key[0],
                "interval": self.interval,
            }
        rest = held[MAX_SUMMARIES:]
        if rest:
            yield {
                "log_namespace": "yimaporc.logs",
                "log_level": LogLevel.warn,
                "log_time": now,
                "log_format": "suppressed {suppressed} more log events from {sources} "
                "other sources in {interval} s",
                "suppressed": sum(n for _, n in rest),
                "sources": len(rest),
                "interval": self.interval,
            }

    def _emit(self, events: list[LogEvent]) -> None:
        for event in events:
            self.observer(event)


def node_log_observer(
    options: usage.Options,
    reactor: IClockThreads,
    *,
    log_format: str = "text",
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    rate: int = PER_KEY,
) -> ILogObserver | None:
    """The observer twistd should use for a node, or None to leave twistd's own.

    ``options`` are the tap's options; their ``parent`` (twistd's) says where to log.
    None when not run by twistd, or when twistd logs to syslog or a ``--logger``.
    ``rate`` is the per-source budget per :data:`INTERVAL` (0: no rate limit).
    """
    parent = getattr(options, "parent", None)
    if parent is None or parent.get("syslog") or parent.get("logger"):
        return None
    filename = parent.get("logfile") or ""
    nodaemon = bool(parent.get("nodaemon"))
    out: IO[Any] | LogFile
    if filename == "-" or (nodaemon and not filename):
        if not nodaemon:
            return None  # twistd refuses a daemon logging to stdout itself
        out = sys.stdout
    else:
        log_file = LogFile.fromFullPath(
            filename or "twistd.log", rotateLength=max_bytes, maxRotatedFiles=max_files
        )
        _rotate_on_sigusr1(log_file, reactor)
        out = log_file
    make = jsonFileLogObserver if log_format == "json" else textFileLogObserver
    inner = make(out)  # type: ignore[arg-type]

    if rate == 0:
        return inner

    def schedule(delay: float, f: Callable[[], None]) -> object:
        reactor.callFromThread(reactor.callLater, delay, f)
        return None

    return RateLimitedObserver(
        inner, reactor, per_key=rate, total=max(TOTAL, rate), schedule=schedule
    )


def _rotate_on_sigusr1(log_file: LogFile, reactor: IReactorFromThreads) -> None:
    """As twistd does: SIGUSR1 rotates the file (unless someone else handles it)."""
    if signal.getsignal(signal.SIGUSR1):
        return

    def rotate(signum: int, frame: Any) -> None:
        reactor.callFromThread(log_file.rotate)

    signal.signal(signal.SIGUSR1, rotate)


class _WithLogObserver(MultiService):
    """Holds the node; puts ``observer`` on the twistd application it joins."""

    def __init__(self, child: IService, observer: ILogObserver) -> None:
        super().__init__()
        self.observer = observer
        child.setServiceParent(self)

    def setServiceParent(self, parent: IServiceCollection) -> None:
        """Join ``parent``; if it is the application, become its log observer."""
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def with_log_observer(service: IService, observer: ILogObserver | None) -> IService:
    """``service``, wrapped so that twistd logs through ``observer`` (if not None)."""
    if observer is None:
        return service
    return _WithLogObserver(service, observer)
