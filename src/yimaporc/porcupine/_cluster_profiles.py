"""Profile replication (moved out of ``cluster.py``): :class:`ProfileReplicator` is
the one profile write path: the local SQLite write, then a push of the record to
every live member (``porcupine.profiles``), newest ``updated`` winning; hints carry
the records too, so a node that was down catches up when it manages the bucket.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from .profiledb import ProfileDB, Record
from .values import (
    Profile,
)

# --- profiles -------------------------------------------------------------------


class ProfileReplicator:
    """The one write path for profiles: local SQLite, then a push to every live member.

    ``push(records)`` sends records to the other nodes (None: a cluster of one);
    ``forget(address)`` drops cached copies after a change.  Issue 8 may swap the
    transport by passing another ``push``.
    """

    log = Logger()

    def __init__(
        self,
        profiles: ProfileDB,
        forget: Callable[[str], None],
        push: Callable[[list[Record]], Deferred[Any]] | None = None,
    ) -> None:
        self.profiles = profiles
        self.forget = forget
        self.push = push

    def _spread(self, address: str, result: Any) -> Deferred[Any]:
        self.forget(address)
        if self.push is None:
            return succeed(result)
        push = self.push

        def send(rec: Record | None) -> Deferred[Any]:
            return push([rec] if rec is not None else []) if rec is not None else succeed(None)

        d = self.profiles.record(address).addCallback(send)
        d.addErrback(lambda f: self.log.failure("profile push for {a} failed", f, a=address))
        return d.addCallback(lambda _: result)

    def add(self, address: str, password: str, replicas: int = 1) -> Deferred[Profile]:
        """Create here (``UserExists`` if known here), then push."""
        return self.profiles.add(address, password, replicas).addCallback(
            lambda p: self._spread(p.address, p)
        )

    def set_password(self, address: str, password: str) -> Deferred[None]:
        """New hash here (``NoSuchUser``), then push."""
        d = self.profiles.set_password(address, password)
        return d.addCallback(lambda _: self._spread(address.lower(), None))

    def remove(self, address: str) -> Deferred[None]:
        """Tombstone here (``NoSuchUser``), then push."""
        return self.profiles.remove(address).addCallback(
            lambda _: self._spread(address.lower(), None)
        )

    def receive(self, records: list[Record]) -> Deferred[list[str]]:
        """Merge records from a peer or a hint (newest wins); drop caches of changed ones."""

        def done(changed: list[str]) -> list[str]:
            for a in changed:
                self.forget(a)
            return changed

        return self.profiles.merge(records).addCallback(done)
