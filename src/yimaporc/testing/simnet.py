"""The network of the test harnesses: nodes on one :class:`~yimaporc.sim.kernel.SimKernel`.

A harness (a few shells wired by hand, views committed by the test) gives each node a
host of one seeded kernel: the node's clock is that host's reactor, and its RPCs are
the kernel's request/response calls (:meth:`SimKernel.call`), optionally through an
AMP command's encoding (:meth:`SimNet.amp_call`).  Nothing runs until the kernel
does: :meth:`SimNet.flush` runs what is due now, :meth:`SimNet.advance` moves time,
:meth:`SimNet.result_of` runs until a Deferred fires (at most ``within`` seconds).

Cut-off nodes and sides of a partition (:meth:`SimNet.set_topology`) are kernel
partitions, so a call across one fails as the kernel fails it (``ConnectionLost``,
seen by the caller as :class:`~yimaporc.cluster.rpc.PeerUnavailable`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.protocols import amp
from twisted.python.failure import Failure

from ..cluster.rpc import NodeAMP, PeerMaybeDone, PeerUnavailable, RpcRegistry
from ..cluster.wire import Scope
from ..sim.kernel import Faults, SimHost, SimKernel
from ..sim.reactor import SimReactor

__all__ = ["T0", "SimNet", "Watched", "authenticated_end"]

#: Where the harnesses' clocks start (true time of the kernel; hosts have no skew).
T0 = 1_700_000_000.0

#: What :meth:`SimNet.amp_call` looks up: a command name to (served command, handler).
Lookup = Callable[[bytes], tuple[type[amp.Command], Callable[..., Any]] | None]


def _peer_error(f: Failure, dst: str) -> Failure:
    """A kernel's failed call as the cluster RPC layer reports it."""
    if f.check(error.ConnectionLost):
        return Failure(PeerUnavailable(f"{dst}: {f.getErrorMessage()}"))
    if f.check(error.TimeoutError):
        return Failure(PeerMaybeDone(f"{dst}: {f.getErrorMessage()}"))
    return f


def authenticated_end(node_id: str, peer_id: str) -> NodeAMP:
    """``node_id``'s end of an RPC connection whose handshake proved ``peer_id``."""
    end = NodeAMP(RpcRegistry(), b"", node_id, scope=Scope("sim", "node"), server=True)
    end.peer_id, end.authenticated = peer_id, True
    return end


