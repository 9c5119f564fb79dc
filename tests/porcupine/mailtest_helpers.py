"""Test helpers for the porcupine mail tests: synchronous pool and reactor fakes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.task import Clock
from twisted.python.failure import Failure

from yimaporc.porcupine.profiledb import hash_password


class SyncPool:
    """A ThreadPool stand-in that runs work at once, on the caller's thread."""

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *a: Any, **kw: Any
    ) -> None:
        try:
            result = f(*a, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class ImmediateReactor(Clock):
    """A Clock whose callFromThread runs the call at once."""

    def callFromThread(self, f: Callable[..., Any], *a: Any, **kw: Any) -> None:
        f(*a, **kw)


def fast_hash(password: str) -> str:
    """scrypt with tiny parameters, for speed in tests."""
    return hash_password(password, n=16, r=1, p=1)


def result_of(d: Any) -> Any:
    """The result of an already-fired Deferred (raises its failure)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]
