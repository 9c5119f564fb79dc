"""Node logging: per-source rate limit (task.Clock), rotation options, twistd observer hook."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import Application, MultiService
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, Logger, LogPublisher, formatEvent
from twisted.python import usage
from twisted.python.failure import Failure

from yimaporc.logs import (
    MAX_SUMMARIES,
    RateLimitedObserver,
    node_log_observer,
    source_key,
    with_log_observer,
)
from yimaporc.tap import yima


def limited(clock: Clock, **kw: Any) -> tuple[RateLimitedObserver, list[LogEvent], Logger]:
    out: list[LogEvent] = []
    observer = RateLimitedObserver(out.append, clock, **kw)
    publisher = LogPublisher(observer)
    return observer, out, Logger(namespace="test.flood", observer=publisher)


def summaries(events: list[LogEvent]) -> list[LogEvent]:
    return [e for e in events if e.get("log_namespace") == "yimaporc.logs"]


def test_flood_of_one_warning_is_cut_to_the_per_key_budget_then_summarised() -> None:
    """10,000 identical warnings in one interval: per_key pass, then one 'suppressed' line."""
    clock = Clock()
    observer, out, log = limited(clock, per_key=5, total=100, interval=10.0)
    for i in range(10_000):
        log.warn("bad command from {peer}: {n}", peer="10.0.0.9", n=i)
    assert len(out) == 5
    assert observer.suppressed_total == 9_995
    clock.advance(10.0)
    (summary,) = summaries(out)
    assert summary["suppressed"] == 9_995
    assert "suppressed 9995 log events like 'bad command from {peer}: {n}'" in formatEvent(summary)
    log.warn("bad command from {peer}: {n}", peer="10.0.0.9", n=0)
    assert len(out) == 7


def test_distinct_sources_have_their_own_budget_and_the_total_caps_all() -> None:
    """Different formats (or log_source_key values) count apart; the total bounds them all."""
    clock = Clock()
    _, out, log = limited(clock, per_key=3, total=10, interval=10.0)
    for _ in range(5):
        log.info("a")
        log.info("b")
    assert [formatEvent(e) for e in out] == ["a", "b"] * 3
    for i in range(20):
        for _ in range(4):
            log.info("login failed", log_source_key=f"10.0.0.{i}")
    assert len(out) == 10
    clock.advance(10.0)
    assert len(summaries(out)) == min(MAX_SUMMARIES, 22) + 1
    assert sum(e["suppressed"] for e in summaries(out)) == 4 + 80 - 4


def test_failures_and_legacy_text_are_keyed_by_type_and_normalised_text() -> None:
    """Tracebacks of one exception type and legacy lines differing only in numbers share a key."""
    try:
        raise ValueError("x")
    except ValueError:
        f1 = Failure()
    try:
        raise KeyError("y")
    except KeyError:
        f2 = Failure()
    base = {"log_namespace": "log_legacy", "log_format": "{log_text}"}
    assert source_key({**base, "log_text": "conn 10.0.0.1:4000 at 0x7f12ab"}) == source_key(
        {**base, "log_text": "conn 10.0.0.2:4711 at 0x7fffff"}
    )
    e1 = {"log_namespace": "n", "log_format": "Unhandled Error", "log_failure": f1}
    e2 = {"log_namespace": "n", "log_format": "Unhandled Error", "log_failure": f2}
    assert source_key(e1) != source_key(e2)
    assert source_key(e1) == source_key(dict(e1))


def test_summary_comes_out_when_the_flood_stops_without_another_event() -> None:
    """The summary is written by the scheduled flush at the end of the interval."""
    clock = Clock()
    _, out, log = limited(clock, per_key=1, total=100, interval=5.0)
    log.error("boom")
    log.error("boom")
    log.error("boom")
    assert summaries(out) == []
    clock.advance(4.9)
    assert summaries(out) == []
    clock.advance(0.2)
    assert [e["suppressed"] for e in summaries(out)] == [2]


def parse_yima(argv: list[str]) -> yima.Options:
    o = yima.Options()
    o.parseOptions(
        [
            "--node-id",
            "y1",
            "--data-dir",
            "/tmp/x",
            "--cluster",
            "tcp:7946:interface=127.0.106.1",
            *argv,
        ]
    )
    return o


def test_log_options_defaults_and_validation() -> None:
    """--log-format/--log-max-bytes/--log-max-files have defaults and reject bad values."""
    o = parse_yima([])
    assert (o["log-format"], o["log-max-bytes"], o["log-max-files"]) == ("text", 10_000_000, 5)
    assert o["log-rate"] == 20
    o = parse_yima(["--log-format", "json", "--log-max-bytes", "20000", "--log-max-files", "3"])
    assert (o["log-format"], o["log-max-bytes"], o["log-max-files"]) == ("json", 20000, 3)
    for bad in (
        ["--log-format", "xml"],
        ["--log-max-bytes", "10"],
        ["--log-max-files", "0"],
        ["--log-max-files", "many"],
        ["--log-rate", "-1"],
    ):
        with pytest.raises(usage.UsageError):
            parse_yima(bad)


class FakeTwistdOptions(dict[str, Any]):
    """The bits of twistd's ServerOptions a tap's options see as ``parent``."""


def test_observer_rotates_and_keeps_only_max_files(tmp_path: Path) -> None:
    """With twistd --logfile, the file rotates at max_bytes and only max_files rotated remain."""
    options = parse_yima([])
    logfile = tmp_path / "node.log"
    options.parent = FakeTwistdOptions(logfile=str(logfile), nodaemon=True)
    observer = node_log_observer(options, Clock(), max_bytes=5000, max_files=3)
    assert observer is not None
    log = Logger(namespace="test.rotate", observer=LogPublisher(observer))
    for i in range(2000):
        log.info("line {i} " + "x" * 60, i=i, log_source_key=str(i))
    rotated = sorted(p.name for p in tmp_path.iterdir() if p.name != "node.log")
    assert rotated == ["node.log.1", "node.log.2", "node.log.3"]
    assert all(p.stat().st_size < 5000 + 200 for p in tmp_path.iterdir())


def test_json_format_writes_one_json_event_per_record(tmp_path: Path) -> None:
    """--log-format json writes twisted.logger's JSON records."""
    options = parse_yima([])
    options.parent = FakeTwistdOptions(logfile=str(tmp_path / "n.log"), nodaemon=True)
    observer = node_log_observer(options, Clock(), log_format="json")
    assert observer is not None
    Logger(namespace="test.json", observer=LogPublisher(observer)).info("hello {who}", who="op")
    records = [json.loads(r) for r in (tmp_path / "n.log").read_text().split("\x1e") if r.strip()]
    assert [(r["log_format"], r["who"]) for r in records] == [("hello {who}", "op")]


