"""The lease half of :class:`~yimaporc.porcupine.cluster.MailCluster`: pause detection,
the read lease a majority confirms, and the nodes ever seen (persisted).

A mixin (moved out of ``cluster.py`` unchanged): the attributes it declares are set by
``MailCluster.__init__``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from .._reactor import IClockThreads
from ._cluster_commands import ReadLease

if TYPE_CHECKING:
    from ..cluster.interfaces import IClusterNode
    from ._cluster_users import ClusterUserManager
    from .storage import MailStorage


class ClusterLease:
    """Pause detection and the read lease (``reconstruct.READ_LEASE``); the known nodes."""

    log: Logger
    reactor: IClockThreads
    node: IClusterNode
    me: str
    storage: MailStorage
    user_manager: ClusterUserManager
    call: Callable[..., Deferred[Any]]
    lease: float
    pause_grace: float
    pauses: int
    read_renewals: int
    _alone: bool
    _lease_until: float
    _last_tick: float | None
    _paused_at: float | None
    _known_path: Path

    # --- the lease (pause detection) -------------------------------------------------

    def lease_ok(self) -> bool:
        """May this node number and accept fenced stores now (thread-safe: a read)?
        Alone in the known cluster nobody can have replaced us: always."""
        if self._alone:  # a plain bool: read from the commit threads too
            return True
        return float(self.reactor.seconds()) <= self._lease_until

    def cluster_now(self) -> float | None:
        """The cluster's common time (timesync) while this node is synced to its
        reference, else None (thread-safe: reads)."""
        return self.node.synced_cluster_time()

    def _tick(self) -> None:
        """Renew the lease; a gap since the last tick means we were paused."""
        now = float(self.reactor.seconds())
        last, self._last_tick = self._last_tick, now
        if last is not None and now - last > self.lease / 2:
            self.pauses += 1
            self._paused_at = now
            self._lease_until = now - 1.0
            self.log.warn(
                "paused for {t:.2f}s: no numbering until a new view or {g}s",
                t=now - last,
                g=self.pause_grace,
            )
            # The read lease stays renewed: each round is a majority confirming our
            # view after we asked (a loaded reactor's lag looks like a pause; without
            # renewals every read would be refused for the whole grace).
            self._renew_read_lease(now)
            return
        if self._paused_at is not None and now < self._paused_at + self.pause_grace:
            self._renew_read_lease(now)
            return
        self._paused_at = None
        self._lease_until = now + self.lease
        self._renew_read_lease(now)

    def _renew_read_lease(self, now: float) -> None:
        """Have a majority confirm our view: the read lease (reconstruct.READ_LEASE)."""
        um = self.user_manager
        core = um.core
        if core.alone():
            return
        view = core.view_id()
        epoch, members = view

        def ask(node: str) -> Deferred[bool]:
            if node == self.me:
                return succeed(self._grant_read(epoch, list(members)))
            d = self.call(node, ReadLease, epoch=epoch, members=list(members))
            return d.addCallback(lambda r: bool(r["ok"]))

        def done(ok: bool) -> None:
            if ok:
                self.read_renewals += 1
                core.read_granted(view, now)
                um.read_renewed()

        um._on_majority(ask).addCallback(done)

    def _grant_read(self, epoch: int, members: list[str]) -> bool:
        view = (int(epoch), tuple(sorted(str(m) for m in members)))
        return self.user_manager.core.grant_read(view, float(self.reactor.seconds()))

    def _on_read_lease(self, epoch: int, members: list[str]) -> dict[str, Any]:
        return {"ok": self._grant_read(epoch, members)}

    # --- the nodes ever seen ------------------------------------------------------

    def _read_known(self) -> set[str]:
        """The nodes this node has ever seen in a view (read once, at start)."""
        try:
            text = self._known_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return set()
        return {line.strip() for line in text.splitlines() if line.strip()}

    def _remember(self, live: set[str]) -> None:
        """Grow the known cluster with ``live`` and persist it (off the reactor)."""
        known = self.user_manager.known
        if live <= known:
            return
        known |= live
        self._alone = known <= {self.me}
        text = "".join(f"{n}\n" for n in sorted(known))
        path = self._known_path

        def write() -> None:
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

        d = self.storage.run_blocking(write)
        d.addErrback(lambda f: self.log.failure("persisting the known nodes failed", f))
