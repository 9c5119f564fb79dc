"""The delivery proxy (seed §2.3.1) and the SMTP ``IMessageDelivery`` in front of it.

:class:`DeliveryProxy` asks the recipient's user manager for the mailbox
fragment list and profile, chooses the nodes to store on (a node already
holding mail for the user if there is one, else this node; as many distinct
live nodes as the profile's ``replicas``), hands the message to those nodes'
mailbox managers and records new fragments with the user manager.

In a cluster (``balancer`` set) the nodes come from the load balancer
(spread limit, affinity, load learned from store replies), the message's UID
is reserved with the user manager first (``reserve_uids``) so UIDs ascend over
all fragments, and a node that fails before the request reached it is
replaced by another live node (one that may have stored it is not: 451).  The
250 waits until the user manager has every holder of the new message recorded
on a majority (:meth:`DeliveryProxy._add_fragments`), so a later manager finds
the message even while its holder is out of reach (issue 14).  For R=1 users the
balancer is asked to prefer this node (a store here is no call).  With ``forward``
(on by default: docs/mail.md, "The hand-over") an R=1 delivery whose
manager is another node is run by that node's proxy instead (one call).

:class:`SmtpDelivery` is what twisted.mail's ESMTP talks to: one per
connection (anonymous) or per authenticated login.  Local recipients must
exist (550 otherwise); other domains are refused (550, no open relay) unless
the session is authenticated and the domain is in ``relay_domains``, in which
case the message goes to the durable outbound spool.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Sequence
from email.utils import formatdate
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList, FirstError, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from .._reactor import IClockThreads
from ..cluster.rpc import PeerUnavailable, may_have_run
from ._cluster_wire import AllocationLapsed, DeliveryDeferred, DeliveryRefused, HolderNotRecorded
from .interfaces import (
    ILoadBalancer,
    IMailboxManager,
    ISmtpDelivery,
    ISmtpSession,
    IUserManager,
)
from .usermap import BadAddress, normalise
from .values import INBOX, PENDING, Digest, MailError, NewMessage, Profile

MailboxManagers = Callable[[str], IMailboxManager]
#: ``forward(node, address, body, when)``: run one user's delivery on ``node``.
Forward = Callable[[str, str, bytes, float], Deferred[list[Digest]]]

_log = Logger()


class DeliveryProxy:
    """Stores a message for local users on the nodes their fragment lists suggest."""

    def __init__(
        self,
        node_id: str,
        users: Callable[[str], IUserManager],
        mailboxes: MailboxManagers,
        live_nodes: Callable[[], Sequence[str]],
        now: Callable[[], float],
        *,
        balancer: ILoadBalancer | None = None,
        replicated: Callable[..., Deferred[list[Digest]]] | None = None,
        forward: Forward | None = None,
        manager_lease: Callable[[str], bool | None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.users = users
        self.mailboxes = mailboxes
        self.live_nodes = live_nodes
        self.now = now
        #: ``balancer.LoadBalancer`` (or the same API) in a cluster; None: affinity.
        self.balancer = balancer
        self.retries = 0
        #: Stores that failed after their request was sent (not retried elsewhere).
        self.unsure = 0
        #: Holder records (add_fragment) that failed once and were tried again.
        self.holder_retries = 0
        #: Pending notes (note_pending) that failed (the storing node repeats them).
        self.notes_lost = 0
        #: Numbered deliveries stored unnumbered because a new holder could not be
        #: recorded on a majority first (:meth:`_recorded_first`).
        self.unrecorded_holders = 0
        #: RCPT lookups answered 451 because the user's manager was out of reach.
        self.lookups_unavailable = 0
        #: Replication's ``store(nodes, message)`` (``MailReplication``): users with
        #: ``replicas >= 2`` are stored through it, one logged update for all copies.
        self.replicated = replicated
        #: ``forward(node, address, body, when)`` (``MailCluster.forward_delivery``):
        #: an R=1 delivery whose manager is another node is handed to that node, which
        #: runs this same proxy there (:meth:`deliver_forwarded`): one call in place
        #: of plan, store and add_fragment when it stores the message itself.
        self.forward = forward
        #: Deliveries handed to the user's manager node, and those that came back
        #: before reaching it (then delivered from here, the usual way).
        self.forwarded = 0
        self.forward_fallbacks = 0
        #: ``manager_lease(address)`` (``MailCluster.manager_lease``): None unless this
        #: node is the user's manager, else whether its UIDs are still leased.
        self.manager_lease = manager_lease
        #: Deliveries planned by this node as the user's manager whose lease was gone
        #: by their 250 (paused in between): answered 451 (docs/chaos.md, case A).
        self.lease_lost = 0

    def status(self) -> dict[str, int]:
        """The proxy's counters (``/api/status`` ``delivery``)."""
        return {
            "store_retries": self.retries,
            "unsure_stores": self.unsure,
            "holder_retries": self.holder_retries,
            "unrecorded_holders": self.unrecorded_holders,
            "notes_lost": self.notes_lost,
            "lookups_unavailable": self.lookups_unavailable,
            "forwarded": self.forwarded,
            "forward_fallbacks": self.forward_fallbacks,
            "lease_lost": self.lease_lost,
        }

    def lookup(self, address: str) -> Deferred[Profile | None]:
        """The recipient's profile (None: no such user)."""
        return self.users(address).profile(address)

    def choose_nodes(self, profile: Profile, fragments: Sequence[str]) -> list[str]:
        """Nodes to store on: keep affinity with existing fragments, then this node."""
        live = list(self.live_nodes())
        if self.balancer is not None:
            # R=1: this node first while the balance allows (a store here is no call)
            prefer = self.node_id if profile.replicas <= 1 else None
            chosen = self.balancer.choose(
                live, list(fragments), profile.replicas, self.now(), prefer=prefer
            )
            return list(chosen) or live[:1]
        order = [n for n in fragments if n in live]
        if self.node_id in live and self.node_id not in order:
            order.append(self.node_id)
        order += [n for n in live if n not in order]
        return order[: max(1, min(profile.replicas, len(order)))]

    def deliver(self, recipients: Sequence[str], body: bytes) -> Deferred[list[Digest]]:
        """Store ``body`` in each recipient's INBOX; fires when every copy is durable."""
        when = self.now()
        ds = [self._one(r, body, when) for r in dict.fromkeys(r.lower() for r in recipients)]
        return DeferredList(ds, fireOnOneErrback=True, consumeErrors=True).addCallbacks(
            lambda results: [d for _, got in results for d in got], _first_error
        )

    def deliver_forwarded(self, address: str, body: bytes, when: float) -> Deferred[list[Digest]]:
        """Deliver ``body`` to one user for another node's proxy (:attr:`forward`): here,
        the usual way, never handed on again (the nodes' maps may disagree)."""
        return self._one(address.lower(), body, when, forwarded=True)

    def _forward(self, node: str, address: str, body: bytes, when: float) -> Deferred[list[Digest]]:
        """Hand the delivery to ``node`` (the user's manager); if the call failed before
        it reached ``node``, deliver from here.  One that reached it and failed there
        (or may have) fails: the message may be stored (SMTP 451, as a store's)."""
        assert self.forward is not None
        self.forwarded += 1

        def failed(f: Failure) -> Deferred[list[Digest]]:
            if (
                f.check(PeerUnavailable)
                and not f.check(HolderNotRecorded, DeliveryDeferred)
                and not getattr(f.value, "maybe_done", False)
            ) or f.check(amp.UnhandledCommand):  # (a node without the command)
                self.forward_fallbacks += 1
                return self._one(address, body, when, forwarded=True)
            if f.check(DeliveryRefused):
                code, _, text = str(f.value).partition(" ")
                return fail(smtp.SMTPServerError(int(code) if code.isdigit() else 550, text))
            return fail(f)

        return self.forward(node, address, body, when).addErrback(failed)

    def _one(
        self, address: str, body: bytes, when: float, forwarded: bool = False
    ) -> Deferred[list[Digest]]:
        manager = self.users(address)
        d = manager.profile(address)

        def got_profile(profile: Profile | None) -> Deferred[list[Digest]]:
            if profile is None:
                raise smtp.SMTPServerError(550, f"no such user {address}")
            owner = getattr(manager, "node_id", self.node_id)
            if (
                self.forward is not None
                and not forwarded
                and profile.replicas <= 1
                and owner != self.node_id
            ):
                return self._forward(owner, address, body, when)
            # Fragment list, UID and its fence in one question. Fenced for replicated
            # users too (issue 14 bug 2): the coordinator's copy is checked like an
            # R=1 store and the copies follow it.
            local = self.manager_lease is not None and self.manager_lease(address) is True
            d = manager.delivery_plan(address, 1, False, profile.replicas)
            stored = d.addCallback(
                lambda p: store_on(
                    p[1], self.choose_nodes(profile, p[0]), p[0], p[2], profile.replicas
                )
            )
            return stored.addCallback(self._still_leased, address) if local else stored

        def store_on(
            uid: int,
            nodes: list[str],
            fragments: tuple[str, ...],
            fence: str = "",
            replicas: int = 1,
        ) -> Deferred[list[Digest]]:
            msg = NewMessage(address, INBOX, body, (), when, uid, fence)

            def noted(digests: list[Digest]) -> Deferred[list[Digest]]:
                # Every holder, also one the fragment list names already: the list
                # may come from soft state whose holder record never became durable
                # (a failed or still running majority write); the manager answers
                # at once for a record it has (issue 14, chaos bug 4).
                numbered = list(dict.fromkeys(dig.node for dig in digests if dig.uid))
                adds = self._add_fragments(manager, address, numbered, uid)
                for n in dict.fromkeys(dig.node for dig in digests if not dig.uid):
                    if n not in numbered:
                        # Unnumbered: not listed before the current manager numbers
                        # it, which records the holder then; best effort now.
                        _add(manager, address, n, uid).addErrback(self._note_lost)
                # Stored unnumbered (no majority, or a stale fence at the storing
                # node): durable, so the 250 stands; the manager of the map we hold
                # *now* numbers it (a lost note: the storing node's pending sweep and
                # hints carry the count at the next map change).
                note = self.users(address).note_pending
                for n in dict.fromkeys(dig.node for dig in digests if dig.uid == 0):
                    note(address, n).addErrback(self._note_lost)
                # No 250 before the holder records are durable: a read elsewhere
                # would list the mailbox without this message and without saying so
                # (hidden), and list it later below higher UIDs.
                return adds.addCallback(lambda _: digests)

            def go(msg: NewMessage) -> Deferred[list[Digest]]:
                if self.replicated is not None and replicas > 1:
                    # Also with one node in reach: the log completes the R copies later
                    # (a plain store would stay a single copy for good).
                    return self.replicated(nodes, msg, replicas).addCallback(noted)
                tried = set(nodes)
                stores = [self._store(n, msg, tried, fragments, manager) for n in nodes]
                return DeferredList(stores, fireOnOneErrback=True, consumeErrors=True).addCallbacks(
                    lambda results: noted([dig for _, got in results for dig in got]),
                    _first_error,
                )

            return self._recorded_first(manager, msg, nodes, fragments).addCallback(go)

        return d.addCallback(got_profile)

    def _still_leased(self, digests: list[Digest], address: str) -> list[Digest]:
        """A delivery this node planned as ``address``'s manager: its numbered copies
        get a 250 only if the node still manages the user under a read lease.  Paused
        in between (SIGSTOP, a stall), a new manager may have numbered above the
        plan's UID and readers shown it; the copy now below them was never
        acknowledged (451), and an unnumbered one is numbered later, above."""
        if any(d.uid > 0 for d in digests):
            assert self.manager_lease is not None
            if self.manager_lease(address) is not True:
                self.lease_lost += 1
                raise AllocationLapsed(
                    f"this node's lease on {address}'s UIDs lapsed during the delivery"
                )
        return digests

    def _recorded_first(
        self,
        manager: IUserManager,
        msg: NewMessage,
        nodes: Sequence[str],
        fragments: Sequence[str],
    ) -> Deferred[NewMessage]:
        """``msg`` as planned if every node it goes to is a holder a majority recorded
        (the plan's fragment list names only those), after recording the others;
        unnumbered (UID pending, no fence) if a record fails.  A numbered message on a
        node no majority knows of would be missed by a manager on the other side of a
        partition, which then shows higher UIDs; after the heal it would appear below
        them (docs/mail.md, "UIDs under partitions and pauses")."""
        new = [n for n in dict.fromkeys(nodes) if n not in fragments]
        if msg.uid <= 0 or not new:
            return succeed(msg)
        # The manager renews the allocation once the record is written: its age is
        # checked at the store, and a record can outlast it under load (a UID gap).
        ds = [manager.add_holder(msg.user, n, msg.uid, msg.fence) for n in new]

        def outcome(results: list[tuple[bool, Any]]) -> NewMessage:
            # every record written, and (for a fenced plan) every renewal granted
            fences = [got for ok, got in results if ok]
            if len(fences) == len(results) and (all(fences) or not msg.fence):
                return attrs.evolve(msg, fence=fences[-1])
            self.unrecorded_holders += 1
            return attrs.evolve(msg, uid=PENDING, fence="")

        return DeferredList(ds, consumeErrors=True).addCallback(outcome)

    def _add_fragments(
        self, manager: IUserManager, address: str, nodes: Sequence[str], first: int = 0
    ) -> Deferred[None]:
        """Record ``nodes`` as holders of ``address``'s mail with its manager; each
        failed record is tried once more, then the delivery fails (SMTP 451): the
        message is stored, but the 250 waits for a record the reconstruction finds."""

        def one(node: str) -> Deferred[None]:
            def again(f: Failure) -> Deferred[None]:
                if f.check(AllocationLapsed):
                    return fail(f)  # as late the second time: no 250 under that UID
                self.holder_retries += 1
                return _add(manager, address, node, first)

            return _add(manager, address, node, first).addErrback(again)

        ds = [one(n) for n in nodes]
        return DeferredList(ds, fireOnOneErrback=True, consumeErrors=True).addCallbacks(
            lambda _: None, _first_error
        )

    def _note_lost(self, f: Failure) -> None:
        """A pending note (or an unnumbered copy's holder note) that did not arrive:
        the storing node's sweep and hints repeat it."""
        self.notes_lost += 1

    def _store(
        self,
        node: str,
        msg: NewMessage,
        tried: set[str],
        fragments: Sequence[str],
        manager: IUserManager | None = None,
    ) -> Deferred[list[Digest]]:
        """Store on ``node``; if it fails before the request reached ``node``, on
        another live node. A store that timed out after it was sent may still happen
        there (TCP delivers it late, after a heal): storing it elsewhere too would
        list the message twice, so that one fails (a temporary SMTP error; the
        client's retry is its own message)."""

        def failed(f: Failure) -> Deferred[list[Digest]]:
            if f.check(MailError) or self.balancer is None:
                return fail(f)
            if may_have_run(f):
                self.unsure += 1
                return fail(f)
            self.balancer.failed(node, self.now())
            others = [n for n in self.live_nodes() if n not in tried]
            if not others:
                return fail(f)
            pick = self.balancer.choose(others, list(fragments), 1, self.now()) or others[:1]
            tried.add(pick[0])
            self.retries += 1
            if manager is None:
                return self._store(pick[0], msg, tried, fragments)
            d = self._recorded_first(manager, msg, pick[:1], fragments)
            return d.addCallback(lambda m: self._store(pick[0], m, tried, fragments, manager))

        try:
            d = self.mailboxes(node).store([msg])
        except KeyError as e:
            return fail(e)
        return d.addErrback(failed)


