"""Re-replication: a replica that lost its copies (a wiped disk) gets them back.

The update log brings a replica every update it *missed* while down; it cannot
bring back copies a node *had* and lost with its disk, because every peer
retired those updates long ago.  :class:`Repairer` closes that gap by pull:
every ``interval`` seconds (60 on a node), and as soon as a peer (re)joins the view, this node
asks each live peer for its *inventory* (:class:`Inventory`: the id and version
of every live object whose replica set names this node), compares it with its
own versions, and fetches the objects it lacks or holds older
(:class:`FetchObjects`: whole updates built from the peer's current state,
the :mod:`wire <._wire>` ``Push`` encoding).  They are applied to the object
store directly (newest wins, idempotent), not logged: the peer keeps its copy,
so nothing is lost if this node dies half-way, and the next round resumes.

A node therefore repairs itself; every node that lost nothing answers cheaply.
``status()`` reports ``synced`` (every live peer has been synced with since
start), ``missing`` (objects the last inventories named that are not here
yet) and ``repaired``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from ...cluster.rpc import BigBytes, RpcRegistry
from ._values import Timestamp, Update
from ._wire import MalformedMessage, Push, from_bytes, to_bytes
from .amp import PeerNode, pack_frames, unpack_frames

if TYPE_CHECKING:
    from ...cluster.view import View
    from .objects import ReplicaObjectStore

#: Objects fetched per call (bodies may be large: the call's size stays bounded).
FETCH_BATCH = 16


class Inventory(amp.Command):
    """What the called node holds that the caller should hold too."""

    commandName = b"yimaporc.porcupine.repl-inventory"
    arguments = [(b"sender", PeerNode())]
    response = [(b"objects", BigBytes())]


class FetchObjects(amp.Command):
    """The called node's current version of each object (those it has a copy of)."""

    commandName = b"yimaporc.porcupine.repl-fetch"
    arguments = [(b"oids", amp.ListOf(amp.Unicode())), (b"sender", PeerNode())]
    response = [(b"updates", BigBytes())]
    errors = {MalformedMessage: b"REPLICATION_MALFORMED"}


def encode_inventory(items: Sequence[tuple[str, Timestamp]]) -> bytes:
    """``[[object id, wallclock, node], ...]`` as JSON."""
    return json.dumps([[o, t.wallclock, t.node_id] for o, t in items]).encode()


def decode_inventory(blob: bytes) -> list[tuple[str, Timestamp]]:
    """Inverse of :func:`encode_inventory`; raises ``MalformedMessage``."""
    try:
        rows = json.loads(blob)
        return [(str(o), Timestamp(int(w), str(n))) for o, w, n in rows]
    except (ValueError, TypeError) as e:
        raise MalformedMessage(f"bad inventory: {e}") from e


def encode_updates(updates: Sequence[Update]) -> bytes:
    """Whole updates as ``Push`` frames (coordinator: the update's own node)."""
    return pack_frames(
        [to_bytes(Push(u, u.timestamp.node_id, frozenset({u.timestamp.node_id}))) for u in updates]
    )


def decode_updates(blob: bytes) -> list[Update]:
    """Inverse of :func:`encode_updates`; raises ``MalformedMessage``."""
    out = []
    for frame in unpack_frames(blob):
        msg = from_bytes(frame)
        if not isinstance(msg, Push):
            raise MalformedMessage("not a push frame")
        out.append(msg.update)
    return out


