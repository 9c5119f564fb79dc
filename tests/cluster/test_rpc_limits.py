"""RPC before and after authentication: scope binding and what a peer may make us buffer."""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient

from yimaporc.cluster.rpc import (
    AuthFailed,
    Echo,
    NodeAMP,
    RpcGuard,
    RpcLimits,
    RpcRegistry,
    RpcServerFactory,
)
from yimaporc.cluster.wire import Scope

KEY = b"r" * 32
MAIL = Scope("mail", "porcupine")
MEDIA = Scope("media", "yima")


def result_of(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def box(pairs: list[tuple[bytes, bytes]], terminated: bool = True) -> bytes:
    out = b"".join(struct.pack("!H", len(k)) + k + struct.pack("!H", len(v)) + v for k, v in pairs)
    return out + (b"\0\0" if terminated else b"")


def hello(scope: Scope = MAIL) -> bytes:
    return box(
        [(b"_command", b"yimaporc.hello"), (b"_ask", b"1"), (b"node_id", b"c"),
         (b"nonce", os.urandom(32)), (b"cluster", scope.cluster.encode()),
         (b"kind", scope.kind.encode())]
    )  # fmt: skip


def server(limits: RpcLimits | None = None) -> tuple[NodeAMP, StringTransport, RpcGuard, Clock]:
    clock = Clock()
    guard = RpcGuard(clock, limits)
    factory = RpcServerFactory(RpcRegistry(), KEY, "s", scope=MAIL, guard=guard)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, guard, clock


def test_handshake_across_scopes_fails_with_one_key() -> None:
    """A yima client and a porcupine server with the same key never authenticate."""
    guard = RpcGuard()
    client, server_, pump = connectedServerAndClient(
        lambda: NodeAMP(RpcRegistry(), KEY, "s", scope=MAIL, guard=guard, server=True),
        lambda: NodeAMP(RpcRegistry(), KEY, "c", scope=MEDIA),
    )
    d = client.authenticate()
    pump.flush()
    with pytest.raises(AuthFailed):
        result_of(d)
    assert not server_.authenticated
    assert guard.stats["refused_wrong_scope"] == 1


def test_same_scope_handshake_then_echo() -> None:
    """Two ends of one scope authenticate and a 1 MiB echo passes the authenticated cap."""
    guard = RpcGuard(limits=RpcLimits(max_box=4 << 20))
    client, server_, pump = connectedServerAndClient(
        lambda: NodeAMP(RpcRegistry(), KEY, "s", scope=MAIL, guard=guard, server=True),
        lambda: NodeAMP(RpcRegistry(), KEY, "c", scope=MAIL),
    )
    result_of_auth = client.authenticate()
    pump.flush()
    assert result_of(result_of_auth) is client and server_.authenticated
    payload = os.urandom(1 << 20)
    d = client.callRemote(Echo, payload=payload)
    pump.flush()
    assert result_of(d)["payload"] == payload
    assert guard.unauthenticated == 0 and not guard.stats


def test_big_value_before_authentication_drops_at_its_length_prefix() -> None:
    """A 64 KiB value before the handshake is refused when its length arrives."""
    proto, transport, guard, _ = server()
    proto.dataReceived(box([(b"k1", b"")], terminated=False)[:-2] + struct.pack("!H", 0xFFFF))
    assert transport.disconnected
    assert guard.stats["dropped_unauthenticated_too_large"] == 1
    proto.dataReceived(b"x" * 0xFFFF)  # what was in flight is ignored
    assert guard.stats["dropped_unauthenticated_too_large"] == 1


def test_endless_box_of_small_values_is_cut_at_the_box_cap() -> None:
    """Unique keys with small values, never terminated: dropped once past ~4 KiB."""
    proto, transport, guard, _ = server()
    fed = 0
    for i in range(1000):
        chunk = box([(b"k%d" % i, b"v" * 100)], terminated=False)
        proto.dataReceived(chunk)
        fed += len(chunk)
        if transport.disconnected:
            break
    assert transport.disconnected and fed <= RpcLimits().preauth_box
    assert guard.stats["dropped_unauthenticated_too_large"] == 1
    assert proto._currentBox is None


def test_repeated_hellos_without_proof_are_cut_at_the_total_cap() -> None:
    """Hello after Hello, never proving the key: dropped once 16 KiB are accounted."""
    proto, transport, guard, _ = server()
    sent = 0
    while not transport.disconnected and sent < 1 << 20:
        proto.dataReceived(hello())
        sent += 1
    assert transport.disconnected
    assert guard.stats["dropped_unauthenticated_too_large"] == 1
    assert 2 < sent < RpcLimits().preauth_total // 128


def test_silent_connection_is_dropped_after_the_handshake_deadline() -> None:
    """A peer that never completes the handshake is dropped after handshake_timeout."""
    proto, transport, guard, clock = server()
    assert guard.unauthenticated == 1
    clock.advance(RpcLimits().handshake_timeout - 0.1)
    assert not transport.disconnected
    clock.advance(0.2)
    assert transport.disconnected and guard.stats["dropped_handshake_timeout"] == 1
    proto.connectionLost(Failure(ConnectionError()))
    assert guard.unauthenticated == 0


def test_handshakes_in_progress_are_capped() -> None:
    """Past max_unauthenticated pending handshakes, new connections are dropped at once."""
    limits = RpcLimits(max_unauthenticated=2)
    clock = Clock()
    guard = RpcGuard(clock, limits)
    factory = RpcServerFactory(RpcRegistry(), KEY, "s", scope=MAIL, guard=guard)
    transports = []
    protos = []
    for _ in range(3):
        p, t = factory.buildProtocol(None), StringTransport()
        p.makeConnection(t)
        protos.append(p)
        transports.append(t)
    assert [t.disconnected for t in transports] == [False, False, True]
    assert guard.stats["dropped_too_many_unauthenticated"] == 1
    protos[0].connectionLost(Failure(ConnectionError()))
    protos[2].connectionLost(Failure(ConnectionError()))
    assert guard.unauthenticated == 1


def test_hello_of_another_scope_is_answered_with_an_error_and_counted() -> None:
    """A Hello naming another cluster gets AUTH_FAILED, no proof, and is counted."""
    proto, transport, guard, _ = server()
    proto.dataReceived(hello(MEDIA))
    out = transport.value()
    assert b"AUTH_FAILED" in out and b"proof" not in out
    assert guard.stats["refused_wrong_scope"] == 1
    proto2, transport2, _, _ = server()
    proto2.dataReceived(hello(MAIL))
    assert b"proof" in transport2.value()


def test_authenticated_box_above_max_box_drops_the_connection() -> None:
    """After the handshake a box over max_box is refused and counted; smaller ones pass."""
    guard = RpcGuard(limits=RpcLimits(max_box=256 << 10))
    client, _, pump = connectedServerAndClient(
        lambda: NodeAMP(RpcRegistry(), KEY, "s", scope=MAIL, guard=guard, server=True),
        lambda: NodeAMP(RpcRegistry(), KEY, "c", scope=MAIL),
    )
    client.authenticate()
    pump.flush()
    ok = client.callRemote(Echo, payload=b"x" * (128 << 10))
    pump.flush()
    assert len(result_of(ok)["payload"]) == 128 << 10
    too_big = client.callRemote(Echo, payload=b"x" * (512 << 10))
    pump.flush()
    with pytest.raises(Exception):  # noqa: B017 - the connection is gone
        result_of(too_big)
    assert guard.stats["dropped_box_too_large"] == 1


def no_tracebacks(events: Any) -> bool:
    """No captured log event carries a failure (what twistd prints as a traceback)."""
    return not any(e.get("log_failure") is not None for e in events)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (box([(b"_answer", b"1"), (b"x", b"y")]), "dropped_unexpected_answer"),
        (box([(b"_error", b"7"), (b"_error_code", b"X")]), "dropped_unexpected_answer"),
        (box([(b"x", b"y")]), "dropped_malformed_box"),
        (box([]), "dropped_malformed_box"),
        (hello()[:-2].replace(b"\x00\x04_ask\x00\x011", b"") + b"\0\0", "dropped_malformed_box"),
        (box([(b"_command", b"yimaporc.echo"), (b"_ask", b"1"), (b"payload", b"x")]),
         "dropped_unauthenticated_command"),
        (box([(b"_command", b"yimaporc.hello"), (b"_ask", b"1"), (b"node_id", b"c")]),
         "dropped_malformed_arguments"),
    ],
)  # fmt: skip
def test_misfit_boxes_before_authentication_are_counted_drops(raw: bytes, why: str) -> None:
    """Answers nobody asked for, empty or ask-less boxes, other commands, missing arguments: drops."""
    proto, transport, guard, _ = server()
    with capturedLogs() as events:
        proto.dataReceived(raw + hello())  # what follows a misfit is ignored
    assert transport.disconnected
    assert guard.stats[why] == 1 and sum(guard.stats.values()) == 1
    assert b"proof" not in transport.value()
    assert no_tracebacks(events)


