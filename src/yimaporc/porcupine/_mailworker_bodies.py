"""A mail worker's mailbox manager (:class:`LocalBodies`): the main's, with the bodies
this node holds read from their files in the worker (:mod:`._mailworker_proc`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed

from ._cluster_remote import RemoteMailboxManager
from .bodycache import BodyCache
from .fragments import BODY_SUFFIX
from .usermap import bucket_dir, bucket_of
from .values import Digest

__all__ = ["MAX_LISTINGS", "LocalBodies"]

_KEY = re.compile(r"^[0-9a-f]{32}" + re.escape(BODY_SUFFIX) + "$")
#: Mailboxes whose UID -> body key map a worker keeps at most (then it starts over).
MAX_LISTINGS = 20_000


class LocalBodies:
    """The main node's mailbox manager as a worker uses it: every call goes to the
    main (:class:`RemoteMailboxManager`), except that message bodies listed as held by
    this node are read from their files here, on the worker's thread pool.

    A body file is never rewritten (its key is a fresh uuid4, the file renamed into
    place once complete and removed once no message refers to it), so a key from a
    listing names the same bytes for as long as the file exists; a file gone (the
    message expunged meanwhile) is left out, as the main's own read does, and a UID
    without a known key is asked of the main.  The keys come from the main's own
    answers to ``view`` and ``digests`` (never from a client)."""

    def __init__(
        self,
        remote: RemoteMailboxManager,
        node_id: str,
        data_dir: Path,
        read: Callable[..., Deferred[Any]],
        cache: BodyCache | None = None,
    ) -> None:
        self.remote = remote
        #: Bodies read here lately, by key (a key's bytes never change: always exact).
        self.cache = cache if cache is not None else BodyCache(0)
        self.node_id = node_id
        self.root = Path(data_dir) / "mail" / "buckets"
        self._read = read
        self.keys: dict[tuple[str, str], dict[int, str]] = {}
        #: Bodies read here, and asked of the main (``fetch``).
        self.read_here = 0
        self.asked = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.remote, name)

    def _note(self, user: str, mailbox: str, digests: Sequence[Digest] | None) -> None:
        if digests is None:
            return
        if len(self.keys) >= MAX_LISTINGS:
            self.keys.clear()
        self.keys[(user, mailbox)] = {
            d.uid: d.key for d in digests if d.node == self.node_id and _KEY.match(d.key)
        }

    def view(self, user: str, mailbox: str) -> Deferred[Any]:
        def note(r: Any) -> Any:
            self._note(user, mailbox, r[1])
            return r

        return self.remote.view(user, mailbox).addCallback(note)

    def digests(self, user: str, mailbox: str) -> Deferred[list[Digest]]:
        def note(r: list[Digest]) -> list[Digest]:
            self._note(user, mailbox, r)
            return r

        return self.remote.digests(user, mailbox).addCallback(note)

    def fetch(self, user: str, mailbox: str, uids: Sequence[int]) -> Deferred[dict[int, bytes]]:
        known = self.keys.get((user, mailbox), {})
        keys = {u: known[u] for u in uids if u in known}
        if not keys or len(keys) < len(set(uids)):
            self.asked += len(uids)
            return self.remote.fetch(user, mailbox, uids)
        self.read_here += len(keys)
        found, missing = self.cache.split(user, keys)
        if not missing:
            return succeed(found)
        udir = self.root / bucket_dir(bucket_of(user)) / user

        def keep(read: dict[int, bytes]) -> dict[int, bytes]:
            for uid, body in read.items():
                self.cache.put(user, missing[uid], body)
            found.update(read)
            return found

        return self._read(_read_bodies, udir, missing).addCallback(keep)


def _read_bodies(udir: Path, keys: dict[int, str]) -> dict[int, bytes]:
    """The bodies of ``keys`` (UID -> key) under ``udir``; a file gone is left out."""
    out = {}
    for uid, key in keys.items():
        try:
            with open(udir / key, "rb") as f:
                out[uid] = f.read()
        except FileNotFoundError:
            continue
    return out
