"""Bounded concurrency for the storage parts (no mass of Deferreds up front)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, maybeDeferred
from twisted.python.failure import Failure

__all__ = ["bounded"]


def bounded(
    width: int, thunks: Iterable[Callable[[], Deferred[Any]]]
) -> Deferred[list[tuple[bool, Any]]]:
    """Run ``thunks`` at most ``width`` at a time, like a ``DeferredList(consumeErrors=True)``
    of them, but starting each only when a slot is free (no mass of Deferreds up front)."""
    work = iter(enumerate(thunks))
    results: dict[int, tuple[bool, Any]] = {}

    @inlineCallbacks
    def worker() -> Generator[Deferred[Any], Any, None]:
        for k, thunk in work:
            try:
                value = yield maybeDeferred(thunk)
            except Exception:
                results[k] = (False, Failure())
            else:
                results[k] = (True, value)

    done = gatherResults([worker() for _ in range(width)])
    return done.addCallback(lambda _: [results[k] for k in sorted(results)])
