"""Node-to-node RPC: AMP over TCP on the cluster address, authenticated.

Each connection starts with a mutual challenge-response keyed by the cluster's
RPC key (``Hello`` then ``Prove``); until it succeeds the server answers every
other command with ``UNAUTHENTICATED`` and closes.  Services register their
own AMP commands in an :class:`RpcRegistry`; :class:`RpcClient` keeps one
connection per peer, times calls out and fails them with
:class:`PeerUnavailable` when the peer is down.

AMP limits each value to 64 KiB; :class:`BigBytes` splits larger payloads (mail
bodies, media blocks) over several keys of the same box, so they travel in one
round trip without extra framing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferTimeout
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectError, ConnectionClosed, TimeoutError
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

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
        parts = [strings.pop(name)]
        count = int(strings.pop(name + b".n", b"1"))
        if not 1 <= count <= 100_000:
            raise amp.MalformedAmpBox(f"bad chunk count for {name!r}")
        parts.extend(strings.pop(name + b".%d" % i) for i in range(1, count))
        objects[name.decode("ascii")] = b"".join(parts)


class AuthFailed(Exception):
    """The peer does not know the cluster secret."""


class Unauthenticated(Exception):
    """A command arrived before the connection was authenticated."""


class PeerUnavailable(Exception):
    """The peer could not be reached or did not answer in time."""


class Hello(amp.Command):
    """Step 1 of the handshake: the client's id and nonce; the server proves itself."""

    commandName = b"yimaporc.hello"

    arguments = [(b"node_id", amp.Unicode()), (b"nonce", amp.String())]
    response = [(b"node_id", amp.Unicode()), (b"nonce", amp.String()), (b"proof", amp.String())]
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


def _proof(key: bytes, role: bytes, a: bytes, b: bytes, node_id: str) -> bytes:
    msg = role + b"|" + a + b"|" + b + b"|" + node_id.encode("utf-8")
    return hmac.new(key, msg, hashlib.sha256).digest()


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

    def __init__(self, registry: RpcRegistry, key: bytes, node_id: str) -> None:
        super().__init__()
        self.registry = registry
        self.key = key
        self.node_id = node_id
        self.peer_id: str | None = None
        self.authenticated = False
        self._server_nonce: bytes | None = None
        self._client_nonce: bytes | None = None

    @Hello.responder
    def _hello(self, node_id: str, nonce: bytes) -> dict[str, Any]:
        if len(nonce) != 32:
            raise AuthFailed("bad nonce")
        self._client_nonce = nonce
        self._server_nonce = os.urandom(32)
        self.peer_id = node_id
        proof = _proof(self.key, b"server", nonce, self._server_nonce, self.node_id)
        return {"node_id": self.node_id, "nonce": self._server_nonce, "proof": proof}

    @Prove.responder
    def _prove(self, proof: bytes) -> dict[str, Any]:
        if self._server_nonce is None or self._client_nonce is None or self.peer_id is None:
            raise AuthFailed("Prove before Hello")
        want = _proof(self.key, b"client", self._server_nonce, self._client_nonce, self.peer_id)
        if not hmac.compare_digest(want, proof):
            self.log.warn("rpc: peer {peer} failed authentication", peer=self.peer_id)
            raise AuthFailed("bad proof")
        self.authenticated = True
        return {}

    def locateResponder(self, name: bytes) -> Any:
        """Built-in handshake commands, else registered ones once authenticated."""
        if name in (Hello.commandName, Prove.commandName):
            return super().locateResponder(name)
        if not self.authenticated:
            self.log.warn("rpc: {name} before authentication; closing", name=name)
            self.transport.loseConnection()  # type: ignore[union-attr]
            return None
        found = self.registry.lookup(name)
        if found is None:
            return None
        command, handler = found
        return self._wrapWithSerialization(handler, command)

    def authenticate(self) -> Deferred[NodeAMP]:
        """Client side of the handshake; fires with self once both sides are proven."""
        nonce = os.urandom(32)

        def got_hello(resp: dict[str, Any]) -> Deferred[Any]:
            want = _proof(self.key, b"server", nonce, resp["nonce"], resp["node_id"])
            if not hmac.compare_digest(want, resp["proof"]):
                raise AuthFailed(f"peer {resp['node_id']!r} does not know the cluster secret")
            self.peer_id = resp["node_id"]
            proof = _proof(self.key, b"client", resp["nonce"], nonce, self.node_id)
            return self.callRemote(Prove, proof=proof)

        # A fresh Deferred: AMP appends its own errback to callRemote's Deferred
        # when the answer arrives, which would swallow our AuthFailed.
        d: Deferred[Any] = Deferred()
        self.callRemote(Hello, node_id=self.node_id, nonce=nonce).addCallbacks(
            d.callback, d.errback
        )
        d.addCallback(got_hello)
        d.addCallback(lambda _: self)
        return d


class RpcServerFactory(Factory):
    """Accepts RPC connections for this node."""

    def __init__(self, registry: RpcRegistry, key: bytes, node_id: str) -> None:
        self.registry = registry
        self.key = key
        self.node_id = node_id

    def buildProtocol(self, addr: Any) -> NodeAMP:
        """A connection that must authenticate before anything else."""
        return NodeAMP(self.registry, self.key, self.node_id)


class _ClientFactory(Factory):
    def __init__(self, client: RpcClient) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> NodeAMP:
        return NodeAMP(self.client.registry, self.client.key, self.client.node_id)


class RpcClient:
    """Calls commands on peers by cluster address, one pooled connection each."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        key: bytes,
        node_id: str,
        *,
        registry: RpcRegistry | None = None,
        timeout: float = 10.0,
        connect_timeout: float = 3.0,
        endpoint_for: Callable[[str], Any] | None = None,
    ) -> None:
        self.reactor = reactor
        self.key = key
        self.node_id = node_id
        self.registry = registry or RpcRegistry()
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._endpoint_for = endpoint_for or self._tcp_endpoint
        self._ready: dict[str, NodeAMP] = {}
        self._connecting: dict[str, list[Deferred[NodeAMP]]] = {}

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

        def on_connected(proto: NodeAMP) -> Deferred[Any]:
            return proto.callRemote(command, **kwargs)

        def translate(f: Failure) -> Failure:
            if f.check(ConnectError, ConnectionClosed, TimeoutError, DeferTimeout, CancelledError):
                self._drop(address)
                return Failure(PeerUnavailable(f"{address}: {f.getErrorMessage()}"))
            if f.check(AuthFailed):
                self._drop(address)
            return f

        d = maybeDeferred(self._connection, address).addCallback(on_connected)
        d.addTimeout(self.timeout, clock)
        d.addErrback(translate)
        return d

    def _drop(self, address: str) -> None:
        proto = self._ready.pop(address, None)
        if proto is not None and proto.transport is not None:
            proto.transport.loseConnection()

    def close(self) -> None:
        """Close every pooled connection."""
        for address in list(self._ready):
            self._drop(address)
