"""The admin HTTP channel judges token and body size from the request head (issue 13 item 5)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from yimaporc.admin.routes import MAX_JSON_BODY, MAX_RAW_BODY, Route
from yimaporc.admin.server import (
    IDLE_TIMEOUT,
    LINGER_BYTES,
    LINGER_SECONDS,
    AdminChannel,
    AdminRequest,
    AdminSite,
)
from yimaporc.cluster.node import ClusterNode, NodeConfig
from yimaporc.secret import admin_token

SECRET = b"s" * 32
TOKEN = admin_token(SECRET)


class HalfCloseTransport(StringTransport):
    """A StringTransport that records a half-close (write side shut) and an abort."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class Setup:
    """A real :class:`AdminSite` on a node with a memory reactor, plus routes that record calls."""

    def __init__(self, tmp_path: Path) -> None:
        self.reactor = MemoryReactorClock()
        cfg = NodeConfig("n1", "porcupine", tmp_path, "127.0.0.1", 7946)
        self.node = ClusterNode(self.reactor, cfg, SECRET, rng=random.Random(1))
        self.calls: list[tuple[str, Any]] = []
        self.node.add_route(Route("POST", "/api/things", self._handler("things")))
        self.node.add_route(Route("GET", "/api/secret", self._handler("secret")))
        self.node.add_route(Route("GET", "/api/open", self._handler("open"), mutates=False))
        self.node.add_route(Route("POST", "/api/upload", self._upload, raw=True))
        self.site = AdminSite(self.node)

    def _handler(self, name: str) -> Any:
        def handle(body: dict[str, Any], query: dict[str, str]) -> Any:
            self.calls.append((name, body))
            return succeed({"ok": name})

        return handle

    def _upload(self, body: dict[str, Any], query: dict[str, str]) -> Any:
        self.calls.append(("upload", body["size"]))
        return succeed({"size": body["size"]})

    def connect(self, host: str = "10.1.1.1") -> tuple[AdminChannel, HalfCloseTransport]:
        channel = self.site.buildProtocol(IPv4Address("TCP", host, 40000))
        assert channel is not None
        transport = HalfCloseTransport()
        channel.makeConnection(transport)
        return channel, transport