class Repairer:
    """Pull re-replication for one node (see the module docstring).

    ``objects`` is the blocking object store (``inventory``, ``versions``,
    ``export``, ``apply_many``), used through ``run`` (a thread pool);
    ``call(node_id, command, **kw)`` reaches a peer; ``peers()`` names the live ones.
    """

    log = Logger()

    def __init__(
        self,
        me: str,
        objects: ReplicaObjectStore,
        run: Callable[..., Deferred[Any]],
        call: Callable[..., Deferred[Any]],
        peers: Callable[[], Sequence[str]],
        clock: IReactorTime,
        *,
        interval: float = 60.0,
        on_applied: Callable[[Update], None] | None = None,
    ) -> None:
        self.me = me
        self.objects = objects
        self.run = run
        self.call = call
        self.peers = peers
        self.clock = clock
        self.interval = interval
        self.on_applied = on_applied
        self.rounds = 0
        self.repaired = 0
        self.failures = 0
        #: peers a sync with succeeded since start
        self._synced: set[str] = set()
        #: object ids the last inventories named that this node lacks (per peer)
        self._missing: dict[str, set[str]] = {}
        self._busy: dict[str, Deferred[int]] = {}
        self._timer: IDelayedCall | None = None
        self.running = False

    # --- the answering side ---------------------------------------------------------

    def on_inventory(self, sender: str) -> Deferred[dict[str, Any]]:
        """:class:`Inventory`: objects here naming ``sender`` among their replicas."""
        d = self.run(self.objects.inventory, sender)
        return d.addCallback(lambda items: {"objects": encode_inventory(items)})

    def on_fetch(self, oids: list[str], sender: str) -> Deferred[dict[str, Any]]:
        """:class:`FetchObjects`: the current version of each object held here."""
        if len(oids) > 4 * FETCH_BATCH:
            raise MalformedMessage("too many objects in one fetch")

        def export() -> list[Update]:
            got = [self.objects.export(o) for o in oids]
            return [u for u in got if u is not None]

        return self.run(export).addCallback(lambda us: {"updates": encode_updates(us)})

    # --- the pulling side -----------------------------------------------------------

    def start(self) -> None:
        """Sync with every live peer now, then every ``interval``."""
        self.running = True
        self._schedule(0.0)

    def stop(self) -> None:
        """No further rounds (one in progress completes)."""
        self.running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self, delay: float) -> None:
        if not self.running:
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.clock.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        d = self.round()
        d.addBoth(lambda _: self._schedule(self.interval))

    def membership_changed(self, old: View, new: View) -> None:
        """A peer (re)joined: it may have lost its disk, or we may lack what it holds."""
        before = {(m.node_id, m.incarnation) for m in old.members}
        if any((m.node_id, m.incarnation) not in before for m in new.members):
            self._schedule(0.5)

    def round(self) -> Deferred[None]:
        """Sync with every live peer; ``synced`` once all of them succeeded."""
        peers = [p for p in dict.fromkeys(self.peers()) if p != self.me]
        for gone in set(self._missing) - set(peers):
            del self._missing[gone]
        ds = [self.sync(p) for p in peers]

        def done(results: list[tuple[bool, Any]]) -> None:
            self.rounds += 1

        return DeferredList(ds, consumeErrors=True).addCallback(done)

    def sync(self, peer: str) -> Deferred[int]:
        """Fetch from ``peer`` what it says this node should hold and does not (or
        holds older); fires with the number of objects repaired."""
        busy = self._busy.get(peer)
        if busy is not None:
            out: Deferred[int] = Deferred()

            def relay(result: object) -> object:
                out.callback(0)  # the sync in progress does the work
                return result

            busy.addBoth(relay)
            return out
        d: Deferred[Any] = self.call(peer, Inventory)
        d.addCallback(lambda r: decode_inventory(r["objects"]))
        d.addCallback(self._compare)
        d.addCallback(self._fetch_all, peer)

        def finished(result: Any) -> Any:
            self._busy.pop(peer, None)
            if not isinstance(result, Failure):
                self._synced.add(peer)
            else:
                self.failures += 1
                self.log.info(
                    "re-replication from {p} failed: {e}", p=peer, e=result.getErrorMessage()
                )
            return result

        d.addBoth(finished)
        self._busy[peer] = d
        return d

    def _compare(self, items: list[tuple[str, Timestamp]]) -> Deferred[list[str]]:
        theirs = dict(items)

        def lacking(mine: dict[str, Timestamp]) -> list[str]:
            return [o for o, t in theirs.items() if o not in mine or mine[o] < t]

        return self.run(self.objects.versions, list(theirs)).addCallback(lacking)

    def _fetch_all(self, want: list[str], peer: str) -> Deferred[int]:
        self._missing[peer] = set(want)
        if not want:
            return succeed(0)
        batches = [want[i : i + FETCH_BATCH] for i in range(0, len(want), FETCH_BATCH)]
        total = [0]

        def next_batch(_: object = None) -> Deferred[int] | int:
            if not batches:
                return total[0]
            batch = batches.pop(0)
            d = self.call(peer, FetchObjects, oids=batch)
            d.addCallback(lambda r: decode_updates(r["updates"]))
            d.addCallback(self._apply, peer, batch, total)
            return d.addCallback(next_batch)

        return succeed(None).addCallback(next_batch)

    def _apply(self, updates: list[Update], peer: str, batch: list[str], total: list[int]) -> Any:
        asked = set(batch)
        updates = [u for u in updates if u.object_id in asked]

        def applied(flags: list[bool]) -> None:
            for u, ok in zip(updates, flags, strict=True):
                if ok:
                    self.repaired += 1
                    total[0] += 1
                    if self.on_applied is not None:
                        self.on_applied(u)
            # asked for and now here (or the peer had no copy to give after all)
            self._missing.get(peer, set()).difference_update(asked)

        return self.run(self.objects.apply_many, updates).addCallback(applied)

    @property
    def synced(self) -> bool:
        """Every live peer has been synced with since start."""
        return all(p in self._synced for p in self.peers() if p != self.me)

    def missing(self) -> int:
        """Objects the last inventories named that are not here yet."""
        out: set[str] = set()
        for s in self._missing.values():
            out |= s
        return len(out)

    def status(self) -> dict[str, Any]:
        """Counters for ``replication.repair`` in the status document."""
        return {
            "synced": self.synced,
            "rounds": self.rounds,
            "repaired": self.repaired,
            "missing": self.missing(),
            "failures": self.failures,
        }


def register(registry: RpcRegistry, repairer: Repairer) -> None:
    """Answer :class:`Inventory` and :class:`FetchObjects` on this node's RPC server."""
    registry.register(Inventory, repairer.on_inventory)
    registry.register(FetchObjects, repairer.on_fetch)
