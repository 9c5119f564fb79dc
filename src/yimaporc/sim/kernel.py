"""The simulation kernel: many hosts, one virtual time line, one seed.

:class:`SimKernel` holds a single event queue in true (simulated) time and the
network between its :class:`SimHost` s.  Each host has its own reactor
(:class:`~yimaporc.sim.reactor.SimReactor`: ``IReactorTime``, ``IReactorUDP``,
``IReactorTCP``), so the shipped Twisted shells run on it unmodified, FoundationDB
style: they call ``callLater``, ``listenUDP``, ``connectTCP`` and get simulated
timers, datagram links and stream links.

The fault model, all drawn from one ``random.Random(seed)``:

- per datagram: latency (uniform range), loss, duplication, reordering
  (extra delay); per host: receive loss (``rx_loss``, a flooded socket) and receive
  delay (``rx_delay``, a process draining its socket behind a backlog);
- stream (TCP) links deliver in order after a latency; a write across a cut link
  breaks the connection (both ends see ``ConnectionLost``), a connect across one
  times out;
- partitions (groups), and single cut links for non-transitive connectivity
  (a bridge host that reaches both sides);
- crash (the process dies: its timers and ports vanish, its peers' connections
  are reset) and restart on the same disk (a per-host directory that survives);
- pauses (SIGSTOP: the host's timers and arriving data wait; on resume its late
  timers run first, then what arrived);
- crash points: a :class:`CrashPoint` stops a host just before the n-th step of its
  process that matches (a shell's collaborators report each action they are about to
  perform through :meth:`SimKernel.step`), and restarts it later (:attr:`SimHost.program`
  is what a boot runs);
- request/response links (:meth:`SimKernel.call`: an RPC's one exchange, with latency,
  loss as a failed call and duplication as a resent request);
- clock skew per host (each reactor's ``seconds()`` is true time plus its skew);
- a simulated thread pool per host (``getThreadPool()``, for ``deferToThreadPool``):
  jobs run on the host after a seeded disk latency, so they finish in any order.

Every event run is folded into a SHA-256 trace (time, host, kind, what, and the
bytes of every datagram), so a run is identified by :meth:`SimKernel.trace_digest`:
the same seed gives the same digest, which is how a failing seed is shown to replay.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
import shutil
import struct
import tempfile
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from .links import Links
from .reactor import SimReactor

#: Where host disks go by default: tmpfs when there is one (fsync is then cheap).
_SHM = Path("/dev/shm")

_pack_dB = struct.Struct("!dB").pack

#: Event kinds: timers of a host, and I/O arriving at a host (runs after its timers
#: of the same instant when the host was paused).
TIMER = 0
IO = 1
KERNEL = 2

T = TypeVar("T")


@attrs.define
class Faults:
    """Network behaviour: latency range (s) and probabilities per datagram."""

    latency: tuple[float, float] = (0.0005, 0.005)
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_extra: float = 0.05
    #: how long one job on a host's simulated thread pool takes (a disk write)
    disk_latency: tuple[float, float] = (0.0001, 0.002)
    #: how long a caller waits for the answer of a lost request (:meth:`SimKernel.call`)
    call_timeout: float = 0.5


@attrs.define
class CrashPoint:
    """Crash host ``host`` just before the ``nth`` step of its process that ``when``
    matches (``when(host_name, step)``); restart it ``down_for`` seconds later (never,
    if None).  ``seen`` counts the matching steps, ``fired`` says it happened."""

    host: str
    when: Callable[[str, Any], bool]
    nth: int = 1
    down_for: float | None = 0.5
    seen: int = 0
    fired: bool = False


@attrs.define(eq=False)
class SimHost:
    """One simulated machine: an address, a clock skew, a disk, and while up a reactor.

    ``generation`` counts boots: events scheduled by an earlier boot's timers are
    dropped once the host crashed.
    """

    kernel: SimKernel
    name: str
    ip: str
    skew: float
    disk: Path
    generation: int = 0
    up: bool = False
    paused_until: float = 0.0
    rx_loss: float = 0.0
    #: How long each arriving datagram waits before the process sees it (a process
    #: that drains its socket behind a backlog of work, e.g. starved of CPU).
    rx_delay: float = 0.0
    reactor: SimReactor | None = None
    #: What each boot's process runs (:meth:`SimKernel.start`): builds the shells on
    #: the fresh reactor.
    program: Callable[[SimReactor], object] | None = None

    def seconds(self) -> float:
        """This host's local clock."""
        return self.kernel.now + self.skew

    def wall_time(self) -> float:
        """A deterministic stand-in for ``time.time()`` on this host."""
        return self.kernel.wall_epoch + self.seconds()


