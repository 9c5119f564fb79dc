"""The channel between a Porcupine node's main process and its mail workers
(``--mail-workers N``, :mod:`._mailworkers`): AMP over a unix socket in the data dir.

The channel is a :class:`~yimaporc.cluster.rpc.NodeAMP` keyed not by the cluster
secret but by a random token the main process gives each worker in its environment
(:data:`TOKEN_ENV`): the worker proves it knows it with the same challenge-response
as nodes (``Hello``/``Prove``), under its own :data:`SCOPE`, so nothing but the main's
own children gets an answer; the same guard bounds and counts whatever else arrives
(a garbage line is a counted drop, never a traceback).

A worker calls the main with the cluster's own manager commands (``porcupine.um.*``,
``porcupine.mb.*``) through the cluster's remote stubs; a mailbox command carries one
more key, :data:`NODE_KEY`, naming the node whose mailbox manager it is for (the main
answers its own, forwards the others over its cluster RPC). Errors a cluster call can
end with that the command does not declare (the peer down) cross as
:data:`FORWARD_ERRORS`. The worker-only commands are below (``porcupine.wk.*``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.protocols import amp
from twisted.python.failure import Failure

from ..cluster.rpc import BigBytes, NodeAMP, PeerMaybeDone, PeerUnavailable
from ..cluster.wire import Scope
from ._cluster_wire import ERRORS, Json

__all__ = [
    "FORWARD_ERRORS",
    "NODE_KEY",
    "SCOPE",
    "TOKEN_ENV",
    "MainChannel",
    "WkBoxOps",
    "WkChanged",
    "WkLive",
    "WkReplicaStore",
    "WkShown",
    "WkStats",
    "call_on",
]

#: The environment variable holding the channel's key (hex), set by the main process.
TOKEN_ENV = "YIMAPORC_MAILWORKER_TOKEN"
#: The scope both ends prove (never a cluster's: a node cannot pose as a worker).
SCOPE = Scope("mailworkers", "porcupine-worker")
#: The extra box key of a mailbox command: the node it is meant for.
NODE_KEY = b"_node"
#: Failures of a forwarded call that cross the channel by code, whatever the command.
FORWARD_ERRORS: dict[type[Exception], bytes] = {
    PeerMaybeDone: b"WK_PEER_MAYBE_DONE",
    PeerUnavailable: b"WK_PEER_UNAVAILABLE",
}
_REVERSE = {code: kind for kind, code in FORWARD_ERRORS.items()}
#: Seconds a worker waits for the main's answer (the main's own calls to other nodes
#: time out sooner: this bounds a stalled main).
CALL_TIMEOUT = 30.0
#: The code of an unexpected failure in the main (the worker sees UnknownRemoteError).
INTERNAL = b"WK_INTERNAL"


class _Wk(amp.Command):
    errors = ERRORS  # type: ignore[assignment]


class WkShown(_Wk):
    """Worker -> main: ``ILocalMailboxes.shown`` of the main (the UIDNEXT shown)."""

    commandName = b"porcupine.wk.shown"
    arguments = [(b"user", amp.Unicode()), (b"marks", Json())]
    response = [(b"marks", Json())]


class WkChanged(_Wk):
    """Either way: a mailbox of ``user`` may have changed (wakes IDLE, EXPUNGE notices)."""

    commandName = b"porcupine.wk.changed"
    arguments = [(b"user", amp.Unicode()), (b"mailbox", amp.Unicode())]


class WkLive(_Wk):
    """Main -> worker: the live members (for the home of a user and the IMAP poll)."""

    commandName = b"porcupine.wk.live"
    arguments = [(b"nodes", amp.ListOf(amp.Unicode()))]


class WkStats(_Wk):
    """Worker -> main, every few seconds: its sessions, client errors and login
    throttle counters (the node's status adds them to its own)."""

    commandName = b"porcupine.wk.stats"
    arguments = [(b"stats", Json())]


class WkReplicaStore(_Wk):
    """Worker -> main: ``MailReplication.store`` (APPEND/COPY of a replicated user)."""

    commandName = b"porcupine.wk.replica_store"
    arguments = [
        (b"nodes", amp.ListOf(amp.Unicode())),
        (b"message", BigBytes()),  # pack_messages of one
        (b"replicas", amp.Integer()),
    ]
    response = [(b"digests", Json())]


class WkBoxOps(_Wk):
    """Worker -> main: ``MailReplication.box_ops`` (mailbox changes of a replicated user)."""

    commandName = b"porcupine.wk.box_ops"
    arguments = [(b"user", amp.Unicode()), (b"ops", Json()), (b"nodes", Json())]


class MainChannel(NodeAMP):
    """The main process's end of one worker's channel: a manager command is answered
    by the registry of the node its :data:`NODE_KEY` names (``registry_for``), any
    other by the channel's own; forwarded failures cross as :data:`FORWARD_ERRORS`."""

    def __init__(self, *a: Any, registry_for: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._registry_for = registry_for
        self._target: str | None = None
        self.on_lost: Any = None
        #: The connection is gone.
        self.closed = False
        #: Commands answered, by name (shared by the owner's channels).
        self.calls: Counter[str] = Counter()

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        """Note the box's target node (if any) for :meth:`locateResponder`, then AMP."""
        target = box.pop(NODE_KEY, None)
        try:
            self._target = target.decode("utf-8") if target is not None else None
        except UnicodeDecodeError:
            self._drop("malformed_node")
            return
        super().ampBoxReceived(box)

    def locateResponder(self, name: bytes) -> Any:
        """The handshake, then the target node's registry (or the channel's own)."""
        target, self._target = self._target, None
        if target is None or name in (b"Hello", b"Prove") or not self.authenticated:
            return super().locateResponder(name)
        registry = self._registry_for(target)
        if registry is None:
            self.guard.note(self, "refused_unknown_node", f"unknown node {target!r}")
            return None
        found = registry.lookup(name)
        if found is None:
            self.guard.note(self, "refused_unknown_command", f"unknown command {name!r}")
            return None
        command, handler = found
        return self._wrapWithSerialization(handler, command)

    def _wrapWithSerialization(self, aCallable: Any, command: type[amp.Command]) -> Any:
        inner = super()._wrapWithSerialization(aCallable, command)
        name = command.commandName.decode("ascii", "replace")  # type: ignore[union-attr]

        def doit(box: amp.AmpBox) -> Deferred[Any]:
            self.calls[name] += 1

            def forwarded(f: Failure) -> Failure:
                if f.check(amp.RemoteAmpError):  # the command's own errors
                    return f
                key = f.check(*FORWARD_ERRORS)
                if key is not None:
                    return Failure(amp.RemoteAmpError(FORWARD_ERRORS[key], str(f.value)))
                # Anything else: logged here, an error answer there; the channel (and
                # every session of the worker) stays.
                self.guard.stats["internal_errors"] += 1
                self.log.failure("mail worker call {name}", f, name=command.commandName)
                return Failure(amp.RemoteAmpError(INTERNAL, f.getErrorMessage()))

            d: Deferred[Any] = inner(box)
            return d.addErrback(forwarded)

        return doit

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """AMP's clean-up, then tell the owner."""
        self.closed = True
        super().connectionLost(reason)
        if self.on_lost is not None:
            self.on_lost(self)


def call_on(
    proto: amp.AMP | None,
    node: str | None,
    command: type[amp.Command],
    /,
    *,
    clock: IReactorTime | None = None,
    timeout: float = CALL_TIMEOUT,
    **kw: Any,
) -> Deferred[Any]:
    """Send ``command`` over ``proto`` (``node``: the mailbox manager it is for) and
    parse the answer as ``callRemote`` would, with :data:`FORWARD_ERRORS` mapped back
    to their exceptions; no channel: :class:`PeerUnavailable`; no answer within
    ``timeout`` s (with a ``clock``): :class:`PeerMaybeDone`."""
    if proto is None or proto.transport is None:
        return fail(PeerUnavailable("the node's main process is not reachable"))
    box = command.makeArguments(kw, proto)
    if node is not None:
        box[NODE_KEY] = node.encode("utf-8")
    sent: Deferred[Any] = proto._sendBoxCommand(command.commandName, box)
    reverse: dict[bytes, type[Exception]] = command.reverseErrors  # type: ignore[attr-defined]

    def massage(f: Failure) -> Failure:
        err = f.value
        if isinstance(err, amp.RemoteAmpError):
            code = err.errorCode
            kind = _REVERSE.get(code) or reverse.get(code) or amp.UnknownRemoteError
            return Failure(kind(err.description))
        if f.check(*_LOST):
            return Failure(PeerMaybeDone(f"main process: {f.getErrorMessage()}"))
        return f

    # A fresh Deferred: AMP appends its own errback to the one it made when the answer
    # arrives (an error still unhandled there would drop the channel).
    out: Deferred[Any] = Deferred()

    def relay(result: Any) -> None:
        if not out.called:  # (timed out already: a late answer is dropped)
            (out.errback if isinstance(result, Failure) else out.callback)(result)

    sent.addBoth(relay)
    if clock is not None:
        out.addTimeout(timeout, clock)
    return out.addCallback(command.parseResponse, proto).addErrback(massage)


def _lost() -> tuple[type[Exception], ...]:
    from twisted.internet.defer import CancelledError, TimeoutError
    from twisted.internet.error import ConnectionClosed

    return (ConnectionClosed, TimeoutError, CancelledError)


_LOST = _lost()
