"""Replication wired into a porcupine node's mail service (issue 8).

:class:`MailReplication` owns, per node:

- the update log ``DATA_DIR/mail/replication.sqlite`` (:class:`SqliteLog`) and the
  object versions ``DATA_DIR/mail/replicas.sqlite`` (:class:`ReplicaObjectStore`
  over the node's fragment store and profile DB);
- the :class:`ReplicationService` (frames over AMP, live set from membership,
  status under ``replication`` in ``GET /api/status``);
- the :class:`ReplicatedMailboxManager` over the node's local mailbox manager,
  which the mail service and the cluster are built with, so flag changes and
  deletions of replicated messages are logged updates;
- :meth:`store`, the delivery proxy's path for a user with ``replicas >= 2``: one
  replica coordinates (this node if it is a target, else the first target over
  AMP :class:`~.amp.StoreReplicated`); the answer (SMTP 250) comes once the
  update is durable in the coordinator's log and store and on a second replica
  (``acks_before_reply=2``), so a SIGKILL of any one node loses no acknowledged
  mail.  A coordinator that could not be reached (the request never left) is
  replaced by the next target; one that may have received the request (timeout
  or connection lost after sending, or an error answer) is not: the delivery
  fails (SMTP 451), since a second coordinator would store a second copy;
  if no second replica acks within ``ack_timeout``, a live node not tried yet is
  added to the replica set (failed and silent nodes stay in it, so a copy they
  may hold gets later versions when they return);
- profile writes: the cluster's :class:`~..cluster.ProfileReplicator` pushes go
  through the log as ``profile/<address>`` objects to every live node (or
  ``profile_replicas`` of them), so a node that was down gets them on return.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ...cluster.rpc import PeerUnavailable, may_have_run
from ...cluster.view import IMembershipListener
from .._cluster_wire import storage_full
from ..values import Digest, MailError, NewMessage
from ._manager import ReplicationConfig
from ._values import Update
from .amp import (
    CoordinatorUnsure,
    StoreReplicated,
    digest_in,
    digest_out,
    message_args,
    message_in,
    node_sender,
)
from .amp import register as register_replicate
from .objects import (
    MSG,
    PROFILE,
    BoxObject,
    MessageObject,
    ReplicaObjectStore,
    ReplicatedMailboxManager,
    box_id,
    parse_message_id,
    profile_id,
)
from .repair import Repairer
from .repair import register as register_repair
from .shell import ReplicationService, ReplicationStopped
from .sqlite_log import SqliteLog

if TYPE_CHECKING:
    from ...cluster.interfaces import IClusterNode
    from ...cluster.view import View
    from ..interfaces import IMailTopology
    from ..storage import MailStorage

#: acks_before_reply=2: the 250 waits for a second durable copy (see docs).
DEFAULT_CONFIG = ReplicationConfig(acks_before_reply=2)


@implementer(IMembershipListener)
class MailReplication(MultiService):
    """The replication manager of one porcupine node (see the module docstring)."""

    log = Logger()

    def __init__(
        self,
        storage: MailStorage,
        node: IClusterNode,
        *,
        config: ReplicationConfig | None = None,
        profile_replicas: int | None = None,
        ack_timeout: float = 3.0,
        max_retargets: int = 3,
        repair_interval: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__()
        self.storage = storage
        self.node = node
        self.me: str = node.node_id
        self.reactor = storage.reactor
        self.profile_replicas = profile_replicas
        self.ack_timeout = ack_timeout
        self.max_retargets = max_retargets
        root = Path(storage.data_dir) / "mail"
        root.mkdir(parents=True, exist_ok=True)
        self.log_store = SqliteLog(root / "replication.sqlite")
        self.objects = ReplicaObjectStore(
            root / "replicas.sqlite", storage.fragment_store, storage.profiles._db
        )
        self.replication = ReplicationService(
            self.reactor,
            self.me,
            self.log_store,
            self.objects,
            node_sender(node),
            run=storage.run_blocking,
            now=node.cluster_time,
            config=config or DEFAULT_CONFIG,
            rng=rng,
            on_applied=self._applied,
        )
        #: This node's mailboxes with replicated messages going through the log (the
        #: mail service and the cluster are built with it).
        self.mailboxes = ReplicatedMailboxManager(
            storage.mailbox_manager, self.objects, self.replication, storage.run_blocking
        )
        register_replicate(node.registry, self.replication)
        node.registry.register(StoreReplicated, self._on_store)
        node.subscribe(self.replication)
        node.add_status(self.status)
        #: Where managers are (:meth:`use_topology`): a deleted user's caches, the
        #: fragment note of a replica applied here, the known nodes.
        self.topology: IMailTopology | None = None
        #: every node seen in a view since start (the cluster's known-nodes file
        #: keeps them over restarts)
        self._seen: set[str] = {self.me}
        self._fragment_known: set[str] = set()
        self.retries = 0
        #: coordinators that failed after the request was sent (not retried elsewhere)
        self.unsure = 0
        self.retargets = 0
        #: deliveries answered with fewer copies than the user's R (fewer replicas in
        #: reach in time): the log completes them when the others are back
        self.short_acks = 0
        self.repairer = Repairer(
            self.me,
            self.objects,
            storage.run_blocking,
            self._call,
            self.live,
            self.reactor,
            interval=repair_interval,
            on_applied=self._repaired,
        )
        register_repair(node.registry, self.repairer)
        node.subscribe(self)
        self._under = 0
        self._counting = False
        self._counted_at = float("-inf")

    def use_topology(self, topology: IMailTopology) -> None:
        """The node's managers (:class:`~..interfaces.IMailTopology`, built after this
        service, which it is built with): replicas applied here join the user's
        fragment list through it, profile changes drop its caches, and its known
        nodes (a cluster's ``known-nodes``) get profile updates."""
        self.topology = topology

    def backlog(self) -> int:
        """Updates waiting to be written here (counted in the node's load)."""
        return len(self.replication._queue)

    def startService(self) -> None:
        """Start the core once the mail service recovered its store (its start-up
        removes half-written files, which must not race the core re-applying its
        log), with the current view as the live set."""
        super().startService()
        ready = self.storage.after_recovery()
        if ready is None:
            self._start_core(None)
        else:
            ready.addCallback(self._start_core)

    def _start_core(self, result: object) -> object:
        if not self.running or self.replication.running:
            return result
        self.replication.startService()
        ids = list(self.node.view.node_ids)
        if ids:
            self.replication.set_live(ids)
        self._seen.update(ids)
        self.repairer.start()
        return None

    def membership_changed(self, old: View, new: View) -> None:
        """``IMembershipListener``: remember every node seen; a (re)joined peer starts
        a re-replication round."""
        self._seen.update(new.node_ids)
        self.repairer.membership_changed(old, new)

    def _call(self, node_id: str, command: Any, **kw: Any) -> Deferred[Any]:
        member = self.node.view.member(node_id)
        if member is None:
            return fail(PeerUnavailable(f"{node_id} is not a member"))
        d: Deferred[Any] = self.node.rpc.call(member.address, command, **kw)
        return d

    def known(self) -> list[str]:
        """Every node this one ever saw in a view (the cluster's ``known-nodes``)."""
        known = self.topology.known_nodes() if self.topology is not None else set()
        return sorted(known | set(self.live()) | self._seen)

    def stopService(self) -> Deferred[None]:
        """Stop the core (waiting for its write round), then close the databases."""
        super().stopService()
        self.repairer.stop()
        d: Deferred[None] = (
            self.replication.stopService() if self.replication.running else succeed(None)
        )

        def close(_: object) -> None:
            self.log_store.close()
            self.objects.close()

        return d.addCallback(close)

    def live(self) -> list[str]:
        """Node ids of the current view (this node if the view is empty)."""
        ids = list(self.node.view.node_ids)
        self._seen.update(ids)
        return ids if ids else [self.me]

    # --- delivery ------------------------------------------------------------------

    def store(
        self, nodes: Sequence[str], message: NewMessage, replicas: int | None = None
    ) -> Deferred[list[Digest]]:
        """Store ``message`` replicated on ``nodes``; one digest per replica (the ones
        down now get their copy when they are back).

        With ``replicas`` (the user's R) and fewer than R ``nodes``, the replica set
        is filled up first with live nodes not named (a plan made while its manager
        saw fewer members: R copies now), then with known nodes that are down now:
        the update stays in the log for them and reaches them when they are back (R
        copies as soon as they are reachable).  Never fewer than R targets while R
        nodes are known: a reader takes fewer than R holders out of reach as leaving
        every message a reachable copy (``UserMail.incomplete``), so a message stored
        on fewer would be hidden, not refused (sim.mail seed 33).  The answer waits
        for a copy on every live target.
        """
        rid = uuid.uuid4().hex
        if not message.internal_date:
            # one date for every copy (each node would take its own clock's otherwise,
            # and a listing would take the copies for two messages under one UID)
            message = attrs.evolve(message, internal_date=float(self.node.cluster_time()))
        targets = list(dict.fromkeys(nodes))
        live = set(self.live())
        want = replicas if replicas is not None else len(targets)
        if len(targets) < want:
            targets += self._spare_live(targets, want - len(targets))
        if len(targets) < want:
            targets += [n for n in self.known() if n not in live and n not in targets][
                : want - len(targets)
            ]
        # R copies now: every live target (``--acks-before-reply 1`` keeps the old
        # trade, the coordinator's copy alone)
        cfg = self.replication.config
        acks = max(1, sum(1 for n in targets if n in live)) if cfg.acks_before_reply >= 2 else 1
        reachable = [n for n in targets if n in live]
        order = ([self.me] if self.me in reachable else []) + [n for n in reachable if n != self.me]
        if not order:
            return fail(PeerUnavailable("no replica of the message is reachable"))
        return self._via(rid, message, targets, order, acks)

    def _spare_live(self, targets: Sequence[str], count: int) -> list[str]:
        """Up to ``count`` live nodes not in ``targets``, least loaded first."""
        others = [n for n in self.live() if n not in targets]
        if not others:
            return []
        balancer = self.topology.balancer if self.topology is not None else None
        if balancer is not None:
            chosen = balancer.choose(others, list(targets), count, self.reactor.seconds())
            return [n for n in chosen if n in others][:count]
        return sorted(others)[:count]

    def _via(
        self,
        rid: str,
        message: NewMessage,
        targets: list[str],
        order: list[str],
        acks: int | None = None,
    ) -> Deferred[list[Digest]]:
        coordinator = order[0]
        if coordinator == self.me:
            d = self._coordinate(rid, message, targets, acks)
        else:
            member = self.node.view.member(coordinator)
            if member is None:
                d = fail(PeerUnavailable(f"{coordinator} is not a member"))
            else:
                args = message_args(rid, message, targets)
                if acks is not None:
                    args["acks"] = acks
                call = self.node.rpc.call(member.address, StoreReplicated, **args)
                d = call.addCallback(lambda r: [digest_in(r, n) for n in targets])

        def failed(f: Failure) -> Deferred[list[Digest]]:
            if f.check(MailError) or len(order) < 2:
                return fail(f)
            if not f.check(PeerUnavailable) or may_have_run(f):
                # The request reached the coordinator (it timed out or the connection
                # was lost after it was sent, or the coordinator answered an error):
                # it may have logged and numbered the message already, or still will
                # when TCP delivers it late.  Coordinated again elsewhere it would be
                # a second copy under another UID (issue 14), so the client gets a
                # temporary error instead; the log completes what was applied.
                self.unsure += 1
                return fail(f)
            self.retries += 1
            self.log.warn(
                "replication: coordinator {c} failed ({e}); trying {n}",
                c=coordinator,
                e=f.getErrorMessage(),
                n=order[1],
            )
            # The failed node stays a target: if it logged the message before dying it
            # holds a copy, which must get later versions (flags, deletion) on return.
            spare = [n for n in self.live() if n not in targets]
            return self._via(rid, message, targets + spare[:1], order[1:], acks)

        return d.addErrback(failed)

    def _on_store(self, **kw: Any) -> Deferred[dict[str, Any]]:
        rid, message, targets = message_in(kw)
        d = self._coordinate(rid, message, targets, kw.get("acks"))

        def unsure(f: Failure) -> Failure:
            # Peers out of reach, this node stopping or its disk full: an expected
            # answer to the caller (declared, so AMP logs no unknown error), never
            # retried elsewhere.
            if f.check(PeerUnavailable, ReplicationStopped) or storage_full(f.value):
                return Failure(CoordinatorUnsure(f.getErrorMessage()))
            return f

        def answer(digests: list[Digest]) -> dict[str, Any]:
            if not digests:  # superseded at once here (a newer version of the object)
                raise CoordinatorUnsure(f"message {rid} superseded on {self.me}")
            return digest_out(digests[0])

        return d.addCallbacks(answer, unsure)

    def _coordinate(
        self, rid: str, message: NewMessage, targets: list[str], acks: int | None = None
    ) -> Deferred[list[Digest]]:
        """Submit here; if not acknowledged in time, re-target the missing replicas.

        If still not acknowledged after ``max_retargets``, but the message is durable
        here (logged and stored), the answer is that copy: the log keeps pushing it
        to the other replicas.  Failing instead would make the client send it again
        (SMTP 4xx), and the first attempt, which the log completes anyway, would be
        a second message under another UID.
        """
        if self.me not in targets:
            targets = [self.me, *targets]
        out: Deferred[list[Digest]] = Deferred()
        state = {"attempt": 0}

        def attempt(current: list[str], n: int) -> None:
            state["attempt"] = n
            d = self.mailboxes.store_replicated(rid, message, current, acks)
            timer = self.reactor.callLater(self.ack_timeout, timed_out, current, n)

            def done(result: Any) -> None:
                if timer.active():
                    timer.cancel()
                if state["attempt"] != n or out.called:
                    return  # superseded by a later attempt
                if isinstance(result, Failure):
                    out.errback(result)
                else:
                    out.callback(result)

            d.addBoth(done)

        def timed_out(current: list[str], n: int) -> None:
            if out.called or state["attempt"] != n:
                return
            if n >= self.max_retargets:
                state["attempt"] = n + 1  # a late acknowledgement changes nothing now
                self.run_digest(message, rid).addCallbacks(durable, out.errback)
                return
            live = self.live()
            others = [t for t in current if t != self.me]
            fresh = [x for x in live if x != self.me and x not in current]
            if not fresh:
                attempt(current, n + 1)  # nobody else to ask: keep waiting
                return
            # Add live nodes not tried yet; the silent ones stay targets (they may hold
            # a copy already and must get later versions when they return).
            new = [self.me, *fresh[:1], *others]
            self.retargets += 1
            self.log.warn(
                "replication: {rid} not acknowledged by {o} in {t}s; now {new}",
                rid=rid,
                o=others,
                t=self.ack_timeout,
                new=new,
            )
            attempt(new, n + 1)

        def durable(mine: Digest | None) -> None:
            if out.called:
                return
            if mine is None:
                out.errback(PeerUnavailable("no second replica acknowledged in time"))
                return
            self.short_acks += 1
            self.log.warn(
                "replication: {rid} durable here only; answered, the log completes it",
                rid=rid,
            )
            out.callback([mine])

        attempt(list(targets), 0)
        return out

    def run_digest(self, message: NewMessage, rid: str) -> Deferred[Digest | None]:
        """This node's digest of message ``rid`` (None: not stored here)."""
        mailbox = MessageObject(message.mailbox, b"").mailbox
        d: Deferred[Digest | None] = self.storage.run_blocking(
            self.objects.digest, message.user, mailbox, rid
        )
        return d

    # --- APPEND, COPY and mailbox changes (UserMail.replica) ------------------------

    def choose(self, home: str, replicas: int) -> list[str]:
        """Nodes for a message APPENDed or COPYed by a user with ``replicas``: the
        home (it holds the tree) and the least-loaded other live nodes."""
        live = self.live()
        balancer = self.topology.balancer if self.topology is not None else None
        if balancer is not None:
            chosen = list(balancer.choose(live, [home], replicas, self.reactor.seconds()))
        else:
            chosen = [home, *sorted(n for n in live if n != home)]
        nodes = ([home] if home in live else []) + [n for n in chosen if n != home]
        return nodes[: max(1, replicas)] or live[:1]

    def box_ops(
        self,
        user: str,
        ops: Sequence[tuple[str, bool, str | None, str | None]],
        nodes: Sequence[str],
    ) -> Deferred[Any]:
        """Log mailbox changes ``(name, exists, moved_from, moved_to)`` of ``user`` as
        ``box/<user>/<name>`` objects to ``nodes`` (this node coordinating); fires once
        durable here (the live holders made the change already; the log brings it to
        the others when they are back)."""
        targets = list(dict.fromkeys([self.me, *nodes]))

        def submit(op: tuple[str, bool, str | None, str | None]) -> Deferred[Any]:
            name, exists, src, dst = op
            oid = box_id(user, name)
            body = BoxObject(exists, src, dst).to_body()
            d: Deferred[Any] = self.storage.run_blocking(self.objects.version, oid)
            return d.addCallback(
                lambda v: self.replication.submit(oid, body, targets, current=v, acks=1)
            )

        return gatherResults([submit(op) for op in ops], consumeErrors=True)

    # --- profiles ------------------------------------------------------------------

    def push_profiles(self, records: list[Any]) -> Deferred[Any]:
        """``ProfileReplicator.push``: each record as a logged ``profile/<address>`` update."""
        # Every known node, the ones down now too: the log keeps the update for them
        # and delivers it when they are back (a ``deluser`` must reach them).
        live = sorted(self.known())
        others = [n for n in live if n != self.me]
        if self.profile_replicas is not None:
            others = others[: max(0, self.profile_replicas - 1)]
        targets = [self.me, *others]
        ds = [
            self.replication.submit(
                profile_id(rec[0]), json.dumps(list(rec)).encode(), targets, acks=1
            )
            for rec in records
        ]
        return gatherResults(ds, consumeErrors=True)

    # --- hooks -----------------------------------------------------------------------

    def _applied(self, update: Update) -> None:
        """After a durable apply: wake IDLE, join the fragment list, refresh profiles."""
        oid = update.object_id
        if oid.startswith(MSG):
            self.mailboxes.applied(update)
            user, _ = parse_message_id(oid)
            topology = self.topology
            known = user in self._fragment_known
            if update.body is not None and not known and topology is not None:
                self._fragment_known.add(user)
                d: Deferred[Any] = topology.users_for(user).add_fragment(user, self.me)
                d.addErrback(lambda f: self._fragment_known.discard(user))
        elif oid.startswith(PROFILE):
            address = oid[len(PROFILE) :]
            self._fragment_known.discard(address)  # a deleted user's mail left here
            profiles = self.storage.profiles
            profiles.forget(address)  # the auth cache and the verified profile
            if self.topology is not None:
                self.topology.forget(address)
            self.storage.run_blocking(profiles._db.count).addCallback(
                lambda n: setattr(profiles, "_count", n)
            )

    def status(self) -> dict[str, Any]:
        """The service's ``replication`` status, plus delivery retries."""
        doc = self.replication.status()
        r = doc["replication"]
        r["coordinator_retries"] = self.retries
        r["coordinator_unsure"] = self.unsure
        r["retargets"] = self.retargets
        r["short_acks"] = self.short_acks
        r["repair"] = self.repairer.status()
        self._count_under()
        # below their R: copies with a replica out of reach (held here), plus copies
        # this node should hold and does not yet; not known before the first sync
        r["under_replicated"] = self._under + self.repairer.missing()
        r["repair_synced"] = self.repairer.synced
        return doc

    def _count_under(self) -> None:
        """Refresh the under-replicated count off the reactor (read by the next status)."""
        now = float(self.reactor.seconds())
        if self._counting or not self.running or now < self._counted_at + 1.0:
            return  # at most one scan a second, whoever polls the status
        self._counting = True
        self._counted_at = now

        def got(n: int) -> None:
            self._under = n

        def done(_: object) -> None:
            self._counting = False

        d = self.storage.run_blocking(self.objects.under_replicated, self.live())
        d.addCallback(got).addErrback(lambda f: self.log.failure("under-replicated count", f))
        d.addBoth(done)

    def _repaired(self, update: Update) -> None:
        """A copy re-created from a peer: as after a logged apply."""
        self._applied(update)
