"""Numbering mail stored unnumbered: a part of
:class:`~yimaporc.porcupine._cluster_users.ClusterUserManager` (moved out of
``_cluster_users.py`` unchanged, a mixin).

A delivery that could not be numbered (no majority for a UID mark, a fence lost)
stores its message PENDING on the holder node and notes it to the user's manager
(:meth:`PendingNumbering.note_pending`); the reconstruction core schedules a
:class:`~yimaporc.porcupine.reconstruct.Number` job, which records the holder on a
majority, takes UIDs and has the node number its oldest unnumbered mail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from .reconstruct import Number, Reconstruction
from .values import PENDING


class PendingNumbering:
    """``note_pending`` and the numbering job (the attributes and methods it uses are
    ``ClusterUserManager``'s)."""

    log: Logger
    core: Reconstruction
    number_on: Callable[..., Deferred[tuple[int, int, int]]] | None
    holders_on: Callable[..., Deferred[bool]] | None

    if TYPE_CHECKING:

        def _now(self) -> float: ...

        def _rearm(self) -> None: ...

        def _take(
            self,
            address: str,
            count: int,
            unfenced: bool = False,
            again: bool = True,
            numbering: bool = False,
            track: bool = True,
            ttl: float | None = None,
        ) -> Deferred[tuple[int, str]]: ...

        def _record_holder(self, address: str, node: str) -> Deferred[bool]: ...

    def note_pending(self, address: str, node: str) -> Deferred[None]:
        """A message for ``address`` was stored unnumbered on ``node``."""
        self.core.note_pending(address.lower(), node, self._now())
        self._rearm()
        return succeed(None)

    def _number(self, job: Number) -> None:
        """Record ``job.node`` as a holder on a majority (if not yet in this tenure),
        take UIDs, have the node number its oldest unnumbered mail with them."""
        user, node = job.user, job.node

        block: list[int] = []

        def done(r: tuple[int, int, int]) -> None:
            numbered, left, top = r
            first = block[0] if block else None
            if self.core.number_done(user, node, numbered, left, top, self._now(), first=first):
                self._record_holder(user, node)
            self._rearm()

        def failed(f: Failure) -> None:
            self.log.warn(
                "numbering {u}'s mail on {n} failed: {e}", u=user, n=node, e=f.getErrorMessage()
            )
            self.core.number_failed(user, node, self._now())
            self._rearm()

        def go(taken: tuple[int, str]) -> Deferred[Any] | None:
            first, fence = taken
            if first == PENDING:  # lost the right meanwhile (or no majority for a mark)
                self.core.number_cancelled(user, node, self._now())
                self._rearm()
                return None
            assert self.number_on is not None
            block.append(first)
            return self.number_on(node, user, fence, first, job.count).addCallbacks(done, failed)

        def recorded(_: object) -> Deferred[Any] | None:
            if self.holders_on is not None and not self.core.holder_ok(user, node):
                # No majority knows this node holds the user's mail: a manager after a
                # partition could show higher UIDs without waiting for it. Later.
                self.core.number_cancelled(user, node, self._now())
                self._rearm()
                return None
            return self._take(user, job.count, numbering=True).addCallback(go)

        self._record_holder(user, node).addCallback(recorded)
