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

import hashlib
import hmac
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferTimeout
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectError, ConnectionClosed, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from .interfaces import IRpcCaller
from .rpcstats import RpcCallStats
from .wire import Scope

CHUNK = 0xFFFF


class BigBytes(amp.Argument):
    """Bytes of any length, split over keys ``name``, ``name.1``, ``name.2``..."""

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        value = objects.pop(name.decode("ascii"))
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"{name!r} must be bytes")
        value = bytes(value)
        chunks = [value[i : i + CHUNK] for i in range(0, len(value), CHUNK)] or [b""]
        strings[name] = chunks[0]
        if len(chunks) > 1:
            strings[name + b".n"] = str(len(chunks)).encode("ascii")
            for i, chunk in enumerate(chunks[1:], 1):
                strings[name + b".%d" % i] = chunk

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        """Join the chunks; a missing chunk or a bad count is :class:`amp.MalformedAmpBox`."""
        try:
            parts = [strings.pop(name)]
            count = int(strings.pop(name + b".n", b"1"))
        except (KeyError, ValueError) as e:
            raise amp.MalformedAmpBox(f"bad or missing {name!r}") from e
        if not 1 <= count <= 100_000:
            raise amp.MalformedAmpBox(f"bad chunk count for {name!r}")
        for i in range(1, count):
            chunk = strings.pop(name + b".%d" % i, None)
            if chunk is None:
                raise amp.MalformedAmpBox(f"chunk {i} of {count} of {name!r} missing")
            parts.append(chunk)
        objects[name.decode("ascii")] = b"".join(parts)


class AuthFailed(Exception):
    """The peer does not know the cluster secret."""


class Unauthenticated(Exception):
    """A command arrived before the connection was authenticated."""


class PeerUnavailable(Exception):
    """The peer could not be reached or did not answer in time.

    ``maybe_done``: the request had been sent when the call failed (a timeout or a
    connection lost while waiting), so the peer may have run it, or may still run
    it when TCP delivers the request late (after a partition heals): a caller must
    not redo a non-idempotent request elsewhere (issue 14: a store retried on a
    second node listed a message twice).
    """

    maybe_done = False


class Hello(amp.Command):
    """Step 1 of the handshake: the client's id and nonce; the server proves itself."""

    commandName = b"yimaporc.hello"

    arguments = [
        (b"node_id", amp.Unicode()),
        (b"nonce", amp.String()),
        (b"cluster", amp.Unicode()),
        (b"kind", amp.Unicode()),
    ]
    response = [
        (b"node_id", amp.Unicode()),
        (b"nonce", amp.String()),
        (b"proof", amp.String()),
        (b"cluster", amp.Unicode()),
        (b"kind", amp.Unicode()),
    ]
    errors = {AuthFailed: b"AUTH_FAILED"}
    fatalErrors = {AuthFailed: b"AUTH_FAILED"}


class Prove(amp.Command):
    """Step 2 of the handshake: the client proves it knows the key."""

    commandName = b"yimaporc.prove"

    arguments = [(b"proof", amp.String())]
    response = []  # type: ignore[var-annotated]
    errors = {AuthFailed: b"AUTH_FAILED"}
    fatalErrors = {AuthFailed: b"AUTH_FAILED"}


class Echo(amp.Command):
    """Round-trip check; returns its payload (any size)."""

    commandName = b"yimaporc.echo"

    arguments = [(b"payload", BigBytes())]
    response = [(b"payload", BigBytes())]


def _proof(key: bytes, scope: Scope, role: bytes, a: bytes, b: bytes, node_id: str) -> bytes:
    where = f"{scope.kind}\0{scope.cluster}".encode("ascii")
    msg = role + b"|" + where + b"|" + a + b"|" + b + b"|" + node_id.encode("utf-8")
    return hmac.new(key, msg, hashlib.sha256).digest()


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
        """

        def doit(box: amp.AmpBox) -> Deferred[Any]:
            try:
                kw = command.parseArguments(box, self)
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

    def buildProtocol(self, addr: Any) -> NodeAMP:
        """A connection that must authenticate before anything else."""
        return NodeAMP(
            self.registry, self.key, self.node_id, scope=self.scope, guard=self.guard, server=True
        )


class _ClientFactory(Factory):
    def __init__(self, client: RpcClient) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> NodeAMP:
        c = self.client
        return NodeAMP(c.registry, c.key, c.node_id, scope=c.scope, guard=c.guard)


@implementer(IRpcCaller)
class RpcClient:
    """Calls commands on peers by cluster address, one pooled connection each."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
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
                err = PeerUnavailable(f"{address}: {f.getErrorMessage()}")
                err.maybe_done = sent
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