def test_no_observer_outside_twistd_or_with_syslog() -> None:
    """Without twistd options, or with --syslog, twistd's own logging is left alone."""
    options = parse_yima([])
    assert node_log_observer(options, Clock()) is None
    options.parent = FakeTwistdOptions(syslog=True, nodaemon=True)
    assert node_log_observer(options, Clock()) is None
    options.parent = FakeTwistdOptions(logfile="-", nodaemon=True)
    assert node_log_observer(options, Clock()) is not None
    service = MultiService()
    assert with_log_observer(service, None) is service
    assert not isinstance(node_log_observer(options, Clock(), rate=0), RateLimitedObserver)


def test_wrapped_service_installs_observer_on_the_application() -> None:
    """twistd reads the ILogObserver component of the application the tap's service joins."""
    seen: list[LogEvent] = []
    service = MultiService()
    wrapped = with_log_observer(service, seen.append)
    app = Application("node")
    wrapped.setServiceParent(app)
    observer = app.getComponent(ILogObserver)
    observer({"log_format": "x"})
    assert seen == [{"log_format": "x"}]
    assert service.parent is wrapped


def test_stdout_observer_is_rate_limited_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """With -n and no --logfile the node logs to stdout, through the same rate limit."""
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    options = parse_yima([])
    options.parent = FakeTwistdOptions(nodaemon=True)
    observer = node_log_observer(options, Clock())
    assert isinstance(observer, RateLimitedObserver)
    log = Logger(namespace="t", observer=LogPublisher(observer))
    for _ in range(100):
        log.warn("same")
    assert out.getvalue().count("same") == observer.per_key
