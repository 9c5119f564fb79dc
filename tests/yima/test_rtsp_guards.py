"""Yima's RTSP front against hostile clients: media only to the requester, no fd per
unplayed SETUP, no cluster RPC to reap what never played (issue 13, items 1 and 4)."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.usage import UsageError

from yimaporc.cluster.membership import Member
from yimaporc.cluster.rpc import RpcRegistry
from yimaporc.rtsp import Response, RtspClientConnection
from yimaporc.tap.yima import Options
from yimaporc.yima.feedback import StreamPorts
from yimaporc.yima.media import KIND_TS, MediaInfo
from yimaporc.yima.node import YimaNode
from yimaporc.yima.rtspservice import YimaStreamingService
from yimaporc.yima.streaming import StreamControl, StreamStart

URL = "rtsp://127.0.103.1:8554/clip"
CLIENT = "127.0.103.10"


class _Port:
    def __init__(self, ports: list[_Port], host: str, number: int) -> None:
        self.ports, self.host, self.number = ports, host, number
        self.open = True

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", self.host, self.number)

    def stopListening(self) -> None:
        self.open = False

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        pass


class FakeReactor(Clock):
    """A Clock that also hands out fake UDP ports and records them."""

    def __init__(self) -> None:
        super().__init__()
        self.udp: list[_Port] = []

    def listenUDP(self, port: int, proto: Any, interface: str = "") -> _Port:
        p = _Port(self.udp, interface, 40000 + len(self.udp))
        self.udp.append(p)
        return p


def service(**guards: Any) -> tuple[YimaStreamingService, FakeReactor, list[tuple[Any, ...]]]:
    reactor = FakeReactor()
    calls: list[tuple[Any, ...]] = []
    members = [Member(n, f"127.0.103.{i}:7946")
               for i, n in enumerate("abc", 1)]  # fmt: skip

    def call(address: str, command: Any, **kw: Any) -> Any:
        calls.append(("rpc", address, command, kw))
        return succeed({"rtp": 6970, "rtcp": 6971})

    node = SimpleNamespace(
        registry=RpcRegistry(), cluster_time=reactor.seconds, add_status=lambda f: None,
        subscribe=lambda s: None, node_id="a", view=SimpleNamespace(members=members),
        rpc=SimpleNamespace(call=call), config=SimpleNamespace(cluster_host="127.0.103.1"),
    )  # fmt: skip
    info = MediaInfo("clip", KIND_TS, 2 * 13160, 13160, 1, streamable=True, duration=1.0,
                     block_times=(0, 500_000))  # fmt: skip
    storage = SimpleNamespace(media_info=lambda name: info, read_block=lambda n, b: succeed(b""),
                              time_index=lambda name: succeed(info), run_blocking=maybeDeferred)  # fmt: skip
    svc = YimaStreamingService(
        node, reactor, storage, rtsp_endpoint=None, rng=random.Random(1),  # type: ignore[arg-type]
        rtsp_guards=guards,
    )  # fmt: skip

    def start(**kw: Any) -> None:
        calls.append(("start", kw))

    svc.streaming.start = start  # type: ignore[method-assign]
    svc.streaming.control = lambda *a: calls.append(("control", *a))  # type: ignore[method-assign]
    return svc, reactor, calls


class Client:
    """One RTSP connection from ``host`` to the service's factory."""

    def __init__(self, svc: YimaStreamingService, host: str = CLIENT) -> None:
        self.proto = svc.factory.buildProtocol(IPv4Address("TCP", host, 50000))
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.conn = RtspClientConnection()

    def ask(self, pair: tuple[int, bytes]) -> Response:
        self.proto.dataReceived(pair[1])
        self.conn.receive_data(self.transport.value())
        self.transport.clear()
        event = self.conn.next_event()
        assert hasattr(event, "response"), event
        response: Response = event.response
        return response

    def setup(self, transport: str) -> Response:
        return self.ask(self.conn.request("SETUP", URL + "/track1", [("Transport", transport)]))