class _RemoteError(Exception):
    """A handler's error, made into what the caller's command declares (wrapped so it is
    not taken for a network failure on the way back)."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.getErrorMessage())
        self.failure = failure


class SimNet:
    """One seeded kernel whose time starts at ``start``, a host per node, RPC through it.

    ``latency`` is every message's one-way delay (zero: a call and its answer happen at
    the instant it is made, once the kernel runs).
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        latency: float = 0.0,
        start: float = T0,
        disk_root: Path | None = None,
    ) -> None:
        faults = Faults(latency=(latency, latency), disk_latency=(0.0, 0.0))
        self.kernel = SimKernel(seed, faults=faults, disk_root=disk_root)
        self.kernel.run_until(start)

    # --- hosts -------------------------------------------------------------------------

    def host(self, name: str) -> SimHost:
        """The host ``name``, added and booted on first use."""
        host = self.kernel.hosts.get(name)
        if host is None:
            n = len(self.kernel.hosts) + 1
            host = self.kernel.add_host(name, f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
        if not host.up:
            self.kernel.boot(host)
        return host

    def reactor(self, name: str) -> SimReactor:
        """The reactor of ``name``'s current boot."""
        reactor = self.host(name).reactor
        assert reactor is not None
        return reactor

    def set_topology(self, down: Iterable[str] = (), sides: Iterable[set[str]] = ()) -> None:
        """Cut off every host in ``down``; hosts on different sides (a host is on the
        side of the sets holding it) cannot talk.  Nothing given: one network."""
        down, sides = set(down), list(sides)
        if not down and not sides:
            self.kernel.heal()
            return
        groups: dict[tuple[bool, ...], list[str]] = {}
        for name in self.kernel.hosts:
            if name not in down:
                groups.setdefault(tuple(name in s for s in sides), []).append(name)
        self.kernel.heal()
        self.kernel.partition(*groups.values())

    # --- time --------------------------------------------------------------------------

    def seconds(self) -> float:
        """The time every host's clock shows."""
        return self.kernel.now

    def flush(self) -> None:
        """Run everything due now (with zero latency: every call made, answered)."""
        self.kernel.run_until(self.kernel.now)

    def advance(self, seconds: float) -> None:
        """Run the kernel ``seconds`` on."""
        self.flush()
        self.kernel.run_for(seconds)

    def fired(self, d: Deferred[Any]) -> bool:
        """Has ``d`` fired once what is due now ran?"""
        self.flush()
        return bool(d.called)

    def result_of(self, d: Deferred[Any], within: float = 0.0) -> Any:
        """The result of ``d`` (its failure raised), running the kernel until it fires;
        fail if it has not within ``within`` simulated seconds (0: by now)."""
        out: list[Any] = []

        def keep(result: Any) -> Any:
            out.append(result)
            return None if isinstance(result, Failure) else result

        d.addBoth(keep)
        if not out:
            self.kernel.run_for(within, lambda: bool(out))
        assert out, f"Deferred has not fired within {within} s"
        if isinstance(out[0], Failure):
            out[0].raiseException()
        return out[0]

    # --- calls -------------------------------------------------------------------------

    def call(
        self, src: str, dst: str, fn: Callable[[SimReactor], Any], data: bytes = b""
    ) -> Deferred[Any]:
        """``fn(reactor)`` run on ``dst`` by a kernel call from ``src`` (a failed call is
        PeerUnavailable; a lost answer PeerMaybeDone)."""
        d = self.kernel.call(self.host(src), dst, fn, data)
        return d.addErrback(_peer_error, dst)

    def amp_call(
        self,
        src: str,
        dst: str,
        lookup: Lookup,
        command: type[amp.Command],
        kw: dict[str, Any],
        box: amp.AmpBox | None = None,
        proto: Any = None,
    ) -> Deferred[Any]:
        """``command`` with arguments ``kw`` from ``src`` to ``dst``, as over AMP: the
        callee parses the box with its own command class (``lookup``; a malformed box
        is an error answer) and makes the answer with it, the caller parses that; an
        error becomes one ``command`` declares or ``UnknownRemoteError``.  ``box``: the
        encoded arguments when the caller made them already; ``proto``: the callee's
        end of the connection (:func:`authenticated_end`), for arguments taken from it."""
        if box is None:
            box = command.makeArguments(kw, None)

        def serve(reactor: SimReactor) -> Deferred[Any]:
            found = lookup(command.commandName)  # type: ignore[arg-type]
            assert found is not None, command.commandName
            served, handler = found
            d = maybeDeferred(lambda: handler(**served.parseArguments(box, proto)))

            def err(f: Failure) -> Failure:
                for cls in command.allErrors:  # type: ignore[attr-defined]
                    if f.check(cls):
                        return Failure(_RemoteError(Failure(cls(str(f.value)))))
                return Failure(_RemoteError(Failure(amp.UnknownRemoteError(f.getErrorMessage()))))

            return d.addCallbacks(lambda resp: served.makeResponse(resp, proto), err)

        def unwrap(f: Failure) -> Failure:
            return f.value.failure if isinstance(f.value, _RemoteError) else f

        d = self.call(src, dst, serve, box.serialize())
        return d.addCallbacks(lambda resp: command.parseResponse(resp, None), unwrap)


class Watched(set[str]):
    """A set of names that calls ``changed(self)`` after each change in place (a
    harness's cut-off nodes, kept as kernel topology)."""

    def __init__(self, changed: Callable[[set[str]], None], names: Iterable[str] = ()) -> None:
        super().__init__(names)
        self._changed = changed

    def add(self, name: str) -> None:
        super().add(name)
        self._changed(self)

    def discard(self, name: object) -> None:
        super().discard(name)
        self._changed(self)

    def remove(self, name: str) -> None:
        super().remove(name)
        self._changed(self)

    def clear(self) -> None:
        super().clear()
        self._changed(self)

    def update(self, *others: Iterable[str]) -> None:
        super().update(*others)
        self._changed(self)

    def difference_update(self, *others: Iterable[Any]) -> None:
        super().difference_update(*others)
        self._changed(self)

    def __ior__(self, other: Any) -> Watched:  # type: ignore[override,misc]
        self.update(other)
        return self

    def __isub__(self, other: Any) -> Watched:  # type: ignore[override,misc]
        self.difference_update(other)
        return self
