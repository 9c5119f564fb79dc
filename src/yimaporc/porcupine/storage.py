"""This node's mail on disk, built first so everything above it gets it at construction.

:class:`MailStorage` holds the thread pool, the fragment store, the in-memory
mailbox index, the local :class:`~.fragments.MailboxManager`, the profile DB and the
registry of IMAP mailboxes open here.  The composition root
(:class:`~.node.PorcupineNode`) builds it, then the replication and cluster
strategies over it, then the :class:`~.service.MailService` with them; a
single-node ``MailService`` builds its own.  The mail service owns its life cycle
(:meth:`start`, :meth:`recover`, :meth:`close`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from .._reactor import IClockThreads
from ._imap_registry import MailboxRegistry
from .authcache import DEFAULT_SIZE, DEFAULT_TTL
from .bodycache import DEFAULT_MAX_BYTES as DEFAULT_BODY_CACHE_BYTES
from .bodycache import BodyCache
from .fragments import FragmentStore, MailboxManager
from .mailindex import DEFAULT_MAX_ROWS, MailIndex
from .profiledb import ProfileDB

__all__ = ["MailStorage"]


class MailStorage:
    """The disk side of one Porcupine node (see the module docstring)."""

    log = Logger()

    def __init__(
        self,
        reactor: IClockThreads,
        node_id: str,
        data_dir: Path | str,
        *,
        threadpool: ThreadPool | None = None,
        mail_index_rows: int = DEFAULT_MAX_ROWS,
        mail_body_cache_bytes: int = DEFAULT_BODY_CACHE_BYTES,
        auth_cache_ttl: float = DEFAULT_TTL,
        auth_cache_size: int = DEFAULT_SIZE,
    ) -> None:
        self.reactor = reactor
        self.node_id = node_id
        self.data_dir = Path(data_dir)
        self.own_pool = threadpool is None
        self.pool = threadpool or ThreadPool(minthreads=2, maxthreads=8, name="yimaporc-mail")
        now = reactor.seconds
        self.fragment_store = FragmentStore(self.data_dir, node_id, now)
        #: Users' mailboxes here in memory (issue 20), bounded by ``mail_index_rows``.
        self.mail_index = MailIndex(mail_index_rows)
        #: Bodies read or stored recently, bounded by ``mail_body_cache_bytes``.
        self.body_cache = BodyCache(mail_body_cache_bytes)
        #: This node's own mailbox manager (replication wraps it, never replaces it).
        self.mailbox_manager = MailboxManager(
            reactor, self.pool, self.fragment_store, index=self.mail_index, bodies=self.body_cache
        )
        self.profiles = ProfileDB(
            reactor,
            self.pool,
            self.data_dir / "mail" / "profiles.sqlite",
            now,
            auth_cache_ttl=auth_cache_ttl,
            auth_cache_size=auth_cache_size,
        )
        #: IMAP mailboxes open here (woken on changes).
        self.registry = MailboxRegistry()
        self.mailbox_manager.on_change(self.registry.changed)
        self._recovery: Deferred[Any] | None = None

    def run_blocking(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run blocking ``f(*args)`` on the pool."""
        return deferToThreadPool(self.reactor, self.pool, f, *args)

    def start(self) -> None:
        """Start the pool (if it is ours)."""
        if self.own_pool:
            self.pool.start()

    def recover(self) -> Deferred[list[str]]:
        """Drop anything half-stored (on the pool); fires with the users with mail here."""

        def recover() -> list[str]:
            removed = self.fragment_store.recover()
            if removed:
                self.log.info("mail: removed {n} half-stored files", n=removed)
            return self.fragment_store.users_with_mail()

        d = self.run_blocking(recover)
        self._recovery = d
        return d

    def after_recovery(self) -> Deferred[None] | None:
        """Fires (never fails) once the recovery in progress is over; None if none ran."""
        if self._recovery is None:
            return None
        out: Deferred[None] = Deferred()

        def relay(result: object) -> object:
            out.callback(None)
            return result

        self._recovery.addBoth(relay)
        return out

    def close(self) -> None:
        """Stop the pool (if ours) and close the databases."""
        if self.own_pool:
            self.pool.stop()
        self.fragment_store.close()
        self.profiles.close()
