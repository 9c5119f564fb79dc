"""Helpers of the group-commit tests: a pool that runs work when told, a lock probe."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure

from yimaporc.porcupine.fragments import FragmentStore


class QueuedPool:
    """A ThreadPool stand-in that queues work until the test runs it."""

    def __init__(self) -> None:
        self.queue: list[
            tuple[Callable[[bool, Any], None], Callable[..., Any], tuple[Any, ...]]
        ] = []

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *a: Any
    ) -> None:
        self.queue.append((on_result, f, a))

    def run_one(self) -> None:
        """Run the oldest queued call and deliver its result."""
        on_result, f, a = self.queue.pop(0)
        try:
            result = f(*a)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


def reader_blocked(store: FragmentStore, bucket: int) -> bool:
    """Would another thread have to wait to read ``bucket`` now?"""
    out: list[bool] = []

    def probe() -> None:
        lock = store._lock_for(bucket)
        got = lock.acquire(blocking=False)
        if got:
            lock.release()
        out.append(not got)

    t = threading.Thread(target=probe)
    t.start()
    t.join(10)
    return out == [True]
