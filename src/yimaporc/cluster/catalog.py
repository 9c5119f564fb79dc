"""A small JSON document every member holds (e.g. Yima's media catalog and disks).

Updates may start on any node: the node applies the change, stamps it with a
version ``(counter, node_id)`` one above what it has, persists it (fsync) and
pushes the whole document to every member.  Persisting (serialising, writing,
fsync) runs through the injected ``run`` (a thread pool on a node), never on
the reactor; writes are serialised, and a burst of changes is written once, as
its last version.  :meth:`ReplicatedDocument.update` and
:meth:`~ReplicatedDocument.claim` fire, and a member answers a push, only once
the version is on disk.  A node keeps whichever version is
highest (last writer wins; the document is small and changes rarely, by admin
action).  When the view changes, every node pushes its copy to the members it
had not seen, so a newcomer or a healed partition catches up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from .membership import IMembershipListener, View
from .rpc import BigBytes

if TYPE_CHECKING:
    from .node import ClusterNode


class PutDocument(amp.Command):
    """Offer a version of a replicated document; the answer says if it was taken."""

    commandName = b"yimaporc.put-document"

    arguments = [
        (b"name", amp.Unicode()),
        (b"counter", amp.Integer()),
        (b"writer", amp.Unicode()),
        (b"body", BigBytes()),
    ]
    response = [(b"accepted", amp.Boolean())]


Version = tuple[int, str]
ChangeListener = Callable[[dict[str, Any], dict[str, Any]], None]
Run = Callable[..., Deferred[Any]]


def _run_here(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args)


@implementer(IMembershipListener)
class ReplicatedDocument:
    """One named document, replicated to every member of the view."""

    log = Logger()

    def __init__(
        self, node: ClusterNode, name: str, initial: dict[str, Any], run: Run | None = None
    ) -> None:
        self.node = node
        self.name = name
        self.path: Path = node.config.data_dir / f"{name}.json"
        self.version: Version = (0, "")
        self.value: dict[str, Any] = initial
        self._listeners: list[ChangeListener] = []
        #: Runs blocking work (default: here, synchronously; a node passes its thread pool).
        self._run = run or _run_here
        self._writing = False
        self._write_waiters: list[Deferred[None]] = []
        #: Versions written to disk (a burst of changes may be written once).
        self.writes = 0
        self._load()
        node.documents[name] = self
        node.subscribe(self)

    def subscribe(self, listener: ChangeListener) -> None:
        """Call ``listener(old_value, new_value)`` whenever the document changes."""
        self._listeners.append(listener)

    def offer(self, version: Version, body: bytes) -> bool:
        """Take ``body`` if ``version`` is newer than ours (written to disk soon after)."""
        saved = self._take(version, body)
        if saved is None:
            return False
        saved.addErrback(self._write_failed)
        return True

    def offer_durably(self, version: Version, body: bytes) -> Deferred[bool]:
        """:meth:`offer`, firing once a taken version is on disk."""
        saved = self._take(version, body)
        if saved is None:
            return succeed(False)
        return saved.addCallback(lambda _: True)

    def _take(self, version: Version, body: bytes) -> Deferred[None] | None:
        if version <= self.version:
            return None
        try:
            value = json.loads(body)
        except ValueError:
            self.log.error("document {name}: unreadable version {v}", name=self.name, v=version)
            return None
        return self._install(version, value)

    def update(self, change: Callable[[dict[str, Any]], dict[str, Any]]) -> Deferred[int]:
        """Apply ``change`` here, then push to all members; fires with how many took it,
        once the new version is also on this node's disk."""
        new_value = change(json.loads(json.dumps(self.value)))
        saved = self._install((self.version[0] + 1, self.node.node_id), new_value)
        pushed = self._push([m.address for m in self.node.view.members])
        waits: list[Deferred[Any]] = [saved, pushed]
        both: Deferred[list[Any]] = gatherResults(waits, consumeErrors=True)
        return both.addCallbacks(lambda results: results[1], _first_error)

    def claim(self, change: Callable[[dict[str, Any]], dict[str, Any]]) -> Deferred[bool]:
        """Like :meth:`update`, but fires True only if this version won everywhere.

        Every member must take the new version and it must still be ours when
        the answers are in.  Of two concurrent claims at most one fires True:
        a member takes a version only if it is newer than the one it holds, and
        versions are totally ordered, so the two writers cannot each take the
        other's.  The loser must not undo anything (the winner's write
        replaces its own everywhere); it reports the conflict.
        """
        new_value = change(json.loads(json.dumps(self.value)))
        version = (self.version[0] + 1, self.node.node_id)
        saved = self._install(version, new_value)
        body = json.dumps(self.value, sort_keys=True).encode()
        me = self.node.config.cluster_address
        calls = [
            self.node.rpc.call(
                a, PutDocument, name=self.name, counter=version[0], writer=version[1], body=body
            )
            for a in (m.address for m in self.node.view.members)
            if a != me
        ]

        def decide(results: list[tuple[bool, Any]]) -> Deferred[bool]:
            took = all(ok and value.get("accepted") for ok, value in results)
            return saved.addCallback(lambda _: took and self.version == version)

        return DeferredList(calls, consumeErrors=True).addCallback(decide)

    def membership_changed(self, old: View, new: View) -> None:
        """Send our copy to members we had not seen before."""
        seen = {m.node_id for m in old.members}
        fresh = [m.address for m in new.members if m.node_id not in seen]
        if fresh and self.version[0] > 0:
            self._push(fresh)

    def _push(self, addresses: list[str]) -> Deferred[int]:
        body = json.dumps(self.value, sort_keys=True).encode()
        me = self.node.config.cluster_address
        calls = [
            self.node.rpc.call(
                a,
                PutDocument,
                name=self.name,
                counter=self.version[0],
                writer=self.version[1],
                body=body,
            )
            for a in addresses
            if a != me
        ]
        if not calls:
            return succeed(1)

        def count(results: list[tuple[bool, Any]]) -> int:
            for ok, value in results:
                if not ok:
                    self.log.warn(
                        "document {name}: push failed: {e}",
                        name=self.name,
                        e=value.getErrorMessage(),
                    )
            return 1 + sum(1 for ok, _ in results if ok)

        return DeferredList(calls, consumeErrors=True).addCallback(count)

    def _install(self, version: Version, value: dict[str, Any]) -> Deferred[None]:
        """Make ``value`` current now; fires once it (or a later version) is on disk."""
        old, self.value, self.version = self.value, value, version
        saved = self._saved()
        for listener in list(self._listeners):
            try:
                listener(old, value)
            except Exception:
                self.log.failure("document {name} listener failed", name=self.name)
        return saved

    def _saved(self) -> Deferred[None]:
        """Fires once the current version is on disk (a write starts if none is under way)."""
        d: Deferred[None] = Deferred()
        self._write_waiters.append(d)
        if not self._writing:
            self._write_next()
        return d

    def _write_next(self) -> None:
        # Values are replaced, never mutated in place, so the thread may serialise this one.
        self._writing = True
        waiters, self._write_waiters = self._write_waiters, []
        work = self._run(_write, self.path, self.version, self.value)

        def done(result: object) -> None:
            self._writing = False
            self.writes += 1
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(None)
            if self._write_waiters:
                self._write_next()

        work.addBoth(done)

    def _write_failed(self, failure: Failure) -> None:
        self.log.failure("document {name}: cannot write {path}", failure, name=self.name,
                         path=str(self.path))  # fmt: skip

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
            self.version = (int(raw["counter"]), str(raw["writer"]))
            self.value = raw["value"]
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.path} is corrupt: {e}") from e


def _first_error(failure: Failure) -> Failure:
    inner = getattr(failure.value, "subFailure", None)
    return inner if isinstance(inner, Failure) else failure


def _write(path: Path, version: Version, value: dict[str, Any]) -> None:
    """Serialise and durably replace ``path`` (blocking: runs in the thread pool)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    data = json.dumps({"counter": version[0], "writer": version[1], "value": value}).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
