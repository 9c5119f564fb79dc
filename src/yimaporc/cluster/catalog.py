"""A small JSON document every member holds (e.g. Yima's media catalog and disks).

Updates may start on any node: the node applies the change, stamps it with a
version ``(counter, node_id)`` one above what it has, persists it (fsync) and
pushes the whole document to every member.  A node keeps whichever version is
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

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.protocols import amp
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


@implementer(IMembershipListener)
class ReplicatedDocument:
    """One named document, replicated to every member of the view."""

    log = Logger()

    def __init__(self, node: ClusterNode, name: str, initial: dict[str, Any]) -> None:
        self.node = node
        self.name = name
        self.path: Path = node.config.data_dir / f"{name}.json"
        self.version: Version = (0, "")
        self.value: dict[str, Any] = initial
        self._listeners: list[ChangeListener] = []
        self._load()
        node.documents[name] = self
        node.subscribe(self)

    def subscribe(self, listener: ChangeListener) -> None:
        """Call ``listener(old_value, new_value)`` whenever the document changes."""
        self._listeners.append(listener)

    def offer(self, version: Version, body: bytes) -> bool:
        """Take ``body`` if ``version`` is newer than ours."""
        if version <= self.version:
            return False
        try:
            value = json.loads(body)
        except ValueError:
            self.log.error("document {name}: unreadable version {v}", name=self.name, v=version)
            return False
        self._install(version, value)
        return True

    def update(self, change: Callable[[dict[str, Any]], dict[str, Any]]) -> Deferred[int]:
        """Apply ``change`` here, then push to all members; fires with how many took it."""
        new_value = change(json.loads(json.dumps(self.value)))
        self._install((self.version[0] + 1, self.node.node_id), new_value)
        return self._push([m.address for m in self.node.view.members])

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
        self._install(version, new_value)
        body = json.dumps(self.value, sort_keys=True).encode()
        me = self.node.config.cluster_address
        calls = [
            self.node.rpc.call(
                a, PutDocument, name=self.name, counter=version[0], writer=version[1], body=body
            )
            for a in (m.address for m in self.node.view.members)
            if a != me
        ]

        def decide(results: list[tuple[bool, Any]]) -> bool:
            took = all(ok and value.get("accepted") for ok, value in results)
            return took and self.version == version

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

    def _install(self, version: Version, value: dict[str, Any]) -> None:
        old, self.value, self.version = self.value, value, version
        self._save()
        for listener in list(self._listeners):
            try:
                listener(old, value)
            except Exception:
                self.log.failure("document {name} listener failed", name=self.name)

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
            self.version = (int(raw["counter"]), str(raw["writer"]))
            self.value = raw["value"]
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.path} is corrupt: {e}") from e

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        data = json.dumps(
            {"counter": self.version[0], "writer": self.version[1], "value": self.value}
        ).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