def test_reflection_to_another_host_is_refused() -> None:
    """SETUP with destination=another host (plain or fan-out) is 461: no plan, no port."""
    svc, reactor, calls = service()
    c = Client(svc)
    for extra in ("", ";x-yima-fanout"):
        r = c.setup(f"RTP/AVP;unicast;destination=127.0.103.99;client_port=5000-5001{extra}")
        assert r.status == 461
    assert svc.plans == {} and reactor.udp == [] and calls == []
    assert svc.status()["rtsp"]["refused_destinations"] == 2


def test_relayed_stream_goes_to_the_rtsp_peer_and_its_relay_port_opens_at_play() -> None:
    """Destination = the peer's own address is accepted; the relay socket exists only from
    PLAY, and the relay forwards to the RTSP peer."""
    svc, reactor, calls = service()
    c = Client(svc)
    r = c.setup(f"RTP/AVP;unicast;destination={CLIENT};client_port=5000-5001")
    assert r.status == 200
    assert reactor.udp == []  # SETUP costs no socket
    (plan,) = svc.plans.values()
    assert (plan.dest_host, plan.dest_port) == (CLIENT, 5000)
    assert c.ask(c.conn.play(URL)).status == 200
    assert len(reactor.udp) == 1 and svc.status()["rtsp"]["relay_ports"] == 1
    hosts = {kw["host"] for kind, *rest in calls for kw in [rest[-1]] if kind in ("start", "rpc")}
    assert hosts == {"127.0.103.1"}  # every node sends to the relay here, nowhere else
    assert c.ask(c.conn.teardown(URL)).status == 200
    assert not reactor.udp[0].open


def test_fanout_nodes_send_to_the_rtsp_peer() -> None:
    """With fan-out every node is told to send to the RTSP client's own address."""
    svc, reactor, calls = service()
    c = Client(svc)
    assert c.setup("RTP/AVP;unicast;client_port=5000-5001;x-yima-fanout").status == 200
    assert c.ask(c.conn.play(URL)).status == 200
    starts = [rest[-1] for kind, *rest in calls if kind == "start"]
    starts += [rest[-1] for kind, *rest in calls if kind == "rpc" and rest[1] is StreamStart]
    assert len(starts) == 3 and {(s["host"], s["port"]) for s in starts} == {(CLIENT, 5000)}
    assert reactor.udp == []


def test_fanout_setups_ask_each_member_for_its_ports_once_per_boot() -> None:
    """x-yima-nodes comes from StreamPorts answers kept per member: a second fan-out
    SETUP asks nobody; a member back with a new boot number is asked again."""
    svc, _reactor, calls = service()

    def ports_asked() -> list[str]:
        return [rest[0] for kind, *rest in calls if kind == "rpc" and rest[1] is StreamPorts]

    spec = "RTP/AVP;unicast;client_port=5000-5001;x-yima-fanout"
    first = Client(svc).setup(spec)
    assert first.status == 200 and sorted(ports_asked()) == ["127.0.103.2:7946", "127.0.103.3:7946"]
    second = Client(svc).setup(spec)
    assert second.status == 200 and len(ports_asked()) == 2
    assert nodes_of(second) == nodes_of(first) and "6970-6971" in nodes_of(first)
    assert svc.status()["streaming"]["port_answers_reused"] == 2
    members = svc.node.view.members
    members[2] = Member("c", "127.0.103.3:7946", incarnation=2)  # c rebooted
    assert Client(svc).setup(spec).status == 200
    assert ports_asked()[2:] == ["127.0.103.3:7946"]


def nodes_of(r: Response) -> str:
    """The x-yima-nodes parameter of a SETUP answer's Transport."""
    t = r.headers.get("Transport") or ""
    return next(p for p in t.split(";") if p.startswith("x-yima-nodes="))


def test_unplayed_setups_cost_no_socket_and_no_rpc_when_reaped() -> None:
    """Many SETUPs without PLAY open no UDP socket, hit the per-client cap, and expire
    after setup_timeout without a single RPC to the other nodes."""
    svc, reactor, calls = service(max_sessions_per_client=20, setup_timeout=15.0)
    statuses = []
    for _ in range(30):
        c = Client(svc)
        statuses.append(c.setup("RTP/AVP;unicast;client_port=5000-5001").status)
    assert statuses == [200] * 20 + [453] * 10
    assert reactor.udp == [] and len(svc.plans) == 20
    reactor.advance(15.0)
    assert svc.plans == {} and len(svc.factory.sessions) == 0
    assert not [c for c in calls if c[0] == "rpc" and c[2] is StreamControl]
    status = svc.status()["rtsp"]
    assert status["refused_sessions"] == 10 and status["reaped"] == 20


