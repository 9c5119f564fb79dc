"""A JSON document every member holds, replicated record by record (e.g. Yima's catalog).

The document is a set of *records* (``split`` cuts a document value into
``{key: record}`` and ``join`` puts it back together; by default the whole
document is one record).  Each record has its own version ``(counter,
node_id)``.  An update may start on any node: the node stamps each record it
changes one above that record's version, persists just those records and pushes
just those records (a delta; a removed record travels as a tombstone) to every
member.  A node keeps, per record, whichever version is highest (last writer
wins per record, so concurrent changes of different records both survive).
When the view changes, every node pushes all its records to the members it had
not seen, so a newcomer or a healed partition catches up.

Persisting (serialising, writing, fsync) runs through the injected ``run`` (a
thread pool on a node), never on the reactor: one file per record under
``DATA_DIR/NAME.d/``, writes serialised, and a burst of changes written once,
as its last versions.  :meth:`ReplicatedDocument.update` and
:meth:`~ReplicatedDocument.claim` fire, and a member answers a push, only once
the records are on disk.  A node upgraded from the single-file format
(``DATA_DIR/NAME.json``) reads it once and rewrites it as records.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from twisted.internet.defer import (
    Deferred,
    DeferredList,
    FirstError,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from .membership import IMembershipListener, View
from .rpc import BigBytes

if TYPE_CHECKING:
    from .node import ClusterNode


class PutRecords(amp.Command):
    """Offer versions of some records of a replicated document; the answer counts those taken.

    ``body`` is JSON: a list of ``[key, counter, writer, value]`` (``value``
    null: the record was removed).
    """

    commandName = b"yimaporc.put-records"

    arguments = [(b"name", amp.Unicode()), (b"body", BigBytes())]
    response = [(b"accepted", amp.Integer())]


Version = tuple[int, str]
ChangeListener = Callable[[dict[str, Any], dict[str, Any]], None]
Run = Callable[..., Deferred[Any]]
Split = Callable[[dict[str, Any]], dict[str, Any]]
Join = Callable[[dict[str, Any]], dict[str, Any]]
#: One record: its version and its value (None: removed, a tombstone).
Record = tuple[Version, Any]
ZERO: Version = (0, "")


def _run_here(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args)


def _whole(value: dict[str, Any]) -> dict[str, Any]:
    return {"": value}


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


@implementer(IMembershipListener)
class ReplicatedDocument:
    """One named document, replicated record by record to every member of the view."""

    log = Logger()

    def __init__(
        self,
        node: ClusterNode,
        name: str,
        initial: dict[str, Any],
        run: Run | None = None,
        *,
        split: Split | None = None,
        join: Join | None = None,
    ) -> None:
        self.node = node
        self.name = name
        self.path: Path = node.config.data_dir / f"{name}.d"
        self.legacy_path: Path = node.config.data_dir / f"{name}.json"
        self._initial = initial
        self._split = split or _whole
        self._join = join or (lambda records: records.get("", _copy(initial)))
        self.records: dict[str, Record] = {}
        self._listeners: list[ChangeListener] = []
        #: Runs blocking work (default: here, synchronously; a node passes its thread pool).
        self._run = run or _run_here
        self._writing = False
        self._dirty: set[str] = set()
        self._write_waiters: list[Deferred[None]] = []
        #: Record files written (a burst of changes to a record may be written once).
        self.writes = 0
        self._load()
        self.value: dict[str, Any] = self._view()
        node.documents[name] = self
        node.subscribe(self)

    # --- reading ---------------------------------------------------------------------

    @property
    def version(self) -> Version:
        """The highest version of any record (``(0, "")`` while empty)."""
        return max((v for v, _ in self.records.values()), default=ZERO)

    def record(self, key: str) -> Any:
        """The current value of one record (None if absent or removed)."""
        found = self.records.get(key)
        return None if found is None else found[1]

    def _view(self) -> dict[str, Any]:
        live = {k: v for k, (_, v) in self.records.items() if v is not None}
        return self._join(live)

    def subscribe(self, listener: ChangeListener) -> None:
        """Call ``listener(old_value, new_value)`` whenever the document changes."""
        self._listeners.append(listener)

    # --- receiving ---------------------------------------------------------------------

    def offer(self, body: bytes) -> Deferred[int]:
        """Take every offered record newer than ours; fires with how many were taken,
        once they are on disk."""
        try:
            items = [(str(k), (int(c), str(w)), v) for k, c, w, v in json.loads(body)]
        except (ValueError, TypeError) as e:
            self.log.error("document {name}: unreadable records: {e}", name=self.name, e=e)
            return succeed(0)
        taken = {
            key: (version, value)
            for key, version, value in items
            if version > self.records.get(key, (ZERO, None))[0]
        }
        if not taken:
            return succeed(0)
        return self._install(taken).addCallback(lambda _: len(taken))

    # --- changing ------------------------------------------------------------------------

    def put(self, changes: Mapping[str, Any]) -> Deferred[int]:
        """Set (or, with None, remove) these records here, then push them to all members;
        fires with how many members took them (this one included), once on disk here."""
        stamped = self._stamp(changes)
        if not stamped:
            return succeed(1)
        saved = self._install(stamped)
        pushed = self._push([m.address for m in self.node.view.members], stamped)
        waits: list[Deferred[Any]] = [saved, pushed]
        both: Deferred[list[Any]] = gatherResults(waits, consumeErrors=True)
        return both.addCallbacks(lambda results: results[1], _first_error)

    def update(self, change: Callable[[dict[str, Any]], dict[str, Any]]) -> Deferred[int]:
        """Apply ``change`` to (a copy of) the whole document; only the records it
        changed are stamped, stored and pushed (see :meth:`put`)."""
        return self.put(self._delta(change))

    def update_record(self, key: str, change: Callable[[Any], Any]) -> Deferred[int]:
        """:meth:`put` of one record, computed from (a copy of) its current value."""
        return self.put({key: change(_copy(self.record(key)))})

    def claim(self, change: Callable[[dict[str, Any]], dict[str, Any]]) -> Deferred[bool]:
        """Like :meth:`update`, but fires True only if these versions won everywhere.

        Every member must take every changed record and each must still be ours
        when the answers are in.  Of two concurrent claims on a record at most
        one fires True: a member takes a version only if it is newer than the
        one it holds, and versions are totally ordered, so the two writers
        cannot each take the other's.  The loser must not undo anything (the
        winner's write replaces its own everywhere); it reports the conflict.
        """
        return self.claim_changes(self._delta(change))

    def claim_record(self, key: str, change: Callable[[Any], Any]) -> Deferred[bool]:
        """:meth:`claim` of one record, computed from (a copy of) its current value."""
        return self.claim_changes({key: change(_copy(self.record(key)))})

    def claim_changes(self, changes: Mapping[str, Any]) -> Deferred[bool]:
        """:meth:`claim` of these record values (None: remove)."""
        stamped = self._stamp(changes)
        if not stamped:
            return succeed(True)
        saved = self._install(stamped)
        body = _encode(stamped)
        me = self.node.config.cluster_address
        calls = [
            self.node.rpc.call(a, PutRecords, name=self.name, body=body)
            for a in (m.address for m in self.node.view.members)
            if a != me
        ]

        def decide(results: list[tuple[bool, Any]]) -> Deferred[bool]:
            took = all(ok and value.get("accepted") == len(stamped) for ok, value in results)
            ours = all(self.records[k][0] == v for k, (v, _) in stamped.items())
            return saved.addCallback(lambda _: took and ours)

        return DeferredList(calls, consumeErrors=True).addCallback(decide)

    def _delta(self, change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        new = self._split(change(_copy(self.value)))
        live = {k: v for k, (_, v) in self.records.items() if v is not None}
        delta: dict[str, Any] = {k: v for k, v in new.items() if live.get(k) != v}
        delta.update({k: None for k in live if k not in new})
        return delta

    def _stamp(self, changes: Mapping[str, Any]) -> dict[str, Record]:
        me = self.node.node_id
        out: dict[str, Record] = {}
        for key, value in changes.items():
            current = self.records.get(key)
            if current is None and value is None:
                continue
            counter = 0 if current is None else current[0][0]
            out[key] = ((counter + 1, me), value)
        return out

    def membership_changed(self, old: View, new: View) -> None:
        """Send all our records to members we had not seen before, and to members that
        restarted since the last view (another incarnation: a node back before the
        failure detector noticed it had gone missed what was pushed meanwhile)."""
        seen = {m.node_id: m.incarnation for m in old.members}
        fresh = [m.address for m in new.members if seen.get(m.node_id) != m.incarnation]
        if fresh and self.records:
            self._push(fresh, self.records)

    def _push(self, addresses: list[str], records: Mapping[str, Record]) -> Deferred[int]:
        body = _encode(records)
        me = self.node.config.cluster_address
        calls = [
            self.node.rpc.call(a, PutRecords, name=self.name, body=body)
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

    # --- installing and persisting ---------------------------------------------------

    def _install(self, records: Mapping[str, Record]) -> Deferred[None]:
        """Make ``records`` current now; fires once they (or later versions) are on disk."""
        old = self.value
        self.records.update(records)
        self._dirty.update(records)
        self.value = self._view()
        saved = self._saved()
        for listener in list(self._listeners):
            try:
                listener(old, self.value)
            except Exception:
                self.log.failure("document {name} listener failed", name=self.name)
        return saved

    def _saved(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._write_waiters.append(d)
        if not self._writing:
            self._write_next()
        return d

    def _write_next(self) -> None:
        # Record values are replaced, never mutated in place, so the thread may
        # serialise them while the reactor goes on.
        self._writing = True
        waiters, self._write_waiters = self._write_waiters, []
        batch = {k: self.records[k] for k in self._dirty}
        self._dirty = set()
        migrate = self.legacy_path if self.legacy_path.exists() else None
        work = self._run(_write_records, self.path, batch, migrate)

        def done(result: object) -> None:
            self._writing = False
            self.writes += len(batch)
            if isinstance(result, Failure):
                self._dirty.update(k for k in batch if k not in self._dirty)
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(None)
            if self._write_waiters:
                self._write_next()

        work.addBoth(done)

    def _load(self) -> None:
        try:
            self.records = _read_records(self.path)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.path} is corrupt: {e}") from e
        if self.records or not self.legacy_path.exists():
            return
        try:
            raw = json.loads(self.legacy_path.read_text())
            version = (int(raw["counter"]), str(raw["writer"]))
            parts = self._split(raw["value"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.legacy_path} is corrupt: {e}") from e
        self.records = {k: (version, v) for k, v in parts.items()}
        self._dirty.update(self.records)  # rewritten as records on the first write


def _encode(records: Mapping[str, Record]) -> bytes:
    return json.dumps([[k, v[0], v[1], value] for k, (v, value) in records.items()]).encode()


def _first_error(failure: Failure) -> Failure:
    return failure.value.subFailure if isinstance(failure.value, FirstError) else failure


def _file_of(key: str) -> str:
    return "r-" + quote(key, safe="") + ".json"


def _key_of(filename: str) -> str | None:
    if not (filename.startswith("r-") and filename.endswith(".json")):
        return None
    return unquote(filename[2:-5])


def _read_records(folder: Path) -> dict[str, Record]:
    """Every record stored under ``folder`` (blocking; at start-up)."""
    out: dict[str, Record] = {}
    try:
        entries = sorted(os.listdir(folder))
    except FileNotFoundError:
        return out
    for filename in entries:
        key = _key_of(filename)
        if key is None:
            continue
        raw = json.loads((folder / filename).read_text())
        out[key] = ((int(raw["counter"]), str(raw["writer"])), raw["value"])
    return out


def read_document(data_dir: Path, name: str, join: Join | None = None) -> dict[str, Any]:
    """The document ``name`` as stored in ``data_dir`` (for tools and tests; blocking)."""
    records = _read_records(data_dir / f"{name}.d")
    live = {k: v for k, (_, v) in records.items() if v is not None}
    if join is not None:
        return join(live)
    return live.get("", {})


def _write_records(folder: Path, records: Mapping[str, Record], legacy: Path | None) -> None:
    """Durably write each record to its own file (blocking: runs in the thread pool)."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, ((counter, writer), value) in records.items():
        path = folder / _file_of(key)
        tmp = folder / f".{path.name}.tmp"
        data = json.dumps({"counter": counter, "writer": writer, "value": value}).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if legacy is not None:
        legacy.unlink(missing_ok=True)
