"""Thread pool look-alikes for unit tests (``callInThreadWithCallback`` only).

:class:`ImmediatePool` runs each job at once in the caller; :class:`RecordingPool`
keeps jobs until the test runs them, so a test can hold a write "in flight",
check what happened meanwhile, and see on which thread each job was submitted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import attrs
from twisted.python.failure import Failure

__all__ = ["CallsNow", "ImmediatePool", "Job", "RecordingPool"]

OnResult = Callable[[bool, Any], None] | None


def _run(on_result: OnResult, func: Callable[..., Any], args: Any, kw: Any) -> None:
    try:
        result = func(*args, **kw)
    except BaseException:
        if on_result is not None:
            on_result(False, Failure())
        return
    if on_result is not None:
        on_result(True, result)


class CallsNow:
    """The one reactor method a pool's result needs: ``callFromThread``, at once."""

    def callFromThread(self, f: Callable[..., object], *args: Any, **kw: Any) -> None:
        """Call ``f`` now."""
        f(*args, **kw)


class ImmediatePool:
    """Runs each job at once, in the caller, and reports like ``ThreadPool`` does."""

    def __init__(self) -> None:
        self.jobs = 0

    def callInThreadWithCallback(
        self, onResult: OnResult, func: Callable[..., Any], *args: Any, **kw: Any
    ) -> None:
        """Run ``func`` now; then ``onResult(success, result)``."""
        self.jobs += 1
        _run(onResult, func, args, kw)


@attrs.define
class Job:
    """One job handed to a :class:`RecordingPool`."""

    func: Callable[..., Any]
    args: tuple[Any, ...]
    kw: dict[str, Any]
    on_result: OnResult
    #: The thread that submitted the job.
    thread: int


class RecordingPool:
    """Keeps jobs in order until :meth:`run_next` / :meth:`run_all` runs them."""

    def __init__(self) -> None:
        self.pending: list[Job] = []
        self.done: list[Job] = []

    def callInThreadWithCallback(
        self, onResult: OnResult, func: Callable[..., Any], *args: Any, **kw: Any
    ) -> None:
        """Record the job (nothing runs yet)."""
        self.pending.append(Job(func, args, kw, onResult, threading.get_ident()))

    def run_next(self) -> Job:
        """Run the oldest pending job, then its ``onResult``; the job."""
        job = self.pending.pop(0)
        self.done.append(job)
        _run(job.on_result, job.func, job.args, job.kw)
        return job

    def run_all(self) -> int:
        """Run pending jobs (and any they cause) until none is left; how many ran."""
        n = 0
        while self.pending:
            self.run_next()
            n += 1
        return n
