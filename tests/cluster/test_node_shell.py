"""The Twisted shells (UDP membership, admin API, CLI) with a Clock and memory transports."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from yimaporc import cli
from yimaporc.admin.routes import ApiError, Route
from yimaporc.admin.server import AdminResource
from yimaporc.cluster import wire
from yimaporc.cluster.membership import Membership, View
from yimaporc.cluster.node import ClusterNode, ConfigError, NodeConfig, parse_cluster_address
from yimaporc.cluster.udp import MembershipProtocol
from yimaporc.secret import admin_token

KEY = b"m" * 32
SCOPE = wire.Scope("test", "porcupine")


class Router:
    """Delivers datagrams between in-memory 'UDP ports' by address."""

    def __init__(self) -> None:
        self.ports: dict[tuple[str, int], MembershipProtocol] = {}
        self.log: list[tuple[tuple[str, int], bytes]] = []

    def attach(self, address: tuple[str, int], proto: MembershipProtocol) -> None:
        router = self

        class Transport:
            def write(self, data: bytes, addr: tuple[str, int]) -> None:
                router.log.append((addr, data))

        self.ports[address] = proto
        proto.transport = Transport()  # type: ignore[assignment]
        self._from = address

    def pump(self) -> int:
        n = 0
        while self.log:
            batch, self.log = self.log, []
            for addr, data in batch:
                if addr in self.ports:
                    self.ports[addr].datagramReceived(data, ("127.0.0.1", 1))
                    n += 1
        return n


def make(
    router: Router, clock: Clock, i: int, seeds: list[str]
) -> tuple[MembershipProtocol, list[View]]:
    views: list[View] = []
    me = wire.Member(f"n{i}", f"10.0.0.{i}:7946", 1)
    core = Membership(me, seeds=seeds, rng=random.Random(i))
    proto = MembershipProtocol(core, KEY, clock, lambda old, new: views.append(new), scope=SCOPE)
    router.attach((f"10.0.0.{i}", 7946), proto)
    return proto, views


def test_two_shells_converge_on_a_clock() -> None:
    """Two UDP shells on a Clock find each other through a seed and commit one view."""
    clock, router = Clock(), Router()
    a, va = make(router, clock, 1, [])
    b, vb = make(router, clock, 2, ["10.0.0.1:7946"])
    a.startProtocol()
    b.startProtocol()
    for _ in range(40):
        clock.advance(0.1)
        router.pump()
    assert va[-1] == vb[-1]
    assert va[-1].node_ids == ("n1", "n2")
    assert a.stats["accepted"] > 0 and a.stats.get("dropped_bad_mac", 0) == 0


def test_shell_counts_garbage_and_keeps_going() -> None:
    """Garbage and replayed datagrams are counted as dropped; the shell keeps working."""
    clock, router = Clock(), Router()
    a, _ = make(router, clock, 1, [])
    a.startProtocol()
    a.datagramReceived(b"\x00" * 40, ("1.2.3.4", 5))
    good = wire.serialize(KEY, SCOPE, wire.Header("z", "10.0.0.9:7946", 1, 1, 1), wire.Ping(0, 1))
    a.datagramReceived(good, ("1.2.3.4", 5))
    a.datagramReceived(good, ("1.2.3.4", 5))
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
    return ClusterNode(Clock(), cfg, b"s" * 32, rng=random.Random(1))


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
