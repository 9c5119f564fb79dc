"""The outbound queue says once when it is stuck and once when it is not any more."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mailtest_helpers import SyncPool
from test_outbound import T0, Reactor, RemoteMX, serve, spool
from twisted.internet.defer import Deferred, succeed
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from yimaporc.porcupine.outbound import OutboundSender, Routes


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    """Every event published while the test runs."""
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def of(events: list[LogEvent], kind: str) -> list[str]:
    return [formatEvent(e) for e in events if e.get("event") == kind]


def test_queue_stuck_is_one_warning_then_one_line_when_it_clears(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """A message deferred past stuck_after logs one queue_stuck warning (with its domain,
    attempts and last error), not one per retry; delivering it logs queue_unstuck."""
    spool(tmp_path / "outbound", "m1", "alice@example.org", ["bob@remote.test"], b"x\r\n")
    envelope = tmp_path / "outbound" / "m1.json"
    envelope.write_text(json.dumps({**json.loads(envelope.read_text()), "queued_at": T0}))
    reactor = Reactor()
    reactor.advance(T0)

    def bounce(sender: bytes, rcpt: str, body: bytes) -> Deferred[Any]:
        return succeed(None)

    routes = Routes({"remote.test": ("10.9.9.9", 25)})
    s = OutboundSender(reactor, SyncPool(), tmp_path / "outbound", "n1.example.org", bounce,  # type: ignore[arg-type]
                       routes, stuck_after=100.0)  # fmt: skip
    s.startService()
    refuse = RemoteMX({"bob@remote.test": 451})
    serve(reactor, refuse, ("10.9.9.9", 25))  # attempt 1 at T0, retry after 60 s
    reactor.advance(60)
    serve(reactor, refuse, ("10.9.9.9", 25))  # attempt 2 at T0+60 (not stuck yet), 300 s
    assert of(logged, "queue_stuck") == []
    reactor.advance(300)  # T0+360: stuck
    (line,) = of(logged, "queue_stuck")
    assert "queue stuck: 1 message(s)" in line and "remote.test" in line
    assert "2 attempt(s)" in line and "451" in line
    serve(reactor, refuse, ("10.9.9.9", 25))
    reactor.advance(900)
    assert len(of(logged, "queue_stuck")) == 1  # still stuck: no second line
    assert of(logged, "queue_unstuck") == []
    serve(reactor, RemoteMX(), ("10.9.9.9", 25))
    assert s.entries == {}
    (clear,) = of(logged, "queue_unstuck")
    assert "no longer stuck: 0 message(s)" in clear
    s.stopService()