class SimKernel(Links):
    """Hosts, links (:class:`~yimaporc.sim.links.Links`) and one event queue in true time;
    ``run_until`` advances it."""

    log = Logger()

    def __init__(
        self,
        seed: int,
        *,
        faults: Faults | None = None,
        disk_root: Path | None = None,
        wall_epoch: float = 1_700_000_000.0,
    ) -> None:
        super().__init__()
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults or Faults()
        self.wall_epoch = wall_epoch
        self.now = 0.0
        self.hosts: dict[str, SimHost] = {}
        self.by_ip: dict[str, SimHost] = {}
        self._queue: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()
        self._trace = hashlib.sha256()
        self.events = 0
        self.datagrams_sent = 0
        self.datagrams_delivered = 0
        self.stream_bytes = 0
        self._cleanup: Callable[[], object] | None = None
        self._disk_root = disk_root
        #: Crash points armed (:meth:`step` checks them in order).
        self.crash_points: list[CrashPoint] = []
        self._watchers: list[Callable[[str, SimHost], None]] = []

    @property
    def disk_root(self) -> Path:
        """Where host disks live: ``disk_root`` if given, else a temporary directory (on
        tmpfs when there is one) made on first use and removed by :meth:`close`."""
        if self._disk_root is None:
            base = _SHM if _SHM.is_dir() else None
            self._disk_root = Path(tempfile.mkdtemp(prefix="yimaporc-sim-", dir=base))
            self._cleanup = weakref.finalize(
                self, shutil.rmtree, str(self._disk_root), ignore_errors=True
            )
        return self._disk_root

    def close(self) -> None:
        """Remove the host disks this kernel created."""
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> SimKernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- hosts ----------------------------------------------------------------------

    def add_host(self, name: str, ip: str, *, skew: float = 0.0) -> SimHost:
        """A machine named ``name`` at ``ip`` (down until :meth:`boot`)."""
        if name in self.hosts or ip in self.by_ip:
            raise ValueError(f"host {name} / {ip} exists")
        disk = self.disk_root / name
        disk.mkdir(parents=True, exist_ok=True)
        host = SimHost(self, name, ip, skew, disk)
        self.hosts[name] = host
        self.by_ip[ip] = host
        return host

    def boot(self, host: SimHost) -> SimReactor:
        """Start the host's process: a fresh reactor on the same disk."""
        if host.up:
            raise RuntimeError(f"{host.name} is up")
        host.generation += 1
        host.up = True
        host.paused_until = 0.0
        host.reactor = reactor = SimReactor(host)
        self._record(KERNEL, host.name, "boot")
        self._notify("boot", host)
        return reactor

    def start(self, host: SimHost) -> SimReactor | None:
        """Boot the host and run its :attr:`~SimHost.program` on the fresh reactor
        (nothing if it is up already); the reactor, or None."""
        if host.up:
            return None
        reactor = self.boot(host)
        if host.program is not None:
            host.program(reactor)
        return reactor

    def restart_after(self, host: SimHost, delay: float) -> None:
        """:meth:`start` the host ``delay`` seconds from now (if it is down then)."""

        def start() -> None:
            self.start(host)

        self.at(self.now + delay, start)

    def watch(self, fn: Callable[[str, SimHost], None]) -> None:
        """Call ``fn("boot" | "crash", host)`` after each boot and crash."""
        self._watchers.append(fn)

    def _notify(self, what: str, host: SimHost) -> None:
        for fn in self._watchers:
            fn(what, host)

    def crash(self, host: SimHost) -> None:
        """Kill the host's process: timers, ports and its ends of connections vanish at
        once; the other ends of its connections see a reset after a latency."""
        if not host.up:
            return
        host.up = False
        host.generation += 1  # what the dead process scheduled never runs
        self._record(KERNEL, host.name, "crash")
        reactor, host.reactor = host.reactor, None
        if reactor is not None:
            reactor.die()
        self._notify("crash", host)

    def step(self, host: SimHost, what: Any) -> bool:
        """A process on ``host`` is about to perform ``what`` (one action of its core);
        False when it must not: the host is down, or a :class:`CrashPoint` fired and
        crashed it just now (and scheduled its restart).  The caller performs ``what``
        only on True; the process's code that runs on after a crash affects nothing
        (its timers, writes through the caller and sends are dropped)."""
        if not host.up:
            return False
        for point in self.crash_points:
            if point.fired or point.host != host.name or not point.when(host.name, what):
                continue
            point.seen += 1
            if point.seen >= point.nth:
                point.fired = True
                self._record(KERNEL, host.name, f"crash point {type(what).__name__}")
                self.crash(host)
                if point.down_for is not None:
                    self.restart_after(host, point.down_for)
                return False
        return True

    def pause(self, host: SimHost, seconds: float) -> None:
        """Stop the host's process for ``seconds`` (SIGSTOP)."""
        host.paused_until = self.now + seconds
        self._record(KERNEL, host.name, f"pause {seconds!r}")

    # --- topology -------------------------------------------------------------------

    def partition(self, *groups: Iterable[str]) -> None:
        """Only hosts (by name) within the same group can talk; unlisted ones are isolated."""
        super().partition(*groups)
        assert self._groups is not None
        self._record(KERNEL, "", f"partition {sorted(self._groups.items())}")

    def heal(self) -> None:
        """Remove every partition and cut link."""
        super().heal()
        self._record(KERNEL, "", "heal")

    def cut(self, a: str, b: str) -> None:
        """Only the link between hosts ``a`` and ``b`` fails (non-transitive connectivity)."""
        super().cut(a, b)
        self._record(KERNEL, "", f"cut {min(a, b)} {max(a, b)}")

    def connected(self, a: str, b: str) -> bool:
        """True when hosts ``a`` and ``b`` can exchange packets (a host always reaches
        itself)."""
        return a == b or super().connected(a, b)

    def latency(self) -> float:
        """One packet's one-way delay."""
        return self.rng.uniform(*self.faults.latency)

    def call(
        self,
        src: SimHost,
        dst: str,
        fn: Callable[[SimReactor], T | Deferred[T]],
        data: bytes = b"",
    ) -> Deferred[T]:
        """One request/response exchange (an RPC) from ``src`` to host ``dst``.

        The request arrives after a latency and runs ``fn(reactor)`` in ``dst``'s
        process; its result (or exception) comes back after another latency (a
        Deferred result: once it fires, as ``ConnectionLost`` if ``dst`` crashed meanwhile).  A lost
        request fails the call after ``Faults.call_timeout`` (``TimeoutError``); a
        duplicated one runs twice (a resent request; the first answer counts); a cut
        link or a host that is down fails it after a latency (``ConnectionLost``).
        The answer reaches only the boot of ``src`` that called.  ``data`` (the
        request's bytes) goes into the trace.
        """
        self.record(src, f"call> {dst}", data)
        d: Deferred[T] = Deferred()
        target = self.hosts.get(dst)
        generation = src.generation
        f = self.faults
        rng = self.rng

        def answer(result: T | Failure) -> None:
            if not d.called:
                d.callback(result)  # type: ignore[arg-type]

        def back(result: T | Failure, delay: float) -> None:
            self.at(
                self.now + delay,
                lambda: answer(result),
                host=src,
                kind=IO,
                generation=generation,
            )

        if target is None or not self.connected(src.name, dst):
            back(Failure(error.ConnectionLost(f"no route to {dst}")), rng.uniform(*f.latency))
            return d
        if f.loss and rng.random() < f.loss:
            back(Failure(error.TimeoutError(f"call to {dst} timed out")), f.call_timeout)
            return d
        copies = 2 if f.duplicate and rng.random() < f.duplicate else 1

        def arrive() -> None:
            reactor = target.reactor
            if reactor is None or not self.connected(src.name, dst):
                back(Failure(error.ConnectionLost(f"{dst} is gone")), rng.uniform(*f.latency))
                return
            self.record(target, f"call< {src.name}")
            try:
                result: T | Failure | Deferred[T] = fn(reactor)
            except Exception:
                result = Failure()
            if not isinstance(result, Deferred):
                back(result, rng.uniform(*f.latency))
                return
            served = target.generation

            def answered(late: T | Failure) -> None:
                if target.generation != served:  # dst crashed meanwhile: no answer
                    late = Failure(error.ConnectionLost(f"{dst} is gone"))
                back(late, rng.uniform(*f.latency))

            result.addBoth(answered)

        for _ in range(copies):
            self.at(self.now + rng.uniform(*f.latency), arrive, host=target, kind=IO)
        return d

    # --- the event queue --------------------------------------------------------------

    def at(
        self,
        when: float,
        fn: Callable[[], None],
        *,
        host: SimHost | None = None,
        kind: int = KERNEL,
        generation: int | None = None,
    ) -> None:
        """Run ``fn`` at true time ``when`` (on ``host``: not while it is paused; with
        ``generation``: only if the host has not crashed since)."""
        heapq.heappush(self._queue, (when, next(self._seq), (fn, host, kind, generation)))

    def run_until(self, until: float, stop: Callable[[], bool] | None = None) -> bool:
        """Advance to true time ``until``; with ``stop``, return early once it holds."""
        queue = self._queue
        while queue and queue[0][0] <= until:
            when, _, (fn, host, kind, generation) = heapq.heappop(queue)
            self.now = when
            if host is not None:
                if generation is not None and host.generation != generation:
                    continue
                if host.paused_until > when:
                    # On resume, late timers first, then what arrived meanwhile.
                    later = host.paused_until + (1e-6 if kind == IO else 0.0)
                    self.at(later, fn, host=host, kind=kind, generation=generation)
                    continue
            self.events += 1
            fn()
            if stop is not None and stop():
                return True
        self.now = max(self.now, until)
        return stop() if stop is not None else False

    def run_for(self, seconds: float, stop: Callable[[], bool] | None = None) -> bool:
        """Advance by ``seconds`` of true time."""
        return self.run_until(self.now + seconds, stop)

    def pending(self) -> int:
        """Events still queued (some may be stale)."""
        return len(self._queue)

    # --- the trace ----------------------------------------------------------------------

    def _record(self, kind: int, host: str, what: str, data: bytes = b"") -> None:
        # One update per event (the digest of the concatenation is the same).
        self._trace.update(
            b"".join((_pack_dB(self.now, kind), host.encode(), b"\0", what.encode(), b"\0", data))
        )

    def record(self, host: SimHost | None, what: str, data: bytes = b"") -> None:
        """Fold one observable step into the run's trace."""
        self._record(IO, host.name if host is not None else "", what, data)

    def trace_digest(self) -> str:
        """SHA-256 of everything that happened so far (same seed, same digest)."""
        return self._trace.hexdigest()

    # --- datagrams ---------------------------------------------------------------------

    def send_datagram(
        self, src: SimHost, src_port: int, data: bytes, addr: tuple[str, int]
    ) -> None:
        """Route one datagram from ``src`` through the fault model."""
        self.datagrams_sent += 1
        self.record(src, f"udp> {addr[0]}:{addr[1]}", data)
        dst = self.by_ip.get(addr[0])
        if dst is None or not self.connected(src.name, dst.name):
            return
        f = self.faults
        rng = self.rng
        if f.loss and rng.random() < f.loss:
            return
        copies = 2 if f.duplicate and rng.random() < f.duplicate else 1
        source = (src.ip, src_port)
        for _ in range(copies):
            delay = rng.uniform(*f.latency)
            if f.reorder and rng.random() < f.reorder:
                delay += rng.uniform(0, f.reorder_extra)
            delay += dst.rx_delay

            def deliver(dst: SimHost = dst) -> None:
                self._deliver_datagram(src, dst, addr[1], data, source)

            self.at(self.now + delay, deliver, host=dst, kind=IO)

    def _deliver_datagram(
        self, src: SimHost, dst: SimHost, port: int, data: bytes, source: tuple[str, int]
    ) -> None:
        reactor = dst.reactor
        if reactor is None or not self.connected(src.name, dst.name):
            return
        if dst.rx_loss and self.rng.random() < dst.rx_loss:
            return  # the host's socket buffer overflowed (a flood)
        if reactor.deliver_datagram(port, data, source):
            self.datagrams_delivered += 1
