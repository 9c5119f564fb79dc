"""Node-to-node RPC: AMP over TCP on the cluster address, authenticated.

Each connection starts with a mutual challenge-response keyed by the cluster's
RPC key (``Hello`` then ``Prove``), bound to the cluster's :class:`Scope` (its
name and node kind: in the key, in ``Hello`` and in both proofs); any other
command before it succeeds closes the connection.  Until a peer has proven the
key, what it may make this node buffer is capped (:class:`RpcLimits`: a few KiB
per box and per connection, a handshake deadline, a cap on handshakes in
progress); afterwards each box is still bounded.  Refusals are counted in
:class:`RpcGuard` ``stats`` and logged rate-limited, never raised.

Services register their own AMP commands in an :class:`RpcRegistry`;
:class:`RpcClient` keeps one connection per peer, times calls out and fails
them with :class:`PeerUnavailable` when the peer is down.

AMP limits each value to 64 KiB; :class:`BigBytes` splits larger payloads (mail
bodies, media blocks) over several keys of the same box, so they travel in one
round trip without extra framing.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferTimeout
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectError, ConnectionClosed, TimeoutError
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTCP, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from .._reactor import INodeReactor
from ._rpc_commands import (
    CHUNK,
    AuthFailed,
    BigBytes,
    Echo,
    Hello,
    PeerMaybeDone,
    PeerUnavailable,
    Prove,
    Unauthenticated,
    UnknownValue,
    _proof,
    may_have_run,
)
from ._rpc_guard import RpcGuard, RpcLimits, RpcRegistry
from .interfaces import IRpcCaller
from .rpcstats import RpcCallStats
from .wire import Scope

__all__ = [
    "CHUNK",
    "AuthFailed",
    "BigBytes",
    "Echo",
    "Hello",
    "NodeAMP",
    "PeerMaybeDone",
    "PeerUnavailable",
    "Prove",
    "RpcClient",
    "RpcGuard",
    "RpcLimits",
    "RpcRegistry",
    "RpcServerFactory",
    "Unauthenticated",
    "UnknownValue",
    "may_have_run",
]


class NodeAMP(amp.AMP):
    """One RPC connection (either side); commands wait for the handshake."""

    log = Logger()

    def __init__(
        self,
        registry: RpcRegistry,
        key: bytes,
        node_id: str,
        *,
        scope: Scope,
        guard: RpcGuard | None = None,
        server: bool = False,
    ) -> None:
        super().__init__()
        self.registry = registry
        self.key = key
        self.node_id = node_id
        self.scope = scope
        self.guard = guard or RpcGuard()
        self.server = server
        self.peer_id: str | None = None
        self.authenticated = False
        self._server_nonce: bytes | None = None
        self._client_nonce: bytes | None = None
        # Until the peer has proven the key: small boxes, small values, few bytes.
        self._trusted = False
        self._MAX_VALUE_LENGTH = min(0xFFFF, self.guard.limits.preauth_box)
        self._box_bytes = 0
        self._preauth_bytes = 0
        self._counted_unauthenticated = False
        self._handshake_timer: IDelayedCall | None = None
        self._dropped = False

    # --- what an unproven peer may make us hold --------------------------------------

    def connectionMade(self) -> None:
        """Servers give an unproven peer a deadline and a bounded number of slots."""
        super().connectionMade()
        if not self.server:
            return
        guard = self.guard
        if guard.unauthenticated >= guard.limits.max_unauthenticated:
            guard.refuse(self, "too_many_unauthenticated")
            return
        guard.unauthenticated += 1
        self._counted_unauthenticated = True
        if guard.clock is not None:
            self._handshake_timer = guard.clock.callLater(
                guard.limits.handshake_timeout, self._handshake_expired
            )

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if not self._trusted:
            self.guard.refuse(self, "handshake_timeout")

    def _trust(self) -> None:
        """The peer proved the key: lift the pre-authentication caps."""
        self._trusted = True
        self.__dict__.pop("_MAX_VALUE_LENGTH", None)
        self._end_unauthenticated()

    def _end_unauthenticated(self) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        if self._counted_unauthenticated:
            self._counted_unauthenticated = False
            self.guard.unauthenticated -= 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Release the handshake slot, then AMP's own clean-up."""
        self._end_unauthenticated()
        super().connectionLost(reason)

    def _account(self, n: int) -> bool:
        """Count ``n`` more buffered bytes; False (and the connection dropped) if too many."""
        limits = self.guard.limits
        self._box_bytes += n
        if self._trusted:
            if self._box_bytes > limits.max_box:
                self._drop("box_too_large")
                return False
            return True
        self._preauth_bytes += n
        if self._box_bytes > limits.preauth_box or self._preauth_bytes > limits.preauth_total:
            self._drop("unauthenticated_too_large")
            return False
        return True

    def _drop(self, why: str) -> None:
        """Refuse the connection, free the box being received and ignore the rest."""
        self._currentBox = None
        if not self._dropped:
            self._dropped = True
            self.guard.refuse(self, why)

    def proto_key(self, string: bytes) -> str:
        """A key, or the empty string that ends a box; counted against the caps."""
        if not string:
            self._box_bytes = 0
            state = str(super().proto_key(string))
            return "dropped" if self._dropped else state
        if not self._account(len(string) + self.guard.limits.entry_overhead):
            return "dropped"
        return str(super().proto_key(string))

    def proto_value(self, string: bytes) -> str:
        """A value; counted against the caps."""
        if not self._account(len(string)):
            return "dropped"
        return str(super().proto_value(string))

    def proto_dropped(self, string: bytes) -> str:
        """Whatever is still in the read buffer of a dropped connection is ignored."""
        return "dropped"

    def lengthLimitExceeded(self, length: int) -> None:
        """A length prefix above the cap (a big value before authentication)."""
        if self.state != "dropped":
            self.state = "dropped"
            self._drop("unauthenticated_too_large" if not self._trusted else "too_long")

    # --- boxes that do not fit the protocol -------------------------------------------

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        """Give AMP only boxes it can handle; any other is a counted drop, never a traceback.

        Answers and errors must match a question this side asked (a server asks none);
        an error box carries its code and description; a command carries ``_ask``
        (nodes always expect an answer) and, before the handshake, is Hello or Prove.
        """
        why = self._misfit(box)
        if why is not None:
            self._drop(why)
            return
        super().ampBoxReceived(box)

    def _misfit(self, box: amp.AmpBox) -> str | None:
        if amp.ANSWER in box or amp.ERROR in box:
            tag = box[amp.ANSWER] if amp.ANSWER in box else box[amp.ERROR]
            if tag not in self._outstandingRequests:
                return "unexpected_answer"
            if amp.ANSWER not in box and not (
                amp.ERROR_CODE in box and amp.ERROR_DESCRIPTION in box
            ):
                return "malformed_box"
            return None
        if amp.COMMAND not in box or amp.ASK not in box:
            return "malformed_box"
        if not self.authenticated and box[amp.COMMAND] not in (
            Hello.commandName,
            Prove.commandName,
        ):
            return "unauthenticated_command"
        return None

    def _wrapWithSerialization(self, aCallable: Any, command: type[amp.Command]) -> Any:
        """AMP's responder wrapper, except that arguments that do not parse drop the peer.

        (AMP would log the parse error as an unhandled failure: a traceback per box.)
        An argument that parses to a value this node does not know (:class:`UnknownValue`,
        an enum member of a newer node) gets an ``UNKNOWN_VALUE`` error answer and a
        counter; the connection stays.
        """

        def doit(box: amp.AmpBox) -> Deferred[Any]:
            try:
                kw = command.parseArguments(box, self)
            except UnknownValue as e:  # well-formed, not known here: answered, kept
                name = command.commandName.decode("ascii", "replace")  # type: ignore[union-attr]
                self.guard.note(self, "refused_unknown_value", f"{name}: {e}")
                return fail(amp.RemoteAmpError(UnknownValue.code, str(e)))
            except Exception as e:
                self._drop("malformed_arguments")
                return fail(amp.RemoteAmpError(b"MALFORMED", f"{type(e).__name__}", fatal=True))

            errors: dict[type[Exception], bytes] = command.allErrors  # type: ignore[attr-defined]

            def known_errors(error: Failure) -> Failure:
                key = error.trap(*errors)
                return Failure(
                    amp.RemoteAmpError(
                        errors[key],
                        str(error.value),
                        key in command.fatalErrors,
                        local=error,
                    )
                )

            def respond(objects: Any) -> Any:
                try:
                    return command.makeResponse(objects, self)
                except BaseException as e:
                    raise amp.BadLocalReturn(
                        f"{aCallable!r} returned {objects!r} and {command!r} could not "
                        "serialize it",
                        Failure(),
                    ) from e

            return maybeDeferred(aCallable, **kw).addCallback(respond).addErrback(known_errors)

        return doit

    # --- the handshake ---------------------------------------------------------------

    def _check_scope(self, cluster: str, kind: str, who: str) -> None:
        if (cluster, kind) != (self.scope.cluster, self.scope.kind):
            self.guard.stats["refused_wrong_scope"] += 1
            raise AuthFailed(f"{who} belongs to {kind}/{cluster}, not {self.scope}")

    @Hello.responder
    def _hello(self, node_id: str, nonce: bytes, cluster: str, kind: str) -> dict[str, Any]:
        self._check_scope(cluster, kind, f"peer {node_id!r}")
        if len(nonce) != 32:
            raise AuthFailed("bad nonce")
        self._client_nonce = nonce
        self._server_nonce = os.urandom(32)
        self.peer_id = node_id
        proof = _proof(self.key, self.scope, b"server", nonce, self._server_nonce, self.node_id)
        return {
            "node_id": self.node_id,
            "nonce": self._server_nonce,
            "proof": proof,
            "cluster": self.scope.cluster,
            "kind": self.scope.kind,
        }

    @Prove.responder
    def _prove(self, proof: bytes) -> dict[str, Any]:
        if self._server_nonce is None or self._client_nonce is None or self.peer_id is None:
            raise AuthFailed("Prove before Hello")
        want = _proof(
            self.key, self.scope, b"client", self._server_nonce, self._client_nonce, self.peer_id
        )
        if not hmac.compare_digest(want, proof):
            self.guard.note(self, "refused_bad_proof", f"bad proof for {self.peer_id!r}")
            raise AuthFailed("bad proof")
        self.authenticated = True
        self._trust()
        return {}

    def locateResponder(self, name: bytes) -> Any:
        """Built-in handshake commands, else registered ones once authenticated."""
        if name in (Hello.commandName, Prove.commandName):
            return super().locateResponder(name)
        if not self.authenticated:
            self._drop("unauthenticated_command")
            return None
        found = self.registry.lookup(name)
        if found is None:
            self.guard.note(self, "refused_unknown_command", f"unknown command {name!r}")
            return None
        command, handler = found
        return self._wrapWithSerialization(handler, command)

    def authenticate(self) -> Deferred[NodeAMP]:
        """Client side of the handshake; fires with self once both sides are proven."""
        nonce = os.urandom(32)

        def got_hello(resp: dict[str, Any]) -> Deferred[Any]:
            self._check_scope(resp["cluster"], resp["kind"], f"peer {resp['node_id']!r}")
            want = _proof(self.key, self.scope, b"server", nonce, resp["nonce"], resp["node_id"])
            if not hmac.compare_digest(want, resp["proof"]):
                raise AuthFailed(f"peer {resp['node_id']!r} does not know the cluster secret")
            self.peer_id = resp["node_id"]
            self._trust()
            proof = _proof(self.key, self.scope, b"client", resp["nonce"], nonce, self.node_id)
            return self.callRemote(Prove, proof=proof)

        # A fresh Deferred: AMP appends its own errback to callRemote's Deferred
        # when the answer arrives, which would swallow our AuthFailed.
        d: Deferred[Any] = Deferred()
        hello = self.callRemote(
            Hello,
            node_id=self.node_id,
            nonce=nonce,
            cluster=self.scope.cluster,
            kind=self.scope.kind,
        )
        hello.addCallbacks(d.callback, d.errback)
        d.addCallback(got_hello)
        d.addCallback(lambda _: self)
        return d


