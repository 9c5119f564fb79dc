"""Node RPC: authenticated AMP, big payloads, peers that are down or silent."""

from __future__ import annotations

import re
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter, connectedServerAndClient

from yimaporc.cluster.rpc import (
    AuthFailed,
    Echo,
    NodeAMP,
    PeerMaybeDone,
    PeerUnavailable,
    RpcClient,
    RpcRegistry,
    RpcServerFactory,
)
from yimaporc.cluster.wire import Scope

KEY = b"r" * 32
SCOPE = Scope("test", "porcupine")


def result_of(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def pair(
    server_key: bytes = KEY,
    client_key: bytes = KEY,
    server_scope: Scope = SCOPE,
    client_scope: Scope = SCOPE,
) -> tuple[NodeAMP, NodeAMP, Any]:
    registry = RpcRegistry()
    client, server, pump = connectedServerAndClient(
        lambda: NodeAMP(registry, server_key, "server", scope=server_scope),
        lambda: NodeAMP(RpcRegistry(), client_key, "client", scope=client_scope),
    )
    return server, client, pump


def test_handshake_then_big_payload_round_trip() -> None:
    """After the handshake a 1 MB payload crosses in one call, byte-identical."""
    server, client, pump = pair()
    d = client.authenticate()
    pump.flush()
    assert result_of(d) is client
    assert server.authenticated and server.peer_id == "client" and client.peer_id == "server"
    payload = bytes(range(256)) * 4096
    d2 = client.callRemote(Echo, payload=payload)
    pump.flush()
    assert result_of(d2)["payload"] == payload


def test_wrong_secret_is_refused_both_ways() -> None:
    """A client with another secret fails the handshake and is never authenticated."""
    server, client, pump = pair(client_key=b"x" * 32)
    d = client.authenticate()
    pump.flush()
    with pytest.raises(AuthFailed):
        result_of(d)
    assert not server.authenticated


def test_command_before_handshake_closes_connection() -> None:
    """A command sent before authenticating gets no answer and the connection closes."""
    server, client, pump = pair()
    d = client.callRemote(Echo, payload=b"hi")
    pump.flush()
    assert not server.authenticated
    with pytest.raises(Exception):  # noqa: B017 - any connection-lost failure
        result_of(d)
    assert server.transport is None or server.transport.disconnecting


def test_registry_refuses_duplicates() -> None:
    """Registering the same command twice is a programming error, caught early."""
    r = RpcRegistry()
    with pytest.raises(ValueError):
        r.register(Echo, lambda payload: {"payload": payload})


class Slow(amp.Command):
    arguments: list[tuple[bytes, amp.Argument]] = []
    response: list[tuple[bytes, amp.Argument]] = []


def memory_peer(registry: RpcRegistry) -> tuple[MemoryReactorClock, Any, ConnectionCompleter]:
    """A memory reactor where a server with ``registry`` listens; returns a client endpoint."""
    reactor = MemoryReactorClock()
    TCP4ServerEndpoint(reactor, 7946).listen(RpcServerFactory(registry, KEY, "s", scope=SCOPE))
    return reactor, TCP4ClientEndpoint(reactor, "10.0.0.1", 7946), ConnectionCompleter(reactor)


def test_client_call_and_timeout_on_silent_peer() -> None:
    """RpcClient answers calls; a peer that never answers fails with PeerUnavailable."""
    server_registry = RpcRegistry()
    server_registry.register(Slow, lambda: Deferred())
    reactor, endpoint, completer = memory_peer(server_registry)
    client = RpcClient(
        reactor, KEY, "c", scope=SCOPE, timeout=5.0, endpoint_for=lambda address: endpoint
    )
    timed_out: list[str] = []
    client.on_timeout = timed_out.append
    d = client.call("10.0.0.1:7946", Echo, payload=b"x" * 70_000)
    pump = completer.succeedOnce()
    assert pump is not None
    pump.flush()
    assert result_of(d)["payload"] == b"x" * 70_000
    d2 = client.call("10.0.0.1:7946", Slow)
    pump.flush()
    assert not d2.called
    reactor.advance(5.1)
    with pytest.raises(PeerUnavailable):
        result_of(d2)
    assert timed_out == ["10.0.0.1:7946"]  # the failure detector hears of it


def test_refused_connection_is_no_timeout_for_the_detector() -> None:
    """A refused connection fails the call, but is not reported as a timeout."""
    reactor, endpoint, completer = memory_peer(RpcRegistry())
    client = RpcClient(reactor, KEY, "c", scope=SCOPE, endpoint_for=lambda address: endpoint)
    timed_out: list[str] = []
    client.on_timeout = timed_out.append
    d = client.call("10.0.0.9:7946", Echo, payload=b"")
    completer.failOnce(Failure(ConnectionRefusedError()))
    with pytest.raises(PeerUnavailable):
        result_of(d)
    assert timed_out == []


def test_client_peer_down_is_peer_unavailable() -> None:
    """A refused connection fails the call with PeerUnavailable naming the address."""
    reactor, endpoint, completer = memory_peer(RpcRegistry())
    client = RpcClient(reactor, KEY, "c", scope=SCOPE, endpoint_for=lambda address: endpoint)
    d = client.call("10.0.0.9:7946", Echo, payload=b"")
    completer.failOnce(Failure(ConnectionRefusedError()))
    with pytest.raises(PeerUnavailable, match=re.escape("10.0.0.9:7946")):
        result_of(d)


def test_peer_unavailable_says_whether_the_request_was_sent() -> None:
    """A timeout after the request went out is a PeerMaybeDone (the peer may run it);
    a refused connection is a plain PeerUnavailable."""
    server_registry = RpcRegistry()
    server_registry.register(Slow, lambda: Deferred())
    reactor, endpoint, completer = memory_peer(server_registry)
    client = RpcClient(
        reactor, KEY, "c", scope=SCOPE, timeout=5.0, endpoint_for=lambda address: endpoint
    )
    d = client.call("10.0.0.1:7946", Slow)
    pump = completer.succeedOnce()
    assert pump is not None
    pump.flush()
    reactor.advance(5.1)
    with pytest.raises(PeerUnavailable) as sent:
        result_of(d)
    assert isinstance(sent.value, PeerMaybeDone) and sent.value.maybe_done
    refused = client.call("10.0.0.9:7946", Slow)
    completer.failOnce(Failure(ConnectionRefusedError()))
    with pytest.raises(PeerUnavailable) as unsent:
        result_of(refused)
    assert not isinstance(unsent.value, PeerMaybeDone) and not unsent.value.maybe_done