def _add(manager: IUserManager, address: str, node: str, first: int) -> Deferred[None]:
    """``add_fragment``, telling a cluster manager that the plan's UID ``first`` is
    stored (it leaves the visibility horizon, docs/mail.md)."""
    return manager.add_fragment(address, node, first)


def _first_error(f: Failure) -> Failure:
    err = f.value
    if isinstance(err, FirstError):
        sub: Failure = err.subFailure
        return sub
    return f


class OutboundSpool:
    """Mail accepted for relay domains, kept durably until a sender takes it.

    ``DATA_DIR/mail/outbound/<id>.eml`` plus ``<id>.json`` (envelope), written
    to tmp, fsynced and renamed like the mailbox bodies.
    """

    def __init__(self, reactor: IClockThreads, threadpool: ThreadPool, root: Path) -> None:
        self.reactor = reactor
        self.pool = threadpool
        self.root = root
        self.tmp = root / "tmp"

    def _write(self, sender: str, recipients: list[str], body: bytes) -> str:
        self.tmp.mkdir(parents=True, exist_ok=True)
        ident = uuid.uuid4().hex
        envelope = json.dumps({"from": sender, "to": recipients}).encode()
        for suffix, data in ((".eml", body), (".json", envelope)):
            tmp = self.tmp / (ident + suffix)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.root / (ident + suffix))
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return ident

    def enqueue(self, sender: str, recipients: list[str], body: bytes) -> Deferred[str]:
        """Spool one message for ``recipients``; fires with its id once durable."""
        return deferToThreadPool(self.reactor, self.pool, self._write, sender, recipients, body)

    def pending(self) -> list[str]:
        """Ids of the spooled messages (blocking; for tests and admin)."""
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.json"))