def test_rtsp_guard_options_are_checked(tmp_path: Path) -> None:
    """--rtsp-* options reach the factory keywords; zero or non-numbers are usage errors."""
    base = [
        "--node-id",
        "y1",
        "--data-dir",
        str(tmp_path),
        "--cluster",
        "tcp:17946:interface=127.0.103.1",
    ]
    o = Options()
    o.parseOptions([*base, "--rtsp-max-sessions-per-client", "5", "--rtsp-setup-timeout", "2.5"])
    assert o["rtsp_guards"] == {"max_sessions": 1024, "max_sessions_per_client": 5,
                                "setup_timeout": 2.5, "idle_timeout": 30.0}  # fmt: skip
    svc, _, _ = service(**o["rtsp_guards"])
    assert svc.factory.sessions.max_per_client == 5 and svc.factory.idle_timeout == 30.0
    for bad in (["--rtsp-max-sessions", "0"], ["--rtsp-idle-timeout", "soon"]):
        with pytest.raises(UsageError):
            Options().parseOptions([*base, *bad])


def test_rtsp_max_connections_option(tmp_path: Path) -> None:
    """--rtsp-max-connections N caps the node's RTSP connections in all; auto (the
    default) leaves the factory's default, from the open-file limit; anything but a
    positive whole number or auto is a usage error."""
    from yimaporc.rtsp._factory import default_max_connections

    base = ["--node-id", "y1", "--data-dir", str(tmp_path),
            "--cluster", "tcp:17946:interface=127.0.191.1"]  # fmt: skip
    o = Options()
    o.parseOptions(base)
    assert "max_connections" not in o["rtsp_guards"]
    assert service(**o["rtsp_guards"])[0].factory.max_connections == default_max_connections()
    o = Options()
    o.parseOptions([*base, "--rtsp-max-connections", "500"])
    assert o["rtsp_guards"]["max_connections"] == 500
    assert service(**o["rtsp_guards"])[0].factory.max_connections == 500
    for bad in ("0", "-3", "many", "1.5"):
        with pytest.raises(UsageError, match="rtsp-max-connections"):
            Options().parseOptions([*base, "--rtsp-max-connections", bad])


def test_connections_of_all_clients_are_capped() -> None:
    """Past max_connections in all, from as many addresses as there are connections, a
    new connection gets 503 and is closed, counted in status (rtsp) apart from the
    per-client refusals; a freed slot is reusable, a session in progress goes on."""
    svc, _reactor, _calls = service(max_connections=3)
    held = [Client(svc, host=f"127.0.191.{i}") for i in range(1, 4)]
    assert held[0].setup("RTP/AVP;unicast;client_port=5000-5001").status == 200
    extra = Client(svc, host="127.0.191.4")
    assert extra.transport.value().startswith(
        b"RTSP/1.0 503 Service Unavailable: too many connections to this server\r\n"
    )
    assert extra.transport.disconnecting
    assert held[0].ask(held[0].conn.play(URL)).status == 200
    held[2].proto.connectionLost()
    again = Client(svc, host="127.0.191.5")
    assert again.ask(again.conn.options(URL)).status == 200
    rtsp = svc.status()["rtsp"]
    assert rtsp["refused_server_connections"] == 1 and rtsp["refused_connections"] == 0
    assert rtsp["max_connections"] == 3 and rtsp["connections"] == 3
    assert rtsp["refused"] == {"503": 1} and rtsp["sessions"] == 1


def test_resetup_of_a_started_stream_cannot_leak_its_relay() -> None:
    """SETUP again on a played session is 455: SETUP+PLAY loops cannot pile up relay
    sockets; an unplayed session may be set up again (nothing to leak)."""
    svc, reactor, _ = service()
    c = Client(svc)
    udp = "RTP/AVP;unicast;client_port=5000-5001"
    assert c.setup(udp).status == 200
    assert c.setup(udp).status == 200  # still unplayed: re-planned
    assert c.ask(c.conn.play(URL)).status == 200
    for _ in range(3):
        assert c.setup(udp).status == 455
        assert c.ask(c.conn.play(URL)).status == 200
    assert len(reactor.udp) == 1


