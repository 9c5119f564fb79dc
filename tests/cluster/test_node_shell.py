"""The Twisted shells (UDP membership, admin API, CLI): nodes on simulation-kernel hosts."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.protocol import DatagramProtocol
from twisted.web.test.requesthelper import DummyRequest

from yimaporc import cli
from yimaporc.admin.routes import ApiError, Route
from yimaporc.admin.server import AdminResource
from yimaporc.cluster import wire
from yimaporc.cluster.membership import Membership, View
from yimaporc.cluster.node import ClusterNode, ConfigError, NodeConfig, parse_cluster_address
from yimaporc.cluster.udp import MembershipProtocol
from yimaporc.secret import admin_token
from yimaporc.testing.simnet import SimNet

KEY = b"m" * 32
SCOPE = wire.Scope("test", "porcupine")


def make(net: SimNet, i: int, seeds: list[str]) -> tuple[MembershipProtocol, list[View]]:
    """Node ``n{i}`` on kernel host 10.0.0.{i}: its shell bound on the host's UDP port 7946
    (binding it starts the protocol, as on a real reactor)."""
    views: list[View] = []
    me = wire.Member(f"n{i}", f"10.0.0.{i}:7946", 1)
    core = Membership(me, seeds=seeds, rng=random.Random(i))
    reactor = net.kernel.boot(net.kernel.add_host(f"n{i}", f"10.0.0.{i}"))
    proto = MembershipProtocol(core, KEY, reactor, lambda old, new: views.append(new), scope=SCOPE)
    reactor.listenUDP(7946, proto)
    return proto, views


class Sink(DatagramProtocol):
    """A stranger's UDP port: keeps what it hears."""

    def __init__(self) -> None:
        self.heard: list[bytes] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.heard.append(datagram)


def test_two_shells_converge_on_a_clock() -> None:
    """Two UDP shells on kernel hosts find each other through a seed and commit one view."""
    net = SimNet(latency=0.001)
    a, va = make(net, 1, [])
    _, vb = make(net, 2, ["10.0.0.1:7946"])
    net.advance(4.0)
    assert va[-1] == vb[-1]
    assert va[-1].node_ids == ("n1", "n2")
    assert a.stats["accepted"] > 0 and a.stats.get("dropped_bad_mac", 0) == 0


def test_shell_counts_garbage_and_keeps_going() -> None:
    """Garbage and replayed datagrams are counted as dropped; the shell keeps working."""
    net = SimNet(latency=0.001)
    a, _ = make(net, 1, [])
    stranger = net.kernel.boot(net.kernel.add_host("z", "10.0.0.9"))
    port = stranger.listenUDP(7946, Sink())
    port.write(b"\x00" * 40, ("10.0.0.1", 7946))
    good = wire.serialize(KEY, SCOPE, wire.Header("z", "10.0.0.9:7946", 1, 1, 1), wire.Ping(0, 1))
    port.write(good, ("10.0.0.1", 7946))
    port.write(good, ("10.0.0.1", 7946))
    net.advance(0.01)
    assert a.stats["dropped_malformed"] == 1
    assert a.stats["dropped_replayed"] == 1
    assert a.stats["accepted"] == 1


@pytest.mark.parametrize(
    "value, expected",
    [("tcp:7946:interface=127.0.1.1", ("127.0.1.1", 7946)), ("127.0.2.3:99", ("127.0.2.3", 99))],
)
def test_cluster_address_parsing(value: str, expected: tuple[str, int]) -> None:
    """--cluster accepts an endpoint string with interface= or HOST:PORT."""
    assert parse_cluster_address(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "tcp:7946",
        "tcp:x:interface=1.2.3.4",
        "nohost",
        "1.2.3.4:0",
        "tcp:1:bogus=2:interface=1.1.1.1",
    ],
)
def test_cluster_address_errors(value: str) -> None:
    """Bad --cluster values fail with a message naming the value."""
    with pytest.raises(ConfigError, match="--cluster"):
        parse_cluster_address(value)


def node(tmp_path: Path) -> ClusterNode:
    cfg = NodeConfig("n1", "porcupine", tmp_path, "127.0.0.1", 7946)
    return ClusterNode(SimNet().reactor("n1"), cfg, b"s" * 32, rng=random.Random(1))


def render(
    resource: AdminResource, method: bytes, path: bytes, body: Any = None, token: str | None = None
) -> tuple[int, Any]:
    req = DummyRequest([])
    req.method = method
    req.path = path
    req.uri = path
    if body is not None:
        import io

        req.content = io.BytesIO(json.dumps(body).encode())
    if token:
        req.requestHeaders.addRawHeader(b"authorization", b"Bearer " + token.encode())
    out = resource.render(req)
    if isinstance(out, bytes):
        req.write(out)
        req.finish()
    return req.responseCode or 200, json.loads(b"".join(req.written)) if req.written else None


def test_admin_status_and_auth(tmp_path: Path) -> None:
    """/api/status is open; mutations need the bearer token; handler errors become JSON."""
    n = node(tmp_path)
    calls: list[dict[str, Any]] = []

    def create(body: dict[str, Any], query: dict[str, str]) -> Any:
        if body.get("bad"):
            raise ApiError("bad thing", 409)
        calls.append(body)
        return succeed({"ok": True})

    n.add_route(Route("POST", "/api/things", create))
    n.add_status(lambda: {"users": 3})
    res = AdminResource(n)
    code, doc = render(res, b"GET", b"/api/status")
    assert (
        code == 200 and doc["node_id"] == "n1" and doc["kind"] == "porcupine" and doc["users"] == 3
    )
    assert {"epoch", "members"} <= set(doc)
    assert render(res, b"POST", b"/api/things", {"a": 1})[0] == 401
    assert render(res, b"POST", b"/api/things", {"a": 1}, token="wrong")[0] == 401
    token = admin_token(b"s" * 32)
    assert render(res, b"POST", b"/api/things", {"a": 1}, token=token) == (200, {"ok": True})
    assert calls == [{"a": 1}]
    assert render(res, b"POST", b"/api/things", {"bad": 1}, token=token) == (
        409,
        {"error": "bad thing"},
    )
    assert render(res, b"GET", b"/api/nothing")[0] == 404
    assert render(res, b"GET", b"/api/things")[0] == 405


def test_cli_unreachable_node_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    """`yimaporc status` against nothing exits 1 with one 'error: ...' line."""
    rc = cli.main(["status", "--admin", "http://127.0.0.1:9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: cannot reach")


def test_cli_bad_flag_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown flag exits 2 with one 'error: ...' line."""
    with pytest.raises(SystemExit) as e:
        cli.main(["status", "--bogus"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")


def test_cli_missing_admin_is_error(capsys: pytest.CaptureFixture[str]) -> None:
    """`status` without --admin says what is missing."""
    assert cli.main(["status"]) == 1
    assert "--admin URL is required" in capsys.readouterr().err