def authenticated_server() -> tuple[NodeAMP, Any, RpcGuard]:
    guard = RpcGuard(Clock())
    client, server_, pump = connectedServerAndClient(
        lambda: NodeAMP(RpcRegistry(), KEY, "s", scope=MAIL, guard=guard, server=True),
        lambda: NodeAMP(RpcRegistry(), KEY, "c", scope=MAIL),
    )
    client.authenticate()
    pump.flush()
    assert server_.authenticated
    transport = StringTransport()
    server_.transport = transport
    return server_, transport, guard


@pytest.mark.parametrize(
    ("pairs", "why"),
    [
        ([(b"payload", b"x"), (b"payload.n", b"3"), (b"payload.1", b"y")],
         "dropped_malformed_arguments"),
        ([(b"payload", b"x"), (b"payload.n", b"\xb2")], "dropped_malformed_arguments"),
        ([(b"payloaf", b"x")], "dropped_malformed_arguments"),
    ],
)  # fmt: skip
def test_bad_bigbytes_after_authentication_is_a_counted_drop(
    pairs: list[tuple[bytes, bytes]], why: str
) -> None:
    """An Echo with a missing chunk, a non-numeric count or no payload: a drop, no traceback."""
    proto, transport, guard = authenticated_server()
    with capturedLogs() as events:
        proto.dataReceived(box([(b"_command", b"yimaporc.echo"), (b"_ask", b"9"), *pairs]))
    assert transport.disconnected and guard.stats[why] == 1
    assert no_tracebacks(events)


