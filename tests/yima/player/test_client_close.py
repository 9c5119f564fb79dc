"""The player's RTSP client (yima/player/client.py) when its run is abandoned."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from yimaporc.yima.player.client import Client
from yimaporc.yima.player.shell import ShellConfig


class _Proto:
    """An RTSP connection with a session whose TEARDOWN is never answered."""

    session_id = "S1"
    transport = None

    def __init__(self) -> None:
        self.teardowns: list[Deferred[Any]] = []

    def teardown(self, url: str) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.teardowns.append(d)
        return d


def test_closing_an_abandoned_run_starts_the_teardown_without_waiting() -> None:
    """A run dropped mid-setup is closed (garbage collection, ``coro.close()``): the
    TEARDOWN goes out, and closing does not fail with "coroutine ignored
    GeneratorExit" (the teardown used to be awaited in a ``finally``)."""
    client = Client(Clock(), ["rtsp://127.0.0.1/a"], ShellConfig(), lambda s, p: None)
    proto = _Proto()
    never: Deferred[Any] = Deferred()

    async def setup_one(i: int, url: str) -> Any:
        client.conns.append((url, proto))  # type: ignore[arg-type]
        return await never

    client._setup_one = setup_one  # type: ignore[method-assign]
    coro = client.run()
    try:
        coro.send(None)
    except StopIteration:  # pragma: no cover - it must suspend on ``never``
        raise AssertionError("the run did not wait") from None
    coro.close()  # raised RuntimeError before
    assert len(proto.teardowns) == 1
