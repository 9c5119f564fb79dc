"""What an RPC connection may cost before and after the handshake (:class:`RpcLimits`,
:class:`RpcGuard`), and the commands services answer (:class:`RpcRegistry`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols import amp

from ._rpc_commands import Echo, Hello, Prove

if TYPE_CHECKING:
    from .rpc import NodeAMP


@attrs.frozen
class RpcLimits:
    """What one RPC connection may make this node buffer (bytes, seconds, counts).

    ``preauth_box`` and ``preauth_total`` bound a connection whose peer has not
    yet proven the cluster key (the handshake boxes are ~200 bytes);
    ``max_box`` bounds any box afterwards (the largest mail fetch or media block
    batch plus AMP framing); each key/value pair counts ``entry_overhead`` extra
    bytes for the Python objects that hold it.
    """

    preauth_box: int = 4096
    preauth_total: int = 16384
    max_box: int = 256 << 20
    entry_overhead: int = 128
    handshake_timeout: float = 10.0
    max_unauthenticated: int = 128


class RpcGuard:
    """Limits, counters and the rate-limited warning shared by a node's RPC connections."""

    log = Logger()

    def __init__(self, clock: IReactorTime | None = None, limits: RpcLimits | None = None) -> None:
        self.clock = clock
        self.limits = limits or RpcLimits()
        self.stats: Counter[str] = Counter()
        self.unauthenticated = 0
        self._last_warning = -1e9

    def note(self, proto: NodeAMP, counter: str, what: str) -> None:
        """Count ``counter`` and warn ``what`` (one line, at most every 5 s for the node)."""
        self.stats[counter] += 1
        now = self.clock.seconds() if self.clock is not None else 0.0
        if self.clock is None or now - self._last_warning >= 5.0:
            self._last_warning = now
            peer = proto.transport.getPeer() if proto.transport is not None else None
            self.log.warn(
                "rpc: {what} from {peer} ({count} so far)",
                what=what,
                peer=peer,
                count=self.stats[counter],
            )

    def refuse(self, proto: NodeAMP, why: str) -> None:
        """Count ``why``, warn (at most every 5 s) and drop ``proto``'s connection now."""
        self.note(proto, "dropped_" + why, f"dropped connection: {why}")
        transport = proto.transport
        if transport is not None:
            abort = getattr(transport, "abortConnection", None)
            if abort is not None:
                abort()
            else:
                transport.loseConnection()


class RpcRegistry:
    """Commands this node answers, by AMP command name."""

    def __init__(self) -> None:
        self._handlers: dict[bytes, tuple[type[amp.Command], Callable[..., Any]]] = {}
        self.register(Echo, lambda payload: {"payload": payload})

    def register(self, command: type[amp.Command], handler: Callable[..., Any]) -> None:
        """Answer ``command`` with ``handler(**arguments)`` (a dict or a Deferred of one)."""
        name = command.commandName
        assert isinstance(name, bytes)
        if name in self._handlers or name in (Hello.commandName, Prove.commandName):
            raise ValueError(f"command {name!r} registered twice (or reserved)")
        self._handlers[name] = (command, handler)

    def lookup(self, name: bytes) -> tuple[type[amp.Command], Callable[..., Any]] | None:
        """The command class and handler registered under ``name``."""
        return self._handlers.get(name)