def test_unknown_command_after_authentication_is_answered_and_counted() -> None:
    """An unknown command gets AMP's UNHANDLED error answer, a counter and one warning line."""
    proto, transport, guard = authenticated_server()
    with capturedLogs() as events:
        for tag in (b"1", b"2"):
            proto.dataReceived(box([(b"_command", b"yimaporc.nope"), (b"_ask", tag)]))
        proto.dataReceived(box([(b"_command", b"yimaporc.echo"), (b"_ask", b"3"),
                                (b"payload", b"ok")]))  # fmt: skip
    out = transport.value()
    assert out.count(b"UNHANDLED") == 2 and b"\x00\x07payload\x00\x02ok" in out
    assert not transport.disconnected
    assert guard.stats["refused_unknown_command"] == 2
    assert no_tracebacks(events)
    assert len([e for e in events if "unknown command" in str(e.get("what", ""))]) == 1


def test_bad_proof_is_counted_without_a_traceback() -> None:
    """A Prove with a wrong proof: AUTH_FAILED answer, refused_bad_proof, no logged failure."""
    proto, transport, guard, _ = server()
    with capturedLogs() as events:
        proto.dataReceived(hello())
        proto.dataReceived(box([(b"_command", b"yimaporc.prove"), (b"_ask", b"2"),
                                (b"proof", b"x" * 32)]))  # fmt: skip
    assert b"AUTH_FAILED" in transport.value() and not proto.authenticated
    assert guard.stats["refused_bad_proof"] == 1
    assert no_tracebacks(events)