class RpcServerFactory(Factory):
    """Accepts RPC connections for this node."""

    def __init__(
        self,
        registry: RpcRegistry,
        key: bytes,
        node_id: str,
        *,
        scope: Scope,
        guard: RpcGuard | None = None,
    ) -> None:
        self.registry = registry
        self.key = key
        self.node_id = node_id
        self.scope = scope
        self.guard = guard or RpcGuard()

    def buildProtocol(self, addr: IAddress | None) -> NodeAMP:
        """A connection that must authenticate before anything else."""
        return NodeAMP(
            self.registry, self.key, self.node_id, scope=self.scope, guard=self.guard, server=True
        )


class _ClientFactory(Factory):
    def __init__(self, client: RpcClient) -> None:
        self.client = client

    def buildProtocol(self, addr: IAddress | None) -> NodeAMP:
        c = self.client
        return NodeAMP(c.registry, c.key, c.node_id, scope=c.scope, guard=c.guard)


@implementer(IRpcCaller)
class RpcClient:
    """Calls commands on peers by cluster address, one pooled connection each."""

    log = Logger()

    def __init__(
        self,
        reactor: INodeReactor,
        key: bytes,
        node_id: str,
        *,
        scope: Scope,
        registry: RpcRegistry | None = None,
        guard: RpcGuard | None = None,
        timeout: float = 10.0,
        connect_timeout: float = 3.0,
        endpoint_for: Callable[[str], Any] | None = None,
    ) -> None:
        self.reactor = reactor
        self.key = key
        self.node_id = node_id
        self.scope = scope
        self.guard = guard or RpcGuard()
        self.registry = registry or RpcRegistry()
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._endpoint_for = endpoint_for or self._tcp_endpoint
        self._ready: dict[str, NodeAMP] = {}
        self._connecting: dict[str, list[Deferred[NodeAMP]]] = {}
        #: Calls, failures and latencies by command (``GET /metrics``).
        self.calls = RpcCallStats()
        #: Told the address of a peer whose call or connection timed out (the node
        #: feeds it to the failure detector's suspicion).
        self.on_timeout: Callable[[str], None] | None = None

    def _tcp_endpoint(self, address: str) -> Any:
        host, _, port = address.rpartition(":")
        reactor: IReactorTCP = self.reactor
        return TCP4ClientEndpoint(reactor, host, int(port), timeout=int(self.connect_timeout))

    def _connection(self, address: str) -> Deferred[NodeAMP]:
        proto = self._ready.get(address)
        if proto is not None:
            transport = proto.transport
            if transport is not None and getattr(transport, "connected", False):
                return succeed(proto)
            del self._ready[address]
        waiter: Deferred[NodeAMP] = Deferred()
        waiters = self._connecting.get(address)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._connecting[address] = [waiter]
        d = self._endpoint_for(address).connect(_ClientFactory(self))
        d.addCallback(lambda p: p.authenticate())

        def done(result: NodeAMP | Failure) -> None:
            pending = self._connecting.pop(address, [])
            if isinstance(result, Failure):
                for w in pending:
                    w.errback(result)
            else:
                self._ready[address] = result
                for w in pending:
                    w.callback(result)

        d.addBoth(done)
        return waiter

    def call(self, address: str, command: type[amp.Command], **kwargs: Any) -> Deferred[Any]:
        """Run ``command`` on the node at ``address``; fails with PeerUnavailable if down."""
        clock: IReactorTime = self.reactor

        sent = False

        def on_connected(proto: NodeAMP) -> Deferred[Any]:
            nonlocal sent
            sent = True
            return proto.callRemote(command, **kwargs)

        def translate(f: Failure) -> Failure:
            if f.check(ConnectError, ConnectionClosed, TimeoutError, DeferTimeout, CancelledError):
                self._drop(address)
                if self.on_timeout is not None and f.check(TimeoutError, DeferTimeout):
                    self.on_timeout(address)
                kind = PeerMaybeDone if sent else PeerUnavailable
                err = kind(f"{address}: {f.getErrorMessage()}")
                return Failure(err)
            if f.check(AuthFailed):
                self._drop(address)
            return f

        started = clock.seconds()
        d = maybeDeferred(self._connection, address).addCallback(on_connected)
        d.addTimeout(self.timeout, clock)
        d.addErrback(translate)
        name = command.commandName.decode("ascii", "replace")  # type: ignore[union-attr]
        return d.addBoth(
            lambda r: self.calls.observe(r, name, clock.seconds() - started, PeerUnavailable)
        )

    def _drop(self, address: str) -> None:
        proto = self._ready.pop(address, None)
        if proto is not None and proto.transport is not None:
            proto.transport.loseConnection()

    def close(self) -> None:
        """Close every pooled connection."""
        for address in list(self._ready):
            self._drop(address)