def test_send_path_and_block_cache_options_are_checked(tmp_path: Path) -> None:
    """--send-path takes auto|gso|sendmmsg|sendto and --block-cache-mb a positive whole
    number of MiB; anything else is a usage error."""
    base = ["--node-id", "y1", "--data-dir", str(tmp_path),
            "--cluster", "tcp:17946:interface=127.0.103.1"]  # fmt: skip
    o = Options()
    o.parseOptions(base)
    assert o["send-path"] == "auto" and o["cache_bytes"] == 256 << 20
    o = Options()
    o.parseOptions([*base, "--send-path", "sendmmsg", "--block-cache-mb", "64"])
    assert o["send-path"] == "sendmmsg" and o["cache_bytes"] == 64 << 20
    for bad in (["--send-path", "splice"], ["--block-cache-mb", "0"],
                ["--block-cache-mb", "1.5"]):  # fmt: skip
        with pytest.raises(UsageError, match=r"send-path|block-cache-mb"):
            Options().parseOptions([*base, *bad])


@pytest.mark.parametrize(
    ("flag", "key", "reached"),
    [
        ("--send-ahead-ms", "send_ahead", lambda n: [n.streaming.streaming.engine.send_ahead]),
        (
            "--relay-send-ahead-ms",
            "relay_send_ahead",
            lambda n: [n.streaming.relay_send_ahead, n.streaming.relay_clock.slack],
        ),
    ],
)
def test_send_ahead_options_reach_the_engine_and_the_relay(
    tmp_path: Path, flag: str, key: str, reached: Any
) -> None:
    """--send-ahead-ms and --relay-send-ahead-ms (default 10, 0..200) become the node
    config's send_ahead / relay_send_ahead: the in-process delivery engine's look-ahead /
    the relay's look-ahead and its clock's slack; each leaves the other at its default;
    anything else is a usage error."""
    from yimaporc.tap.yima import yima_config

    base = ["--node-id", "y1", "--data-dir", str(tmp_path),
            "--cluster", "tcp:17946:interface=127.0.173.1", "--workers", "0"]  # fmt: skip
    o = Options()
    o.parseOptions(base)
    assert o[key] == pytest.approx(0.01)
    o = Options()
    o.parseOptions([*base, flag, "40"])
    config = yima_config(o)
    other = "relay_send_ahead" if key == "send_ahead" else "send_ahead"
    assert getattr(config, key) == pytest.approx(0.04)
    assert getattr(config, other) == pytest.approx(0.01)
    node = YimaNode.from_config(MemoryReactorClock(), config)
    assert reached(node) == [pytest.approx(0.04)] * len(reached(node))
    for bad in ("-1", "201", "x"):
        with pytest.raises(UsageError, match=flag.lstrip("-")):
            Options().parseOptions([*base, flag, bad])


def test_setup_of_a_track_the_presentation_lacks_is_404() -> None:
    """SETUP names the presentation or its one track (track1); any other stream of it is
    404 with the reason (no plan, no session), as is a control URL with more path."""
    svc, _reactor, _calls = service()
    for url in (URL + "/track9", URL + "/track-1", URL + "/track1/x", URL + "/track10"):
        c = Client(svc)
        r = c.ask(c.conn.request("SETUP", url, [("Transport", "RTP/AVP;client_port=5000-5001")]))
        assert r.status == 404 and "clip has no stream" in r.reason, url
    assert svc.plans == {} and len(svc.factory.sessions) == 0
    for url in (URL, URL + "/", URL + "/track1", URL + "/track1?x=1"):
        c = Client(svc)
        r = c.ask(c.conn.request("SETUP", url, [("Transport", "RTP/AVP;client_port=5000-5001")]))
        assert r.status == 200, url