def with_return_path(sender: bytes | str, body: bytes) -> bytes:
    """``body`` with the ``Return-Path:`` a final delivery adds (RFC 5321 4.4)."""
    path = sender.decode("utf-8", "replace") if isinstance(sender, bytes) else sender
    path = path.replace("\r", "").replace("\n", "")
    return f"Return-Path: <{path}>\r\n".encode("utf-8", "replace") + body


@attrs.frozen
class SmtpPolicy:
    """What this node's SMTP accepts."""

    domain: str
    hostname: str
    max_message_size: int
    relay_domains: tuple[str, ...] = ()
    max_recipients: int = 100
    #: A submission listener (587/465): AUTH before MAIL, the user's own address
    #: as sender, any destination (queued out); the MX listener never relays.
    submission: bool = False
    #: Further local domains besides ``domain`` (``--domain`` repeated).
    other_domains: tuple[str, ...] = ()

    def is_local(self, domain: str) -> bool:
        """True if mail for ``domain`` is delivered here."""
        domain = domain.lower()
        return domain == self.domain or domain in self.other_domains


@attrs.define
class Recipient:
    """A validated RCPT: a local user, or a relay address."""

    address: str
    relay: bool


@implementer(ISmtpDelivery)
class SmtpDelivery:
    """twisted.mail's ``IMessageDelivery``: validates MAIL/RCPT, builds Received."""

    def __init__(
        self,
        proxy: DeliveryProxy,
        policy: SmtpPolicy,
        now: Callable[[], float],
        authenticated_as: str | None = None,
    ) -> None:
        self.proxy = proxy
        self.policy = policy
        self.now = now
        self.authenticated_as = authenticated_as

    def receivedHeader(self, helo: tuple[bytes, bytes], origin: smtp.Address, recipients: Any) -> bytes:  # fmt: skip
        """A Received: trace line (the same for every recipient)."""
        name = (helo[0] or b"unknown").decode("ascii", "replace")[:100]
        peer = helo[1].decode("ascii", "replace") if isinstance(helo[1], bytes) else str(helo[1])
        auth = f" (authenticated as {self.authenticated_as})" if self.authenticated_as else ""
        # RFC 3848: ESMTP, plus S under TLS and A when authenticated.
        users = list(recipients or [])
        session = users[0].protocol if users else None
        tls = ISmtpSession.providedBy(session) and bool(session.startedTLS)
        protocol = "ESMTP" + ("S" if tls else "") + ("A" if self.authenticated_as else "")
        # RFC 5321 4.4: "for" names the recipient only when there is one.
        one = f"\r\n\tfor <{users[0].dest}>" if len(users) == 1 else ""
        line = (
            f"Received: from {name} ([{peer}]){auth}\r\n\tby {self.policy.hostname} "
            f"(yimaporc) with {protocol}{one}; {formatdate(self.now(), usegmt=True)}"
        )
        return line.encode("ascii", "replace")

    def validateFrom(self, helo: tuple[bytes, bytes], origin: smtp.Address) -> smtp.Address:
        """Any syntactically valid sender (SPF and the like are out of scope)."""
        return origin

    def validateTo(self, user: smtp.User) -> Deferred[Callable[[], Any]]:
        """550 for unknown local users and for relaying without permission."""
        domain = user.dest.domain.decode("ascii", "replace").lower()
        local = user.dest.local.decode("utf-8", "replace")
        # The listener's policy (submission or MX), not the one this avatar was made with.
        session = user.protocol
        policy: SmtpPolicy = session.policy if ISmtpSession.providedBy(session) else self.policy
        if not self.policy.is_local(domain):
            if self.authenticated_as and (policy.submission or domain in policy.relay_domains):
                return succeed(self._factory(user, Recipient(f"{local}@{domain}", True)))
            raise smtp.SMTPBadRcpt(user, 550, "Relaying denied")
        try:
            address = normalise(f"{local}@{domain}")
        except BadAddress:
            raise smtp.SMTPBadRcpt(user, 550, "No such user here") from None

        def found(profile: Profile | None) -> Callable[[], Any]:
            if profile is None:
                raise smtp.SMTPBadRcpt(user, 550, "No such user here")
            return self._factory(user, Recipient(address, False))

        def unavailable(f: Failure) -> Failure:
            # The user's manager out of reach: expected under faults, a counter and
            # a 451 (twisted.mail would log any other error as "Unhandled Error").
            if f.check(PeerUnavailable):
                self.proxy.lookups_unavailable += 1
                _log.warn("SMTP RCPT deferred: {e}", e=f.getErrorMessage())
                return Failure(
                    smtp.SMTPBadRcpt(user, 451, "4.4.0 Cluster peer unavailable, try later")
                )
            return f

        return self.proxy.lookup(address).addCallbacks(found, unavailable)

    @staticmethod
    def _factory(user: smtp.User, rcpt: Recipient) -> Callable[[], Any]:
        def make() -> Any:
            return user.protocol.message_for(rcpt)

        return make
