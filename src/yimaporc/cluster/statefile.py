"""One small state file kept current off the reactor: ordered, coalesced writes.

A node persists a few small documents whenever its view changes (its membership
state, the bucket map cache).  Writing and fsyncing them on the reactor would
stall every timer and socket of the node for as long as the disk takes, so
:class:`StateFile` hands each write to an injected thread pool:

- one write at a time, in the order states were saved;
- while a write is in flight only the newest pending state is kept: three saves
  during one slow write make two writes, and the last state wins;
- :meth:`StateFile.when_saved` fires once everything saved so far is on disk
  (the node waits for it before announcing itself, and when it stops);
- a failed write is counted (:attr:`StateFile.stats`) and logged once per run of
  failures; the next save tries again, and the caller keeps running.

The file is replaced atomically (temporary file, ``os.replace``); a durable one is
fsynced, and so is its directory, before the write counts as done.  The pool only
needs ``callInThreadWithCallback`` (a Twisted ``ThreadPool`` or the simulation
kernel's) and the reactor ``callFromThread``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["Pool", "StateFile", "write_atomically"]

Render = Callable[[], bytes]


class Pool(Protocol):
    """What :class:`StateFile` uses of a thread pool."""

    def callInThreadWithCallback(
        self,
        onResult: Callable[[bool, Any], None] | None,
        func: Callable[..., Any],
        *args: Any,
        **kw: Any,
    ) -> None:
        """Run ``func`` in a thread, then ``onResult(success, result)`` there."""


def write_atomically(path: Path, data: bytes, *, durable: bool) -> None:
    """Replace ``path`` with ``data`` (blocking); ``durable``: fsync file and directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class StateFile:
    """The newest saved state of one file, written off the reactor (see the module doc)."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorFromThreads,
        pool: Pool | Callable[[], Pool],
        path: Path,
        *,
        durable: bool,
        write: Callable[[Path, bytes], None] | None = None,
    ) -> None:
        """``pool`` may be a callable returning it, resolved at the first save (a node
        built before its reactor runs asks for the reactor's pool only when needed)."""
        self.reactor = reactor
        self._pool = pool
        self.path = path
        self.durable = durable
        self._write_file = write or (lambda p, d: write_atomically(p, d, durable=durable))
        #: ``writes``: done; ``failed``: writes that raised; ``coalesced``: saves replaced
        #: by a newer one before their turn came.
        self.stats = {"writes": 0, "failed": 0, "coalesced": 0}
        self._pending: Render | None = None
        self._busy = False
        self._saved = 0  # states handed to save() so far
        self._done = 0  # the newest of them known to be on disk
        self._failing = 0  # failures since the last success
        self._waiters: list[tuple[int, Deferred[None]]] = []

    def _resolve_pool(self) -> Pool:
        pool = self._pool
        if not hasattr(pool, "callInThreadWithCallback"):
            pool = self._pool = pool()  # type: ignore[operator]
        return pool  # type: ignore[return-value]

    def save(self, render: Render) -> None:
        """Write ``render()`` (called in the pool: give it a snapshot) after the writes
        before it; superseded by any newer save made before its turn."""
        self._saved += 1
        if self._pending is not None:
            self.stats["coalesced"] += 1
        self._pending = render
        if not self._busy:
            self._next()

    def when_saved(self) -> Deferred[None]:
        """Fires once every state saved so far is on disk; errbacks with the error of
        the write that should have covered the newest of them."""
        target = self._saved
        if self._done >= target:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append((target, d))
        return d

    @property
    def busy(self) -> bool:
        """A write is in flight."""
        return self._busy

    def _next(self) -> None:
        render, self._pending = self._pending, None
        assert render is not None
        self._busy = True
        number = self._saved

        def on_result(ok: bool, result: object) -> None:
            self.reactor.callFromThread(self._finished, number, ok, result)

        self._resolve_pool().callInThreadWithCallback(on_result, self._write, render)

    def _write(self, render: Render) -> None:
        self._write_file(self.path, render())

    def _finished(self, number: int, ok: bool, result: object) -> None:
        self._busy = False
        covered = [(t, d) for t, d in self._waiters if t <= number]
        self._waiters = [(t, d) for t, d in self._waiters if t > number]
        if ok:
            self.stats["writes"] += 1
            self._done = number
            if self._failing:
                self.log.info(
                    "{path} written again after {n} failed attempt(s)",
                    path=str(self.path),
                    n=self._failing,
                )
            self._failing = 0
            for _, d in covered:
                d.callback(None)
        else:
            failure = result if isinstance(result, Failure) else Failure(RuntimeError(result))
            self.stats["failed"] += 1
            self._failing += 1
            if self._failing == 1:
                self.log.failure(
                    "cannot write {path} (counted; the next save tries again)",
                    failure=failure,
                    path=str(self.path),
                )
            for _, d in covered:
                d.errback(failure)
        if self._pending is not None:
            self._next()