def test_udp_client_port_zero_is_refused() -> None:
    """client_port=0 is no port a player listens on (the node's sends would all fail): 461
    with the reason, no plan; a TCP alternative after it still wins."""
    svc, reactor, calls = service()
    c = Client(svc)
    r = c.setup("RTP/AVP;unicast;client_port=0-1")
    assert r.status == 461 and "client_port" in r.reason
    assert svc.plans == {} and reactor.udp == [] and calls == []
    assert c.setup("RTP/AVP;unicast;client_port=0-1,RTP/AVP/TCP;unicast").status == 200


def test_every_refusal_counts_by_status() -> None:
    """Each error answer (request refused, or framing broken: 400 and the connection
    closed) counts in status()["rtsp"]["refused"] under its status code."""
    svc, _reactor, _calls = service()
    c = Client(svc)
    assert c.setup("RTP/AVP;unicast;client_port=0-1").status == 461
    assert (
        c.ask(c.conn.request("SETUP", URL + "/track9", [("Transport", "RTP/AVP/TCP")])).status
        == 404
    )
    assert c.ask(c.conn.request("PLAY", URL, [("Session", "nope")])).status == 454
    assert c.ask(c.conn.request("FOO", URL)).status == 501
    assert c.ask(c.conn.options(URL)).status == 200
    bad = Client(svc)
    bad.proto.dataReceived(b"OPTIONS " + URL.encode() + b" RTSP/1.0\r\n\r\n")  # no CSeq
    assert bad.transport.value().startswith(b"RTSP/1.0 400 ")
    assert svc.status()["rtsp"]["refused"] == {"400": 1, "404": 1, "454": 1, "461": 1, "501": 1}


def test_connections_of_one_client_are_capped() -> None:
    """Past max_connections_per_client (default: its session cap + 64) a client's new
    connection gets 503 with the reason and is closed, counted; a slot freed is reusable
    and other addresses are not affected."""
    assert service()[0].factory.max_connections_per_client == 64 + 64
    svc, _reactor, _calls = service(max_connections_per_client=3)
    held = [Client(svc) for _ in range(3)]
    extra = Client(svc)
    assert extra.transport.value().startswith(
        b"RTSP/1.0 503 Service Unavailable: too many connections from 127.0.103.10\r\n"
    )
    assert extra.transport.disconnecting
    other = Client(svc, host="127.0.103.11")
    assert other.ask(other.conn.options(URL)).status == 200
    assert all(c.ask(c.conn.options(URL)).status == 200 for c in held)
    held[0].proto.connectionLost()
    again = Client(svc)
    assert again.ask(again.conn.options(URL)).status == 200
    rtsp = svc.status()["rtsp"]
    assert rtsp["refused_connections"] == 1 and rtsp["refused"] == {"503": 1}
    assert rtsp["connections"] == 4


def test_client_port_of_a_cluster_members_own_port_is_refused() -> None:
    """A client on a member's host naming that member's cluster port (RTP or RTCP) would
    turn the stream into a flood of datagrams at its membership socket: 461, no plan."""
    svc, reactor, calls = service()
    c = Client(svc, host="127.0.103.2")  # member b's host; b listens on 7946
    for ports in ("7946-7947", "7945-7946"):
        r = c.setup(f"RTP/AVP;unicast;client_port={ports}")
        assert r.status == 461 and "cluster port" in r.reason, ports
    assert svc.plans == {} and reactor.udp == [] and calls == []
    assert c.setup("RTP/AVP;unicast;client_port=5000-5001").status == 200
    other = Client(svc, host="127.0.103.50")  # not a member's host: its own port 7946
    assert other.setup("RTP/AVP;unicast;client_port=7946-7947").status == 200


def test_refusal_log_lines_are_budgeted() -> None:
    """A flood of refusals logs the first, then one summary per REFUSAL_LOG_INTERVAL
    with the count since the last line (shared by session and connection refusals)."""
    from yimaporc.rtsp._factory import REFUSAL_LOG_INTERVAL, _LogBudget

    budget = _LogBudget()
    assert budget.due(100.0) == 1
    assert [budget.due(100.0 + i) for i in range(1, 5)] == [0, 0, 0, 0]
    assert budget.due(100.0 + REFUSAL_LOG_INTERVAL) == 5
    assert budget.due(100.0 + REFUSAL_LOG_INTERVAL + 0.1) == 0