def head(
    method: str,
    path: str,
    length: int | None = None,
    token: str | None = None,
    chunked: bool = False,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(transport: StringTransport) -> int:
    return int(transport.value().split(b" ", 2)[1])


def json_body(transport: StringTransport) -> Any:
    response_head, body = transport.value().split(b"\r\n\r\n", 1)
    if b"transfer-encoding: chunked" in response_head.lower():
        parts = []
        while True:
            size_line, body = body.split(b"\r\n", 1)
            size = int(size_line, 16)
            if size == 0:
                break
            parts.append(body[:size])
            body = body[size + 2 :]
        body = b"".join(parts)
    return json.loads(body)


def body_bytes_buffered(channel: AdminChannel) -> int:
    """Bytes any request object of ``channel`` holds in its content buffer."""
    total = 0
    for req in channel.requests:
        if req.content is not None:
            req.content.seek(0, 2)
            total += req.content.tell()
    return total


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def test_huge_body_without_token_is_refused_401_from_the_head(setup: Setup) -> None:
    """1 GiB announced without a token: 401 at once, not one body byte buffered, then closed."""
    channel, transport = setup.connect()
    channel.dataReceived(head("POST", "/api/upload", length=1 << 30))
    assert status_of(transport) == 401
    assert b'WWW-Authenticate: Bearer realm="yimaporc"' in transport.value()
    assert json_body(transport) == {"error": "missing or wrong bearer token"}
    assert transport.write_closed
    answered = len(transport.value())
    chunk = b"x" * 65536
    for _ in range(8):
        channel.dataReceived(chunk)
    assert body_bytes_buffered(channel) == 0
    assert all(req.content is None for req in channel.requests)
    assert len(transport.value()) == answered
    assert not transport.aborted
    for _ in range(LINGER_BYTES // len(chunk) + 1):
        channel.dataReceived(chunk)
    assert transport.aborted
    assert setup.calls == []
    assert setup.site.stats["refused_401"] == 1


def test_refused_connection_is_aborted_after_the_linger_time(setup: Setup) -> None:
    """A refused client that keeps the connection open is cut off after LINGER_SECONDS."""
    channel, transport = setup.connect()
    channel.dataReceived(head("POST", "/api/things", length=10))
    assert status_of(transport) == 401
    setup.reactor.advance(LINGER_SECONDS - 0.1)
    assert not transport.aborted
    setup.reactor.advance(0.2)
    assert transport.aborted


def test_wrong_token_and_token_only_reads_are_401(setup: Setup) -> None:
    """A wrong token is 401; a read-only route without mutates=False needs the token too."""
    for request in (
        head("POST", "/api/things", length=2, token="wrong") + b"{}",
        head("GET", "/api/secret"),
    ):
        channel, transport = setup.connect()
        channel.dataReceived(request)
        assert status_of(transport) == 401
    assert setup.calls == []


def test_oversized_json_body_with_token_is_413_from_the_head(setup: Setup) -> None:
    """With the token, a Content-Length above the route's limit is 413 before any body byte."""
    channel, transport = setup.connect()
    channel.dataReceived(head("POST", "/api/things", length=MAX_JSON_BODY + 1, token=TOKEN))
    assert status_of(transport) == 413
    channel.dataReceived(b"{" * 4096)
    assert body_bytes_buffered(channel) == 0
    assert setup.calls == []


def test_chunked_body_is_cut_off_at_the_limit_as_it_streams(setup: Setup) -> None:
    """A chunked body with the token is counted as it comes; past the limit: 413, buffer bounded."""
    channel, transport = setup.connect()
    channel.dataReceived(head("POST", "/api/things", token=TOKEN, chunked=True))
    assert transport.value() == b""
    chunk = b"a" * 4096
    sent = 0
    while not transport.value():
        channel.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sent += len(chunk)
        assert body_bytes_buffered(channel) <= MAX_JSON_BODY
        assert sent <= MAX_JSON_BODY + len(chunk)
    assert status_of(transport) == 413
    channel.dataReceived(b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk))
    assert body_bytes_buffered(channel) <= MAX_JSON_BODY
    assert setup.calls == []


def test_good_requests_are_served_through_the_real_site(setup: Setup) -> None:
    """With the token a JSON POST reaches its handler; open GETs need none."""
    channel, transport = setup.connect()
    body = b'{"a": 1}'
    channel.dataReceived(head("POST", "/api/things", length=len(body), token=TOKEN) + body)
    assert status_of(transport) == 200 and json_body(transport) == {"ok": "things"}
    assert setup.calls == [("things", {"a": 1})]
    for path, name in (("/api/open", "open"), ("/api/secret", "secret")):
        channel, transport = setup.connect()
        token = TOKEN if name == "secret" else None
        channel.dataReceived(head("GET", path, token=token))
        assert status_of(transport) == 200 and json_body(transport) == {"ok": name}
    channel, transport = setup.connect()
    channel.dataReceived(head("GET", "/api/status"))
    assert status_of(transport) == 200 and json_body(transport)["node_id"] == "n1"


def test_upload_route_takes_a_large_body_with_the_token(setup: Setup) -> None:
    """A raw route's limit is MAX_RAW_BODY: 1 MiB with the token is admitted and delivered."""
    channel, transport = setup.connect()
    size = 1 << 20
    channel.dataReceived(head("POST", "/api/upload", length=size, token=TOKEN))
    assert transport.value() == b""
    req = channel.requests[-1]
    assert isinstance(req, AdminRequest) and req.body_limit == MAX_RAW_BODY
    for _ in range(16):
        channel.dataReceived(b"z" * (size // 16))
    assert status_of(transport) == 200 and json_body(transport) == {"size": size}


def test_paths_without_a_route_take_only_a_small_body(setup: Setup) -> None:
    """/api/status or an unknown path announcing a big body is 413; unknown ones stay 404."""
    channel, transport = setup.connect()
    channel.dataReceived(head("POST", "/api/status", length=1 << 20))
    assert status_of(transport) == 413
    channel, transport = setup.connect()
    channel.dataReceived(head("GET", "/nowhere"))
    assert status_of(transport) == 404


def test_connections_are_capped_per_peer_and_in_total(tmp_path: Path) -> None:
    """Past max_per_peer from one address, or max_connections in all, new connections are dropped."""
    setup = Setup(tmp_path)
    site = AdminSite(setup.node, max_connections=5, max_per_peer=3)
    addr = IPv4Address("TCP", "10.0.0.1", 1)
    kept = [site.buildProtocol(addr) for _ in range(3)]
    assert all(c is not None for c in kept)
    assert site.buildProtocol(addr) is None
    others = [site.buildProtocol(IPv4Address("TCP", f"10.0.0.{i}", 1)) for i in (2, 3)]
    assert all(c is not None for c in others)
    assert site.buildProtocol(IPv4Address("TCP", "10.0.0.4", 1)) is None
    assert site.stats["refused_connections"] == 2
    channel = kept[0]
    assert channel is not None
    channel.makeConnection(StringTransport())
    channel.connectionLost(Failure(ConnectionDone()))
    assert site.buildProtocol(addr) is not None
    assert setup.node.status()["admin"] == {
        "connections": 5,
        "refused_400": 0,
        "refused_401": 0,
        "refused_413": 0,
        "refused_connections": 2,
    }


def test_idle_connections_time_out(setup: Setup) -> None:
    """An admin connection that sends nothing is closed after IDLE_TIMEOUT seconds."""
    channel, transport = setup.connect()
    channel.dataReceived(b"GET /api/st")
    setup.reactor.advance(IDLE_TIMEOUT + 1)
    assert transport.disconnecting


def test_non_ascii_request_uri_is_refused_400_from_the_head(setup: Setup) -> None:
    """A raw non-ASCII URI (fuzz-corpus admin/94684d026a74a3a5) is 400, never given to twisted.web."""
    channel, transport = setup.connect()
    channel.dataReceived(b"HEAD /\xa1V\xb0 HTTP/1.0\r\n\r\n")
    assert status_of(transport) == 400
    assert json_body(transport) == {"error": "the request URI must be printable ASCII"}
    assert channel.requests[-1].uri == b"(no uri yet)"  # never handed to a request
    assert setup.site.stats["refused_400"] == 1


def test_header_with_control_characters_is_refused_400(setup: Setup) -> None:
    """A Content-Type holding \\x1e (fuzz-corpus admin/3a34e5d3b804f805) is 400, not a ValueError."""
    channel, transport = setup.connect()
    raw = head("POST", "/api/things", length=2, token=TOKEN)
    raw = raw.replace(b"Host: x", b"Host: x\r\nContent-Type: app\x1e\x15lication/json")
    channel.dataReceived(raw + b"{}")
    assert status_of(transport) == 400
    assert json_body(transport) == {"error": "control character in a header"}
    assert setup.calls == []
    ok_channel, ok_transport = setup.connect("10.1.1.2")
    good = head("POST", "/api/things", length=2, token=TOKEN)
    ok_channel.dataReceived(good.replace(b"Host: x", b"Host: x\r\nX-Tab: a\tb") + b"{}")
    assert status_of(ok_transport) == 200
    assert setup.calls == [("things", {})]
