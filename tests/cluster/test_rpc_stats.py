"""RpcClient counts its calls by command: successes, failures by kind, latency histogram."""

from __future__ import annotations

from typing import Any

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.test.iosim import ConnectionCompleter

from yimaporc.admin.metrics import rpc_families
from yimaporc.cluster.rpc import Echo, RpcClient, RpcRegistry, RpcServerFactory
from yimaporc.cluster.rpcstats import BUCKETS, RpcCallStats
from yimaporc.cluster.wire import Scope

KEY = b"r" * 32
SCOPE = Scope("test", "porcupine")


class Hang(amp.Command):
    commandName = b"test.hang"
    arguments: list[tuple[bytes, amp.Argument]] = []
    response: list[tuple[bytes, amp.Argument]] = []


class Boom(amp.Command):
    commandName = b"test.boom"
    arguments: list[tuple[bytes, amp.Argument]] = []
    response: list[tuple[bytes, amp.Argument]] = []
    errors = {ValueError: b"BAD"}


def boom() -> Any:
    raise ValueError("no")


def test_client_records_calls_errors_and_latency() -> None:
    """An answered echo, a peer error and a timed-out call land in the right counters
    and latency buckets; the metrics render them as one histogram per command."""
    registry = RpcRegistry()
    registry.register(Hang, lambda: Deferred())
    registry.register(Boom, boom)
    reactor = MemoryReactorClock()
    TCP4ServerEndpoint(reactor, 7946).listen(RpcServerFactory(registry, KEY, "s", scope=SCOPE))
    endpoint = TCP4ClientEndpoint(reactor, "10.0.0.1", 7946)
    client = RpcClient(reactor, KEY, "c", scope=SCOPE, timeout=5.0, endpoint_for=lambda a: endpoint)
    outcomes: list[Any] = []

    def call(command: type[amp.Command], delay: float, **kw: Any) -> None:
        # (iosim's transports have no `connected`: every call gets its own connection)
        client.call("10.0.0.1:7946", command, **kw).addBoth(outcomes.append)
        reactor.advance(delay)  # connecting (hence the call) takes this long on the clock
        pump = ConnectionCompleter(reactor).succeedOnce()
        assert pump is not None
        pump.flush()

    call(Echo, 0.003, payload=b"x")
    call(Boom, 0.0)
    call(Hang, 0.0)
    reactor.advance(5.1)
    assert len(outcomes) == 3, outcomes
    stats = client.calls.commands
    echo, bad, hang = stats["yimaporc.echo"], stats["test.boom"], stats["test.hang"]
    assert (echo.calls, echo.errors) == (1, {"unavailable": 0, "remote": 0})
    assert echo.counts[BUCKETS.index(0.005)] == 1 and abs(echo.total - 0.003) < 1e-9
    assert (bad.calls, bad.errors) == (1, {"unavailable": 0, "remote": 1})
    assert (hang.calls, hang.errors) == (1, {"unavailable": 1, "remote": 0})
    assert hang.cumulative()[BUCKETS.index(5.0)] == ("5.0", 0)
    assert hang.cumulative()[-1] == ("+Inf", 1)

    class One:
        def collect(self) -> Any:
            return rpc_families(client.calls)

    reg = CollectorRegistry(auto_describe=False)
    reg.register(One())  # type: ignore[arg-type]
    got: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in family.samples:
            got.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    assert got["yimaporc_rpc_calls_total"][(("command", "test.hang"),)] == 1
    errors = got["yimaporc_rpc_call_errors_total"]
    assert errors[(("command", "test.hang"), ("error", "unavailable"))] == 1
    assert errors[(("command", "test.boom"), ("error", "remote"))] == 1
    buckets = got["yimaporc_rpc_call_duration_seconds_bucket"]
    assert buckets[(("command", "yimaporc.echo"), ("le", "0.0025"))] == 0
    assert buckets[(("command", "yimaporc.echo"), ("le", "0.005"))] == 1
    assert got["yimaporc_rpc_call_duration_seconds_count"][(("command", "yimaporc.echo"),)] == 1


def test_stats_are_empty_until_a_call() -> None:
    """No call, no command: the families are present but without samples."""
    assert RpcCallStats().commands == {}
    assert all(not f.samples for f in rpc_families(RpcCallStats()))
