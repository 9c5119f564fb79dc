"""Porcupine across nodes (seed §2-3): AMP commands, remote managers, the cluster wiring.

:class:`MailCluster` turns the :class:`~yimaporc.porcupine.service.MailService`
of each ``porcupine-node`` into one mail service:

- every :class:`IUserManager` and :class:`IMailboxManager` method is an AMP
  command (``porcupine.um.*``, ``porcupine.mb.*``) answered by the node's local
  managers; :class:`RemoteUserManager` and :class:`RemoteMailboxManager` call them
  over ``node.rpc`` and implement the same interfaces, so
  ``MailService.users_for(address)`` is the local manager when this node owns
  the address's bucket and an AMP proxy to the owner otherwise, and
  ``mailboxes_for(node)`` likewise.  Manager errors (``NoSuchUser``,
  ``NoSuchMailbox``...) cross as AMP errors and come back as the same exceptions.
- :class:`ClusterUserManager` keeps its buckets' soft state in a
  :class:`~yimaporc.porcupine.softstate.UserManagerState`: on each user-map change
  it installs the new map, and every node sends the new managers of the fresh
  buckets what its hard state says (``porcupine.hints``: users with mail, their
  highest UIDNEXT, the bucket's profile records), one directory read per bucket.
  A fresh bucket is *settling* until every live node has answered for it or
  ``settle_timeout`` passed; ``fragments`` and ``reserve_uids`` for its users wait
  for that (profiles never wait: every node holds them all).  Hints carry the
  sender's view epoch: one from a newer view waits for it, others count only on an
  exact (owner, bucket epoch) match.  A node that was *away*
  (:attr:`~yimaporc.cluster.bucketservice.BucketMapService.away`: booted, or its
  previous view is not the one the commit was made from) sends hints for every
  bucket and pulls (``porcupine.hints-request``) the buckets it manages that the
  commit did not restamp from every member (docs/mail.md).
- :class:`ProfileReplicator` is the one profile write path: the local SQLite
  write, then a push of the record to every live member (``porcupine.profiles``),
  newest ``updated`` winning; hints carry the records too, so a node that was
  down catches up when it manages the bucket.
- Load: every store reply carries the storing node's load (stores in progress
  there), and every ``load_interval`` seconds each node swaps its load with a
  few random live members (``porcupine.load``); both feed the delivery proxy's
  :class:`~yimaporc.porcupine.balancer.LoadBalancer`.
"""

from __future__ import annotations

import json
import os
import random
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from ..cluster.buckets import BucketMap
from ..cluster.rpc import BigBytes, PeerUnavailable
from .balancer import LoadBalancer, load_figure
from .interfaces import IMailboxManager, IUserManager
from .profiledb import ProfileDB, Record
from .reconstruct import (
    HEDGE_DELAY,
    LEASE,
    MARK_TIMEOUT,
    NODE_ALLOCATION_TTL,
    NODE_ANSWER_TTL,
    NODE_READ_LEASE,
    NODE_TIMED_ALLOCATION_TTL,
    PAUSE_GRACE,
    PULL_RETRY,
    PULL_TRIES,
    SWEEP_INTERVAL,
    UID_GAP,
    Action,
    BucketHint,
    Horizon,
    MajorityWrite,
    MalformedHint,
    NeedMark,
    Number,
    PullHints,
    PushProfiles,
    Reconstruction,
    SendHints,
    Settled,
    Taken,
    UserHint,
    decode_hints,
    fence_of,
    has_majority,
    timed_fence,
)
from .softstate import bucket_of as _raw_bucket_of
from .usermap import N_BUCKETS, BadAddress, bucket_of
from .users import UserManager
from .values import (
    PENDING,
    BadCredentials,
    Digest,
    MailboxExists,
    MailboxInfo,
    MessageTooLarge,
    NewMessage,
    NoSuchMailbox,
    NoSuchUser,
    Profile,
    UserExists,
)

__all__ = [
    "UID_GAP",
    "ClusterUserManager",
    "MailCluster",
    "ProfileReplicator",
    "RemoteMailboxManager",
    "RemoteUserManager",
    "fence_of",
    "has_majority",
]

# --- wire values ------------------------------------------------------------------


class Json(BigBytes):
    """Any JSON value, of any size (split like :class:`BigBytes`)."""

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        key = name.decode("ascii")
        objects[key] = json.dumps(objects[key], separators=(",", ":")).encode("utf-8")
        super().toBox(name, strings, objects, proto)

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        super().fromBox(name, strings, objects, proto)
        key = name.decode("ascii")
        try:
            objects[key] = json.loads(objects[key])
        except ValueError as e:
            raise amp.MalformedAmpBox(f"bad JSON in {name!r}") from e


class HolderNotRecorded(PeerUnavailable):
    """No majority recorded a node as holder of a user's mail (the delivery answers a
    temporary error: the reconstruction would not find the message)."""


ERRORS: dict[type[Exception], bytes] = {
    HolderNotRecorded: b"HOLDER_NOT_RECORDED",
    NoSuchUser: b"NO_SUCH_USER",
    BadCredentials: b"BAD_CREDENTIALS",
    NoSuchMailbox: b"NO_SUCH_MAILBOX",
    MailboxExists: b"MAILBOX_EXISTS",
    UserExists: b"USER_EXISTS",
    MessageTooLarge: b"MESSAGE_TOO_LARGE",
    BadAddress: b"BAD_ADDRESS",
}


def _profile_out(p: Profile | None) -> Any:
    return None if p is None else [p.address, p.password_hash, p.replicas, p.created]


def _profile_in(v: Any) -> Profile | None:
    return None if v is None else Profile(str(v[0]), str(v[1]), int(v[2]), float(v[3]))


def _digest_out(d: Digest) -> list[Any]:
    return [d.uid, d.key, d.size, list(d.flags), d.internal_date, d.node]


def _digest_in(v: Any) -> Digest:
    return Digest(int(v[0]), str(v[1]), int(v[2]), tuple(v[3]), float(v[4]), str(v[5]))


def _info_out(i: MailboxInfo) -> list[Any]:
    return [i.name, i.uidvalidity, i.uidnext, i.messages, i.unseen, i.subscribed]


def _info_in(v: Any) -> MailboxInfo:
    return MailboxInfo(str(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]), bool(v[5]))


def pack_messages(messages: Sequence[NewMessage]) -> bytes:
    """A JSON header (everything but the bodies) followed by the bodies."""
    head = json.dumps(
        [
            [m.user, m.mailbox, list(m.flags), m.internal_date, m.uid, len(m.body), m.fence]
            for m in messages
        ]
    ).encode("utf-8")
    return struct.pack("!I", len(head)) + head + b"".join(m.body for m in messages)


def unpack_messages(data: bytes) -> list[NewMessage]:
    """The inverse of :func:`pack_messages` (``MalformedAmpBox`` on junk)."""
    try:
        (n,) = struct.unpack("!I", data[:4])
        head = json.loads(data[4 : 4 + n])
        pos = 4 + n
        out = []
        for entry in head:
            user, mailbox, flags, date, uid, size = entry[:6]
            fence = str(entry[6]) if len(entry) > 6 else ""
            body = data[pos : pos + int(size)]
            if len(body) != int(size):
                raise ValueError("short body")
            pos += int(size)
            out.append(
                NewMessage(
                    str(user), str(mailbox), body, tuple(flags), float(date), int(uid), fence
                )
            )
        return out
    except (ValueError, TypeError, struct.error) as e:
        raise amp.MalformedAmpBox(f"bad message batch: {e}") from e


def pack_bodies(bodies: dict[int, bytes]) -> bytes:
    """``{uid: body}`` as a JSON header of (uid, size) then the bodies."""
    items = sorted(bodies.items())
    head = json.dumps([[uid, len(b)] for uid, b in items]).encode("utf-8")
    return struct.pack("!I", len(head)) + head + b"".join(b for _, b in items)


def unpack_bodies(data: bytes) -> dict[int, bytes]:
    """The inverse of :func:`pack_bodies`."""
    (n,) = struct.unpack("!I", data[:4])
    pos, out = 4 + n, {}
    for uid, size in json.loads(data[4 : 4 + n]):
        out[int(uid)] = data[pos : pos + int(size)]
        pos += int(size)
    return out


# --- commands ---------------------------------------------------------------------


class _Cmd(amp.Command):
    errors = ERRORS  # type: ignore[assignment]


# "user", not "address": RpcClient.call's own first parameter is named address.
_U: list[tuple[bytes, amp.Argument]] = [(b"user", amp.Unicode())]


class UmProfile(_Cmd):
    """IUserManager.profile."""

    commandName = b"porcupine.um.profile"
    arguments = _U
    response = [(b"profile", Json())]


class UmAuthenticate(_Cmd):
    """IUserManager.authenticate."""

    commandName = b"porcupine.um.authenticate"
    arguments = [*_U, (b"password", amp.Unicode())]
    response = [(b"profile", Json())]


class UmFragments(_Cmd):
    """IUserManager.fragments; ``away``: nodes that held mail for the user when they
    left the view (out of reach, not gone)."""

    commandName = b"porcupine.um.fragments"
    arguments = _U
    response = [
        (b"nodes", amp.ListOf(amp.Unicode())),
        (b"away", amp.ListOf(amp.Unicode(), optional=True)),
        (b"certain", amp.Boolean(optional=True)),
        # the visibility horizon (Horizon.encode: [next, first1, end1, ...]), issue 14
        (b"horizon", amp.ListOf(amp.Integer(), optional=True)),
    ]


class UmAddFragment(_Cmd):
    """IUserManager.add_fragment."""

    commandName = b"porcupine.um.add_fragment"
    # ``first``: the UID the delivery's plan allocated, now stored (numbered or not):
    # it no longer holds the visibility horizon back (issue 14 bug 3).
    arguments = [*_U, (b"node", amp.Unicode()), (b"first", amp.Integer(optional=True))]


class UmRemoveFragment(_Cmd):
    """IUserManager.remove_fragment."""

    commandName = b"porcupine.um.remove_fragment"
    arguments = [*_U, (b"node", amp.Unicode())]


class UmReserveUids(_Cmd):
    """ClusterUserManager.reserve_uids: ``count`` UIDs from the user's counter."""

    commandName = b"porcupine.um.reserve_uids"
    arguments = [*_U, (b"count", amp.Integer())]
    response = [(b"first", amp.Integer())]


class UmPlan(_Cmd):
    """``fragments`` and ``reserve_uids`` in one round trip (the delivery proxy's
    question).  ``first`` is :data:`~.values.PENDING` when the manager may not number
    (no majority, or its bucket is not settled with every member's hint); ``fence``
    is the allocation's fence, checked by the storing node.  ``unfenced``: a
    replicated store (its copies apply one UID; see docs/mail.md)."""

    commandName = b"porcupine.um.plan"
    arguments = [
        *_U,
        (b"count", amp.Integer()),
        (b"unfenced", amp.Boolean(optional=True)),
    ]
    response = [
        (b"nodes", amp.ListOf(amp.Unicode())),
        (b"first", amp.Integer()),
        (b"fence", amp.Unicode(optional=True)),
    ]


class UmPending(_Cmd):
    """A message for ``user`` was stored unnumbered on ``node``: number it when allowed."""

    commandName = b"porcupine.um.pending"
    arguments = [*_U, (b"node", amp.Unicode())]


_M: list[tuple[bytes, amp.Argument]] = [(b"user", amp.Unicode()), (b"mailbox", amp.Unicode())]


class MbStore(_Cmd):
    """IMailboxManager.store; the reply carries the storing node's load."""

    commandName = b"porcupine.mb.store"
    arguments = [(b"messages", BigBytes())]
    response = [(b"digests", Json()), (b"load", amp.Float())]


class MbMailboxes(_Cmd):
    """IMailboxManager.mailboxes."""

    commandName = b"porcupine.mb.mailboxes"
    arguments = [(b"user", amp.Unicode())]
    response = [(b"infos", Json())]


class MbCreateMailbox(_Cmd):
    """IMailboxManager.create_mailbox."""

    commandName = b"porcupine.mb.create_mailbox"
    arguments = _M
    response = [(b"info", Json())]


class MbDeleteMailbox(_Cmd):
    """IMailboxManager.delete_mailbox."""

    commandName = b"porcupine.mb.delete_mailbox"
    arguments = _M


class MbRenameMailbox(_Cmd):
    """IMailboxManager.rename_mailbox."""

    commandName = b"porcupine.mb.rename_mailbox"
    arguments = [*_M, (b"new", amp.Unicode())]


class MbSubscribe(_Cmd):
    """IMailboxManager.subscribe."""

    commandName = b"porcupine.mb.subscribe"
    arguments = [*_M, (b"subscribed", amp.Boolean())]


class MbDigests(_Cmd):
    """IMailboxManager.digests."""

    commandName = b"porcupine.mb.digests"
    arguments = _M
    response = [(b"digests", Json())]


class MbView(_Cmd):
    """MailboxManager.view: the tree and one mailbox's digests in one round trip
    (``exists`` false: no such mailbox on that node)."""

    commandName = b"porcupine.mb.view"
    arguments = _M
    response = [(b"infos", Json()), (b"digests", Json()), (b"exists", amp.Boolean())]


class MbFetch(_Cmd):
    """IMailboxManager.fetch."""

    commandName = b"porcupine.mb.fetch"
    arguments = [*_M, (b"uids", Json())]
    response = [(b"bodies", BigBytes())]


class MbSetFlags(_Cmd):
    """IMailboxManager.set_flags."""

    commandName = b"porcupine.mb.set_flags"
    arguments = [*_M, (b"uids", Json()), (b"flags", Json()), (b"mode", amp.Integer())]
    response = [(b"flags", Json())]


class MbCopy(_Cmd):
    """IMailboxManager.copy."""

    commandName = b"porcupine.mb.copy"
    arguments = [*_M, (b"uids", Json()), (b"dest", amp.Unicode())]
    response = [(b"digests", Json())]


class MbDelete(_Cmd):
    """IMailboxManager.delete."""

    commandName = b"porcupine.mb.delete"
    arguments = [*_M, (b"uids", Json())]
    response = [(b"uids", Json())]


class MbRemoveUser(_Cmd):
    """IMailboxManager.remove_user."""

    commandName = b"porcupine.mb.remove_user"
    arguments = [(b"user", amp.Unicode())]


class MbNumber(_Cmd):
    """Number up to ``count`` of ``user``'s unnumbered messages on the callee from
    ``first`` on, if ``fence`` is the callee's current fence of the user's bucket."""

    commandName = b"porcupine.mb.number"
    arguments = [
        *_U,
        (b"fence", amp.Unicode()),
        (b"first", amp.Integer()),
        (b"count", amp.Integer()),
    ]
    response = [(b"done", amp.Integer()), (b"left", amp.Integer()), (b"top", amp.Integer())]


class MbDemote(_Cmd):
    """FragmentStore.demote: message ``key`` under ``uid`` back to unnumbered."""

    commandName = b"porcupine.mb.demote"
    arguments = [*_M, (b"uid", amp.Integer()), (b"key", amp.Unicode())]
    response = [(b"done", amp.Boolean())]


class UidMark(_Cmd):
    """Record durably that UIDs of ``bucket`` up to ``mark`` may be handed out by the
    manager with ``fence`` (refused, ``ok`` false, if that is not the callee's
    current fence of the bucket: it has installed a newer map)."""

    commandName = b"porcupine.uid-mark"
    arguments = [(b"bucket", amp.Integer()), (b"fence", amp.Unicode()), (b"mark", amp.Integer())]
    # ``seen``: the callee's mark before this call (also when refused): the manager
    # starts its UIDs at or above it (Reconstruction.mark_done).
    response = [(b"ok", amp.Boolean()), (b"seen", amp.Integer(optional=True))]


class ReadLease(_Cmd):
    """Does the callee have the caller's view (``epoch`` and ``members``)?  If so it
    promises to record no UID mark for a bucket that moved in another view's map for
    the read lease's length (the caller answers reads as certain meanwhile)."""

    commandName = b"porcupine.read-lease"
    arguments = [(b"epoch", amp.Integer()), (b"members", amp.ListOf(amp.Unicode()))]
    response = [(b"ok", amp.Boolean())]


class UidHolders(_Cmd):
    """Record durably that ``holders`` (``[[user, node]...]``) of ``bucket`` hold
    mail, for the manager with ``fence`` (refused like :class:`UidMark`)."""

    commandName = b"porcupine.uid-holders"
    arguments = [(b"bucket", amp.Integer()), (b"fence", amp.Unicode()), (b"holders", Json())]
    response = [(b"ok", amp.Boolean())]


class MbUsersInBucket(_Cmd):
    """IMailboxManager.users_in_bucket."""

    commandName = b"porcupine.mb.users_in_bucket"
    arguments = [(b"bucket", amp.Integer())]
    response = [(b"users", Json())]


class Hints(_Cmd):
    """Soft-state reconstruction step 2: ``[[bucket, epoch, [[user, has_mail, uidnext]...],
    [profile record...]]...]`` from ``sender``'s hard state, sent in ``sender``'s view
    epoch ``view`` (the manager waits for that view if it is newer than its own)."""

    commandName = b"porcupine.hints"
    arguments = [
        (b"sender", amp.Unicode()),
        (b"hints", Json()),
        (b"view", amp.Integer(optional=True)),
    ]


class HintsRequest(_Cmd):
    """The pull: a manager whose soft state may have missed hints (it was *away*)
    asks for the callee's hints of ``buckets`` (same entries as :class:`Hints`)."""

    commandName = b"porcupine.hints-request"
    arguments = [(b"sender", amp.Unicode()), (b"buckets", Json())]
    response = [(b"hints", Json())]


class ProfilePut(_Cmd):
    """Profile records (newest ``updated`` wins) pushed by the node that wrote them."""

    commandName = b"porcupine.profiles"
    arguments = [(b"records", Json())]


class LoadExchange(_Cmd):
    """The periodic load swap: the caller's load in, the callee's out."""

    commandName = b"porcupine.load"
    arguments = [(b"node", amp.Unicode()), (b"load", amp.Float())]
    response = [(b"load", amp.Float())]


COMMANDS: tuple[type[_Cmd], ...] = (
    UmProfile, UmAuthenticate, UmFragments, UmAddFragment, UmRemoveFragment, UmReserveUids,
    UmPlan, UmPending, MbNumber, MbDemote, UidMark, UidHolders,
    MbStore, MbMailboxes, MbCreateMailbox, MbDeleteMailbox, MbRenameMailbox, MbSubscribe,
    MbDigests, MbFetch, MbSetFlags, MbCopy, MbDelete, MbRemoveUser, MbUsersInBucket,
    Hints, HintsRequest, ProfilePut, LoadExchange,
)  # fmt: skip


# --- remote proxies ---------------------------------------------------------------

Caller = Callable[..., Deferred[Any]]


class _Remote:
    """Calls commands on one node through ``call(node, command, **kw)``."""

    def __init__(self, node_id: str, call: Caller) -> None:
        self.node_id = node_id
        self._call = call

    def call(self, command: type[_Cmd], /, **kw: Any) -> Deferred[Any]:
        return self._call(self.node_id, command, **kw)


@implementer(IUserManager)
class RemoteUserManager(_Remote):
    """:class:`IUserManager` of another node's buckets, over AMP.

    Profiles found are kept for ``profile_ttl`` seconds (SMTP asks at RCPT and
    again at delivery); :meth:`forget` drops one when a newer record arrives.
    """

    def __init__(
        self,
        node_id: str,
        call: Caller,
        now: Callable[[], float] | None = None,
        profile_ttl: float = 5.0,
    ) -> None:
        super().__init__(node_id, call)
        self.now = now
        self.profile_ttl = profile_ttl
        self._profiles: dict[str, tuple[Profile, float]] = {}
        self._away: dict[str, tuple[str, ...]] = {}
        self._uncertain: dict[str, bool] = {}
        self._horizon: dict[str, Horizon | None] = {}

    def forget(self, address: str) -> None:
        """Drop the cached profile of ``address``."""
        self._profiles.pop(address.lower(), None)

    def profile(self, address: str) -> Deferred[Profile | None]:
        """See :class:`IUserManager`."""
        address = address.lower()
        hit = self._profiles.get(address)
        if hit is not None and self.now is not None and hit[1] > self.now():
            return succeed(hit[0])

        def got(r: dict[str, Any]) -> Profile | None:
            p = _profile_in(r["profile"])
            if p is not None and self.now is not None:
                if len(self._profiles) > 10_000:
                    self._profiles.clear()
                self._profiles[address] = (p, self.now() + self.profile_ttl)
            return p

        return self.call(UmProfile, user=address).addCallback(got)

    def delivery_plan(
        self, address: str, count: int, unfenced: bool = False
    ) -> Deferred[tuple[tuple[str, ...], int, str]]:
        """See :meth:`ClusterUserManager.delivery_plan`."""
        d = self.call(UmPlan, user=address, count=count, unfenced=unfenced)
        return d.addCallback(
            lambda r: (tuple(r["nodes"]), int(r["first"]), str(r.get("fence") or ""))
        )

    def note_pending(self, address: str, node: str) -> Deferred[None]:
        """See :meth:`ClusterUserManager.note_pending`."""
        return self.call(UmPending, user=address, node=node).addCallback(lambda _: None)

    def authenticate(self, address: str, password: str) -> Deferred[Profile]:
        """See :class:`IUserManager`."""

        def got(r: dict[str, Any]) -> Profile:
            p = _profile_in(r["profile"])
            if p is None:
                raise BadCredentials("bad user name or password")
            return p

        return self.call(UmAuthenticate, user=address, password=password).addCallback(got)

    def fragments(self, address: str) -> Deferred[tuple[str, ...]]:
        """See :class:`IUserManager` (also remembers :meth:`away_of`)."""

        def got(r: dict[str, Any]) -> tuple[str, ...]:
            if len(self._away) > 10_000:
                self._away.clear()
            self._away[address.lower()] = tuple(r.get("away") or ())
            self._uncertain[address.lower()] = r.get("certain") is False
            if len(self._horizon) > 10_000:
                self._horizon.clear()
            self._horizon[address.lower()] = Horizon.decode(r.get("horizon"))
            return tuple(r["nodes"])

        return self.call(UmFragments, user=address).addCallback(got)

    def away_of(self, address: str) -> tuple[str, ...]:
        """Nodes out of reach holding mail for ``address`` (as of the last fragments())."""
        return self._away.get(address.lower(), ())

    def certain(self, address: str) -> bool:
        """Did the last fragments() come from a manager that knows every holder?"""
        return not self._uncertain.get(address.lower(), False)

    def horizon_of(self, address: str) -> Horizon | None:
        """The visibility horizon the last fragments() came with (None: an older
        manager sent none)."""
        return self._horizon.get(address.lower())

    #: :meth:`add_fragment` takes ``first`` (DeliveryProxy passes the plan's UID).
    confirms_allocations = True

    def add_fragment(self, address: str, node: str, first: int | None = 0) -> Deferred[None]:
        """See :class:`IUserManager`; ``first``: see :meth:`ClusterUserManager.add_fragment`."""
        kw: dict[str, Any] = {"first": first} if first and first > 0 else {}
        d = self.call(UmAddFragment, user=address, node=node, **kw)
        return d.addCallback(lambda _: None)

    def remove_fragment(self, address: str, node: str) -> Deferred[None]:
        """See :class:`IUserManager`."""
        d = self.call(UmRemoveFragment, user=address, node=node)
        return d.addCallback(lambda _: None)

    def reserve_uids(self, address: str, count: int) -> Deferred[int]:
        """See :meth:`ClusterUserManager.reserve_uids`."""
        d = self.call(UmReserveUids, user=address, count=count)
        return d.addCallback(lambda r: int(r["first"]))


@implementer(IMailboxManager)
class RemoteMailboxManager(_Remote):
    """:class:`IMailboxManager` of another node's disk, over AMP."""

    def __init__(
        self, node_id: str, call: Caller, on_load: Callable[[str, float], None] | None = None
    ) -> None:
        super().__init__(node_id, call)
        self.on_load = on_load

    def store(self, messages: Sequence[NewMessage]) -> Deferred[list[Digest]]:
        """See :class:`IMailboxManager` (the reply's load goes to ``on_load``)."""

        def got(r: dict[str, Any]) -> list[Digest]:
            if self.on_load is not None:
                self.on_load(self.node_id, float(r["load"]))
            return [_digest_in(v) for v in r["digests"]]

        return self.call(MbStore, messages=pack_messages(messages)).addCallback(got)

    def mailboxes(self, user: str) -> Deferred[list[MailboxInfo]]:
        """See :class:`IMailboxManager`."""
        return self.call(MbMailboxes, user=user).addCallback(
            lambda r: [_info_in(v) for v in r["infos"]]
        )

    def create_mailbox(self, user: str, name: str) -> Deferred[MailboxInfo]:
        """See :class:`IMailboxManager`."""
        d = self.call(MbCreateMailbox, user=user, mailbox=name)
        return d.addCallback(lambda r: _info_in(r["info"]))

    def delete_mailbox(self, user: str, name: str) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        return self.call(MbDeleteMailbox, user=user, mailbox=name).addCallback(lambda _: None)

    def rename_mailbox(self, user: str, old: str, new: str) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        d = self.call(MbRenameMailbox, user=user, mailbox=old, new=new)
        return d.addCallback(lambda _: None)

    def subscribe(self, user: str, name: str, subscribed: bool) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        d = self.call(MbSubscribe, user=user, mailbox=name, subscribed=subscribed)
        return d.addCallback(lambda _: None)

    def digests(self, user: str, mailbox: str) -> Deferred[list[Digest]]:
        """See :class:`IMailboxManager`."""
        return self.call(MbDigests, user=user, mailbox=mailbox).addCallback(
            lambda r: [_digest_in(v) for v in r["digests"]]
        )

    def view(
        self, user: str, mailbox: str
    ) -> Deferred[tuple[list[MailboxInfo], list[Digest] | None]]:
        """See :meth:`~.fragments.MailboxManager.view` (a node without the command,
        during a rolling upgrade: its two older commands)."""

        def got(r: dict[str, Any]) -> tuple[list[MailboxInfo], list[Digest] | None]:
            infos = [_info_in(v) for v in r["infos"]]
            return infos, [_digest_in(v) for v in r["digests"]] if r["exists"] else None

        def older(f: Failure) -> Deferred[tuple[list[MailboxInfo], list[Digest] | None]]:
            f.trap(amp.UnhandledCommand)

            def missing(g: Failure) -> None:
                g.trap(NoSuchMailbox)
                return None

            both: list[Deferred[Any]] = [
                self.mailboxes(user),
                self.digests(user, mailbox).addErrback(missing),
            ]
            return gatherResults(both, consumeErrors=True).addCallbacks(
                lambda r: (r[0], r[1]), lambda f: f.value.subFailure
            )

        return self.call(MbView, user=user, mailbox=mailbox).addCallbacks(got, older)

    def fetch(self, user: str, mailbox: str, uids: Sequence[int]) -> Deferred[dict[int, bytes]]:
        """See :class:`IMailboxManager`."""
        d = self.call(MbFetch, user=user, mailbox=mailbox, uids=list(uids))
        return d.addCallback(lambda r: unpack_bodies(r["bodies"]))

    def set_flags(
        self, user: str, mailbox: str, uids: Sequence[int], flags: Sequence[str], mode: int
    ) -> Deferred[dict[int, tuple[str, ...]]]:
        """See :class:`IMailboxManager`."""
        d = self.call(
            MbSetFlags, user=user, mailbox=mailbox, uids=list(uids), flags=list(flags), mode=mode
        )
        return d.addCallback(lambda r: {int(u): tuple(f) for u, f in r["flags"]})

    def copy(
        self, user: str, mailbox: str, uids: Sequence[int], dest: str
    ) -> Deferred[list[Digest]]:
        """See :class:`IMailboxManager`."""
        d = self.call(MbCopy, user=user, mailbox=mailbox, uids=list(uids), dest=dest)
        return d.addCallback(lambda r: [_digest_in(v) for v in r["digests"]])

    def delete(self, user: str, mailbox: str, uids: Sequence[int]) -> Deferred[list[int]]:
        """See :class:`IMailboxManager`."""
        d = self.call(MbDelete, user=user, mailbox=mailbox, uids=list(uids))
        return d.addCallback(lambda r: [int(u) for u in r["uids"]])

    def remove_user(self, user: str) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        return self.call(MbRemoveUser, user=user).addCallback(lambda _: None)

    def users_in_bucket(self, bucket: int) -> Deferred[list[str]]:
        """See :class:`IMailboxManager`."""
        d = self.call(MbUsersInBucket, bucket=bucket)
        return d.addCallback(lambda r: [str(u) for u in r["users"]])

    def demote(self, user: str, mailbox: str, uid: int, key: str) -> Deferred[bool]:
        """See :meth:`~.fragments.FragmentStore.demote`."""
        d = self.call(MbDemote, user=user, mailbox=mailbox, uid=uid, key=key)
        return d.addCallback(lambda r: bool(r["done"]))

    def number_pending(
        self, user: str, fence: str, first: int, count: int
    ) -> Deferred[tuple[int, int, int]]:
        """See :meth:`~.fragments.MailboxManager.number_pending`."""
        d = self.call(MbNumber, user=user, fence=fence, first=first, count=count)
        return d.addCallback(lambda r: (int(r["done"]), int(r["left"]), int(r["top"])))


def register_handlers(
    registry: Any,
    users: Callable[[], Any],
    mailboxes: Callable[[], IMailboxManager],
    *,
    load: Callable[[], float] = lambda: 0.0,
    stores: Callable[[Sequence[NewMessage]], Deferred[list[Digest]]] | None = None,
) -> None:
    """Answer the manager commands on ``registry`` with this node's local managers.

    ``users()`` and ``mailboxes()`` are looked up per call (the service may swap
    them); ``stores`` (default: ``mailboxes().store``) lets the caller count load.
    """

    def um(method: str, out: Callable[[Any], dict[str, Any]]) -> Callable[..., Any]:
        def handler(user: str, **kw: Any) -> Deferred[dict[str, Any]]:
            d: Deferred[Any] = getattr(users(), method)(user, **kw)
            return d.addCallback(out)

        return handler

    def none(_: object) -> dict[str, Any]:
        return {}

    registry.register(UmProfile, um("profile", lambda p: {"profile": _profile_out(p)}))
    registry.register(UmAuthenticate, um("authenticate", lambda p: {"profile": _profile_out(p)}))

    def fragments(user: str) -> Deferred[dict[str, Any]]:
        um_ = users()
        away = getattr(um_, "away_of", None)

        certain = getattr(um_, "certain", None)
        horizon = getattr(um_, "horizon_of", None)

        def out(nodes: tuple[str, ...]) -> dict[str, Any]:
            r = {
                "nodes": list(nodes),
                "away": list(away(user)) if away else [],
                "certain": certain(user) if certain else True,
            }
            h = horizon(user) if horizon else None
            if h is not None:
                r["horizon"] = h.encode()
            return r

        d: Deferred[tuple[str, ...]] = um_.fragments(user)
        return d.addCallback(out)

    registry.register(UmFragments, fragments)
    registry.register(UmAddFragment, um("add_fragment", none))
    registry.register(UmRemoveFragment, um("remove_fragment", none))

    def reserve(user: str, count: int) -> Deferred[dict[str, Any]]:
        fn = getattr(users(), "reserve_uids", None)
        d: Deferred[int] = fn(user, count) if fn is not None else succeed(0)
        return d.addCallback(lambda first: {"first": first})

    registry.register(UmReserveUids, reserve)

    def plan(user: str, count: int, unfenced: bool = False) -> Deferred[dict[str, Any]]:
        fn = getattr(users(), "delivery_plan", None)
        if fn is None:
            d = users().fragments(user).addCallback(lambda nodes: (nodes, 0, ""))
        else:
            d = fn(user, count, bool(unfenced))
        return d.addCallback(lambda r: {"nodes": list(r[0]), "first": r[1], "fence": r[2]})

    registry.register(UmPlan, plan)

    def pending(user: str, node: str) -> Deferred[dict[str, Any]]:
        fn = getattr(users(), "note_pending", None)
        d: Deferred[Any] = fn(user, node) if fn is not None else succeed(None)
        return d.addCallback(none)

    registry.register(UmPending, pending)

    def number(user: str, fence: str, first: int, count: int) -> Deferred[dict[str, Any]]:
        d: Deferred[tuple[int, int, int]] = mailboxes().number_pending(  # type: ignore[attr-defined]
            user, fence, first, count
        )
        return d.addCallback(lambda r: {"done": r[0], "left": r[1], "top": r[2]})

    registry.register(MbNumber, number)

    def demote(user: str, mailbox: str, uid: int, key: str) -> Deferred[dict[str, Any]]:
        d: Deferred[bool] = mailboxes().demote(user, mailbox, uid, key)  # type: ignore[attr-defined]
        return d.addCallback(lambda ok: {"done": ok})

    registry.register(MbDemote, demote)

    def store(messages: bytes) -> Deferred[dict[str, Any]]:
        batch = unpack_messages(messages)
        d = stores(batch) if stores is not None else mailboxes().store(batch)
        return d.addCallback(lambda ds: {"digests": [_digest_out(x) for x in ds], "load": load()})

    registry.register(MbStore, store)

    def mb(method: str, out: Callable[[Any], dict[str, Any]], **rename: str) -> Callable[..., Any]:
        def handler(**kw: Any) -> Deferred[dict[str, Any]]:
            for wire, arg in rename.items():
                kw[arg] = kw.pop(wire)
            d: Deferred[Any] = getattr(mailboxes(), method)(**kw)
            return d.addCallback(out)

        return handler

    registry.register(
        MbMailboxes, mb("mailboxes", lambda xs: {"infos": [_info_out(i) for i in xs]})
    )
    registry.register(
        MbCreateMailbox,
        mb("create_mailbox", lambda i: {"info": _info_out(i)}, mailbox="name"),
    )
    registry.register(MbDeleteMailbox, mb("delete_mailbox", none, mailbox="name"))
    registry.register(MbRenameMailbox, mb("rename_mailbox", none, mailbox="old"))
    registry.register(MbSubscribe, mb("subscribe", none, mailbox="name"))
    registry.register(
        MbDigests, mb("digests", lambda xs: {"digests": [_digest_out(x) for x in xs]})
    )
    registry.register(MbFetch, mb("fetch", lambda b: {"bodies": pack_bodies(b)}))

    def view(r: tuple[list[MailboxInfo], list[Digest] | None]) -> dict[str, Any]:
        return {
            "infos": [_info_out(i) for i in r[0]],
            "digests": [_digest_out(x) for x in r[1] or ()],
            "exists": r[1] is not None,
        }

    registry.register(MbView, mb("view", view))
    registry.register(
        MbSetFlags, mb("set_flags", lambda f: {"flags": [[u, list(v)] for u, v in f.items()]})
    )
    registry.register(MbCopy, mb("copy", lambda xs: {"digests": [_digest_out(x) for x in xs]}))
    registry.register(MbDelete, mb("delete", lambda us: {"uids": list(us)}))
    registry.register(MbRemoveUser, mb("remove_user", none))
    registry.register(MbUsersInBucket, mb("users_in_bucket", lambda us: {"users": list(us)}))


# --- the cluster user manager ----------------------------------------------------
# The decisions live in the sans-IO core (reconstruct.py); this is its Twisted shell.

#: Peers each node swaps load figures with per ``load_interval`` (random ones), so
#: the exchange costs the same per node whatever the cluster's size.
LOAD_FANOUT = 3

#: One bucket's reconstruction hint as it travels (:meth:`BucketHint.encode`):
#: ``[bucket, epoch, [[user, has_mail, uidnext, unnumbered]...], [Record...], mark,
#: [[user, node]...]]``.
HintEntry = list[Any]


class ClusterUserManager(UserManager):
    """The user manager of this node's buckets: the Twisted shell of a
    :class:`~yimaporc.porcupine.reconstruct.Reconstruction` core.

    The core holds the fragment lists, the per-user UID counters (rebuilt from
    hints after every map change), settling, fences, marks and the unnumbered
    mail to number; this class runs its timers on ``clock``, turns its
    :class:`~yimaporc.porcupine.reconstruct.NeedMark` and
    :class:`~yimaporc.porcupine.reconstruct.Number` into calls (``mark_on``,
    ``holders_on``, ``number_on``, set by :class:`MailCluster`) and answers the
    :class:`IUserManager` methods with Deferreds that wait while a bucket settles.
    """

    log = Logger()

    def __init__(
        self,
        node_id: str,
        profiles: ProfileDB,
        clock: Any,
        *,
        settle_timeout: float = 2.0,
    ) -> None:
        super().__init__(node_id, profiles)
        self.clock = clock
        self.core = Reconstruction(node_id, N_BUCKETS, settle_timeout=settle_timeout)
        self.core.allocation_ttl = NODE_ALLOCATION_TTL
        self.core.read_lease_s = NODE_READ_LEASE
        self.core.answer_ttl = NODE_ANSWER_TTL
        self.core.read_leases = False  # MailCluster.startService turns it on
        #: This node's synced cluster time, None while not synced (MailCluster).
        self.cluster_now: Callable[[], float | None] = lambda: None
        self.state = self.core.state
        self._timer: IDelayedCall | None = None
        self._waiters: dict[int, list[Deferred[None]]] = {}
        self._extending: dict[int, list[Deferred[None]]] = {}
        self.mark_timeout = MARK_TIMEOUT
        #: ``number_on(node, user, fence, first, count) -> Deferred[(done, left, top)]``.
        self.number_on: Callable[..., Deferred[tuple[int, int, int]]] | None = None
        #: ``mark_on(node, bucket, fence, mark, seen) -> Deferred[bool]`` (MailCluster;
        #: the callee's mark before the call goes into ``seen[0]``, max).
        self.mark_on: Callable[..., Deferred[bool]] | None = None
        #: ``holders_on(node, bucket, fence, [[user, node]...]) -> Deferred[bool]``.
        self.holders_on: Callable[..., Deferred[bool]] | None = None
        #: holder records being written: their waiters (a second delivery waits too)
        self._recording: dict[tuple[str, str, str], list[Deferred[bool]]] = {}
        #: This node's lease (MailCluster's pause detector); True without one.
        self.lease_ok: Callable[[], bool] = lambda: True
        #: Sends the core asked for, when no ``perform_sends`` is set (MailCluster
        #: sets it, to carry them out over AMP).
        self.outbox: list[Action] = []
        self.perform_sends: Callable[[list[Action]], None] | None = None

    # The core's state, under the names the status page and tests use.
    settling = property(lambda self: self.core.settling)
    missing = property(lambda self: self.core.missing)
    pending = property(lambda self: self.core.pending)
    uidnext = property(lambda self: self.core.uidnext)
    floor = property(lambda self: self.core.floor)
    granted = property(lambda self: self.core.granted)
    members = property(lambda self: self.core.members)
    view_epoch = property(lambda self: self.core.view_epoch)
    to_pull = property(lambda self: self.core.to_pull)
    hints_received = property(lambda self: self.core.hints_received)
    numbered = property(lambda self: self.core.numbered)
    pending_plans = property(lambda self: self.core.pending_plans)

    @property
    def known(self) -> set[str]:
        """Every node ever seen in a view (persisted by MailCluster)."""
        return self.core.known

    @known.setter
    def known(self, value: set[str]) -> None:
        self.core.known = value

    @property
    def number_retry(self) -> float:
        """Seconds before numbering is tried again after it could not proceed."""
        return self.core.number_retry

    @number_retry.setter
    def number_retry(self, value: float) -> None:
        self.core.number_retry = value

    def _now(self) -> float:
        return float(self.clock.seconds())

    def _perform(self, actions: list[Action]) -> None:
        """Wake what the core released and keep one timer at its next deadline."""
        for a in actions:
            if isinstance(a, Settled):
                for d in self._waiters.pop(a.bucket, []):
                    d.callback(None)
            elif isinstance(a, Number):
                self._number(a)
            elif self.perform_sends is not None:
                self.perform_sends([a])
            else:
                self.outbox.append(a)
        self._rearm()

    def _rearm(self) -> None:
        due = self.core.next_deadline()
        if self._timer is not None and self._timer.active():
            if due is not None and self._timer.getTime() == max(due, self._now()):
                return
            self._timer.cancel()
        self._timer = None
        if due is not None:
            self._timer = self.clock.callLater(max(0.0, due - self._now()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        before = {b: set(m) for b, m in self.core.settling.items()}
        actions = self.core.tick(
            self._now(), lease=self.lease_ok(), number=self.number_on is not None
        )
        for a in actions:
            if isinstance(a, Settled) and before.get(a.bucket):
                self.log.info(
                    "user map: bucket {b} settled without hints from {m}",
                    b=a.bucket,
                    m=sorted(before[a.bucket]),
                )
        self._perform(actions)

    def install(
        self, new_map: BucketMap, live: Iterable[str], *, view: int = 0, away: bool = False
    ) -> set[int]:
        """Adopt ``new_map`` (committed in view epoch ``view``); the buckets that became
        ours and fresh start settling; returns the fresh buckets.  What to send
        lands in :attr:`outbox` (see :meth:`Reconstruction.install`)."""
        fresh = new_map.fresh(self.core.state.map)
        self._perform(self.core.install(new_map, live, view=view, away=away, now=self._now()))
        return fresh

    def take_outbox(self) -> list[Action]:
        """The sends queued by the last installs (emptied)."""
        out, self.outbox = self.outbox, []
        return out

    def apply(self, sender: str, entry: HintEntry, view: int | None = None) -> bool:
        """Merge one bucket's hint (its JSON form) from ``sender``, sent in view ``view``
        (see :meth:`Reconstruction.receive`); False if malformed or not counted."""
        try:
            hint = BucketHint.decode(entry, N_BUCKETS)
        except MalformedHint:
            return False
        return self.receive(sender, hint, view)

    def receive(self, sender: str, hint: BucketHint, view: int | None = None) -> bool:
        """Merge one typed hint; True if it counted."""
        before = self.core.hints_received
        self._perform(self.core.receive(sender, hint, view, now=self._now()))
        return self.core.hints_received > before

    confirms_allocations = True

    def add_fragment(self, address: str, node: str, first: int | None = 0) -> Deferred[None]:
        """See :class:`IUserManager`. A note for a user we do not manage comes from a
        proxy whose map is newer (or older) than ours: it is also kept until our next
        map install, then applied again if the user is ours, so a note that arrives
        just before we install the map that gives us the bucket (and resets it) is
        not lost.  ``first`` (> 0): the delivery allocated at ``first`` is stored on
        ``node`` (numbered there, now in the fragment list, or unnumbered: it will
        never land under that UID), so it leaves the visibility horizon."""
        address = address.lower()
        added = self.core.add_fragment(address, node)
        if first and first > 0:  # (AMP passes a missing optional argument as None)
            self.core.confirm(address, first)
        if added:
            # A node holds this user's mail for the first time: a majority records
            # it before the delivery's 250, so a later manager knows it even while
            # the node is out of reach (reads then say so, they do not shrink).
            recorded = self._record_holder(address, node)
            return recorded.addCallback(self._holder_recorded, address, node)
        return succeed(None)

    def _holder_recorded(self, ok: bool, address: str, node: str) -> None:
        """Fail :meth:`add_fragment` (the delivery answers 451, not 250) when no
        majority recorded the holder: the reconstruction would not find it."""
        if not ok:
            raise HolderNotRecorded(f"no majority recorded {node} as holder of {address}")

    def settled(self, address: str) -> Deferred[None]:
        """Fires once ``address``'s bucket is not settling (at once if it is not)."""
        b = bucket_of(address)
        if b not in self.core.settling:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.setdefault(b, []).append(d)
        return d

    def fragments(self, address: str) -> Deferred[tuple[str, ...]]:
        """See :class:`IUserManager` (waits while the bucket settles)."""
        return self.settled(address).addCallback(lambda _: super(ClusterUserManager, self)
                                                 .fragments(address))  # fmt: skip

    def away_of(self, address: str) -> tuple[str, ...]:
        """Nodes that held ``address``'s mail when they left the view."""
        return tuple(sorted(self.state.away_list(address.lower())))

    def certain(self, address: str) -> bool:
        """Do we know every node holding ``address``'s mail?  Only with a majority
        (the holder records are on one), every member's hint in, and our read lease
        holding; a manager in a minority partition cannot tell what the other side
        holds, also before its failure detection noticed."""
        return self.core.certain(address.lower(), float(self.clock.seconds()))

    def horizon_of(self, address: str) -> Horizon:
        """What a reader may show of ``address``'s mail with the fragment list of this
        moment (:meth:`Reconstruction.horizon`, issue 14 bug 3)."""
        return self.core.horizon(address.lower(), self._now())

    def quorum(self) -> bool:
        """Our view holds a majority of every node ever seen (:attr:`known`)."""
        return self.core.quorum()

    def may_number(self, address: str) -> bool:
        """May we hand out UIDs for ``address`` now?  (:meth:`Reconstruction.may_number`)."""
        return self.core.may_number(address, self.lease_ok())

    def fence(self, address: str) -> str:
        """The fence our allocations for ``address`` carry."""
        return self.core.fence(bucket_of(address))

    def _take(
        self,
        address: str,
        count: int,
        unfenced: bool = False,
        again: bool = True,
        numbering: bool = False,
        track: bool = True,
        ttl: float | None = None,
    ) -> Deferred[tuple[int, str]]:
        """``count`` UIDs for ``address`` below the bucket's granted mark (extended
        first, by a majority, when they would not fit), or PENDING.  ``track``: the
        allocation holds the visibility horizon back until found or expired."""
        got = self.core.take(
            address,
            count,
            lease=self.lease_ok(),
            unfenced=unfenced,
            again=again,
            numbering=numbering,
            now=self._now(),
            track=track,
            ttl=ttl,
        )
        if isinstance(got, Taken):
            return succeed((got.first, got.fence))
        if not isinstance(got, NeedMark):
            return succeed((PENDING, ""))
        d = self._extend(got)
        return d.addCallback(
            lambda _: self._take(
                address, count, unfenced, again=False, numbering=numbering, track=track, ttl=ttl
            )
        )

    def _extend(self, need: NeedMark) -> Deferred[None]:
        """Raise a bucket's mark on a majority of the known cluster (each member
        records it durably, if our fence is its current one); fires (never fails)
        once that is done or has failed."""
        if not self.core.mark_write(need):
            out: Deferred[None] = Deferred()
            self._extending.setdefault(need.bucket, []).append(out)
            return out
        waiters: list[Deferred[None]] = []
        self._extending[need.bucket] = waiters
        mark_on = self.mark_on
        seen = [1]  # the marks the asked nodes had (their answers carry them)

        def done(granted: bool) -> None:
            if not granted:
                self.log.info(
                    "bucket {b}: no majority for UID mark {m}", b=need.bucket, m=need.target
                )
            self.core.mark_done(need, granted, seen[0])
            self._extending.pop(need.bucket, None)
            for d in waiters:
                d.callback(None)

        if mark_on is None:  # no cluster wiring (a bare manager in tests)
            done(True)
            return succeed(None)

        def write(node: str) -> Deferred[bool]:
            assert mark_on is not None
            return mark_on(node, need.bucket, need.fence, need.target, seen)

        return self._on_majority(write).addCallback(done)

    def _record_holder(self, address: str, node: str) -> Deferred[bool]:
        """Have a majority record that ``node`` holds mail for ``address`` (so a later
        manager knows it even while ``node`` is out of reach); never fails: True once
        recorded (or not ours to record: the core says when), False when no majority
        recorded it.  A second caller while the write runs waits for its outcome."""
        holders_on = self.holders_on
        if holders_on is None:
            return succeed(True)
        key = (address, node, self.core.fence(self.core.bucket(address)))
        running = self._recording.get(key)
        if running is not None:
            waiter: Deferred[bool] = Deferred()
            running.append(waiter)
            return waiter
        todo = self.core.record_holder(address, node, self.lease_ok())
        if todo is None:  # recorded in this tenure, or we may not number
            return succeed(True)
        b, fence = todo
        key = (address, node, fence)
        waiters: list[Deferred[bool]] = []
        self._recording[key] = waiters

        def write(n: str) -> Deferred[bool]:
            assert holders_on is not None
            return holders_on(n, b, fence, [[address, node]])

        def recorded(ok: bool) -> bool:
            self._recording.pop(key, None)
            self.core.holder_recorded(address, node, fence, ok)  # a failed one: again later
            for w in waiters:
                w.callback(ok)
            return ok

        return self._on_majority(write).addCallback(recorded)

    def _on_majority(self, write: Callable[[str], Deferred[bool]]) -> Deferred[bool]:
        """``write(node)`` on the nodes a :class:`MajorityWrite` names; fires True once
        a majority succeeded, False when that can no longer happen or after
        ``mark_timeout``."""
        vote = MajorityWrite(self.node_id, self.core.members, self.core.known)
        first: Deferred[bool] = Deferred()

        def finish() -> None:
            if vote.result is not None and not first.called:
                first.callback(vote.result)

        def answer(ok: bool) -> None:
            nxt = vote.answer(ok)
            if nxt is not None:
                ask(nxt)
            finish()

        def ask(node: str) -> None:
            write(node).addCallbacks(answer, lambda f: answer(False))

        def expire() -> None:
            if not first.called:
                first.callback(False)

        def hedge() -> None:
            for node in vote.hedge():
                ask(node)

        timer = self.clock.callLater(self.mark_timeout, expire)
        hedger = self.clock.callLater(min(HEDGE_DELAY, self.mark_timeout), hedge)

        def cancel(result: bool) -> bool:
            for t in (timer, hedger):
                if t.active():
                    t.cancel()
            return result

        first.addCallback(cancel)
        for node in vote.first:
            ask(node)
        finish()
        return first

    def reserve_uids(self, address: str, count: int) -> Deferred[int]:
        """The first of ``count`` fresh UIDs for ``address``, or PENDING when we may
        not number (waits while the bucket settles); unfenced (APPEND, COPY)."""
        address = address.lower()
        # APPEND/COPY: not tracked in the horizon (their store is to a mailbox a
        # reader of another one never finds: it would hold that one back).
        d = self.settled(address).addCallback(lambda _: self._take(address, count, track=False))
        return d.addCallback(lambda r: r[0])

    def reserve_fenced(self, address: str, count: int) -> Deferred[tuple[int, str]]:
        """:meth:`reserve_uids` with the fence the stores must carry."""
        address = address.lower()
        return self.settled(address).addCallback(lambda _: self._take(address, count, track=False))

    def delivery_plan(
        self, address: str, count: int, unfenced: bool = False
    ) -> Deferred[tuple[tuple[str, ...], int, str]]:
        """The fragment list, the first of ``count`` reserved UIDs (PENDING when we may
        not number) and their fence (waits while the bucket settles).  ``unfenced``
        (a replicated store, whose copies must share one UID): a UID from the
        counter even without a majority, no fence (docs/mail.md: known limits)."""
        address = address.lower()
        # With a synced cluster clock the allocation carries its time: stores check
        # its age, so it leaves the horizon after NODE_TIMED_ALLOCATION_TTL.
        timed = not unfenced and self.cluster_now() is not None
        ttl = NODE_TIMED_ALLOCATION_TTL if timed else None

        def plan(taken: tuple[int, str]) -> tuple[tuple[str, ...], int, str]:
            first, fence = taken
            at = self.cluster_now() if timed and fence else None  # the take's own turn
            if at is not None:
                fence = timed_fence(fence, at)
            return tuple(sorted(self.state.fragment_list(address))), first, fence

        d = self.settled(address).addCallback(
            lambda _: self._take(address, count, unfenced, ttl=ttl)
        )
        return d.addCallback(plan)

    # --- numbering what was stored unnumbered --------------------------------

    def note_pending(self, address: str, node: str) -> Deferred[None]:
        """A message for ``address`` was stored unnumbered on ``node``."""
        self.core.note_pending(address.lower(), node, self._now())
        self._rearm()
        return succeed(None)

    def _number(self, job: Number) -> None:
        """Record ``job.node`` as a holder on a majority (if not yet in this tenure),
        take UIDs, have the node number its oldest unnumbered mail with them."""
        user, node = job.user, job.node

        block: list[int] = []

        def done(r: tuple[int, int, int]) -> None:
            numbered, left, top = r
            first = block[0] if block else None
            if self.core.number_done(user, node, numbered, left, top, self._now(), first=first):
                self._record_holder(user, node)
            self._rearm()

        def failed(f: Failure) -> None:
            self.log.warn(
                "numbering {u}'s mail on {n} failed: {e}", u=user, n=node, e=f.getErrorMessage()
            )
            self.core.number_failed(user, node, self._now())
            self._rearm()

        def go(taken: tuple[int, str]) -> Deferred[Any] | None:
            first, fence = taken
            if first == PENDING:  # lost the right meanwhile (or no majority for a mark)
                self.core.number_cancelled(user, node, self._now())
                self._rearm()
                return None
            assert self.number_on is not None
            block.append(first)
            return self.number_on(node, user, fence, first, job.count).addCallbacks(done, failed)

        def recorded(_: object) -> Deferred[Any] | None:
            if self.holders_on is not None and not self.core.holder_ok(user, node):
                # No majority knows this node holds the user's mail: a manager after a
                # partition could show higher UIDs without waiting for it. Later.
                self.core.number_cancelled(user, node, self._now())
                self._rearm()
                return None
            return self._take(user, job.count, numbering=True).addCallback(go)

        self._record_holder(user, node).addCallback(recorded)

    def status(self) -> dict[str, Any]:
        """Counts for the status page."""
        return {
            "managed_buckets": len(self.state.map.buckets_of(self.node_id)),
            "settling_buckets": len(self.core.settling),
            "users_with_mail": len(self.state.fragments),
            "hints_received": self.core.hints_received,
            "early_hints": len(self.core.early),
            "quorum": self.quorum(),
            "known_nodes": len(self.core.known | {self.node_id}),
            "unnumbered": sum(sum(v.values()) for v in self.core.pending.values()),
            "numbered": self.core.numbered,
            "pending_plans": self.core.pending_plans,
        }


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


# --- load balancing --------------------------------------------------------------


# --- the wiring -------------------------------------------------------------------


@implementer(IMailboxManager)
class _CountingMailboxes:
    """This node's mailbox manager, counting stores in progress (the load figure)."""

    def __init__(self, inner: IMailboxManager, owner: MailCluster) -> None:
        self.inner = inner
        self.owner = owner
        self.node_id = inner.node_id

    def store(self, messages: Sequence[NewMessage]) -> Deferred[list[Digest]]:
        """Store, counting it in :attr:`MailCluster.inflight`."""
        return self.owner.store_here(messages)

    # Retrievals, deletions and flag changes are disk work too (seed §5's load):
    # counted like stores while they run.

    def fetch(self, user: str, mailbox: str, uids: Sequence[int]) -> Deferred[dict[int, bytes]]:
        """Read bodies, counted in the load."""
        return self.owner.track(lambda: self.inner.fetch(user, mailbox, uids))

    def set_flags(
        self, user: str, mailbox: str, uids: Sequence[int], flags: Sequence[str], mode: int
    ) -> Deferred[dict[int, tuple[str, ...]]]:
        """Change flags, counted in the load."""
        return self.owner.track(lambda: self.inner.set_flags(user, mailbox, uids, flags, mode))

    def delete(self, user: str, mailbox: str, uids: Sequence[int]) -> Deferred[list[int]]:
        """Delete messages, counted in the load."""
        return self.owner.track(lambda: self.inner.delete(user, mailbox, uids))

    def copy(
        self, user: str, mailbox: str, uids: Sequence[int], dest: str
    ) -> Deferred[list[Digest]]:
        """Copy messages, counted in the load."""
        return self.owner.track(lambda: self.inner.copy(user, mailbox, uids, dest))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class MailCluster(Service):
    """Makes a node's ``MailService`` one part of the cluster's mail service."""

    log = Logger()

    def __init__(
        self,
        mail: Any,
        node: Any,
        buckets: Any,
        *,
        balancer: Any = None,
        load_interval: float = 2.0,
        poll_interval: float = 5.0,
        settle_timeout: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        self.mail = mail
        self.node = node
        self.buckets = buckets
        self.reactor = mail.reactor
        self.me: str = node.node_id
        self.load_interval = load_interval
        self.rng = rng or random.Random()
        self.calls: Counter[str] = Counter()
        self.inflight = 0
        #: More disk work waiting here, counted in the load (replication's queue).
        self.pending_work: list[Callable[[], int]] = []
        self._stores = 0
        self._rate = 0.0
        self._rate_since = float(self.reactor.seconds())
        self.balancer = balancer if balancer is not None else LoadBalancer(self.me)
        self.user_manager = ClusterUserManager(
            self.me, mail.profiles, self.reactor, settle_timeout=settle_timeout
        )
        mail.user_manager = self.user_manager
        self.user_manager.number_on = self._number_on
        self.user_manager.perform_sends = self.perform
        self.user_manager.mark_on = self._mark_on
        self.user_manager.holders_on = self._holders_on
        node.registry.register(UidHolders, self._on_holders)
        node.registry.register(UidMark, self._on_mark)
        node.registry.register(ReadLease, self._on_read_lease)
        self.read_renewals = 0
        self.lease = LEASE
        self.pause_grace = PAUSE_GRACE
        self._lease_until = float("inf")  # no detector before startService
        self._last_tick: float | None = None
        self._paused_at: float | None = None
        self.pauses = 0
        self._lease_loop: LoopingCall | None = None
        self._sweep_loop: LoopingCall | None = None
        self.user_manager.lease_ok = self.lease_ok
        mail.fragment_store.fence_ok = self.lease_ok
        self.user_manager.cluster_now = self.cluster_now
        mail.fragment_store.cluster_now = self.cluster_now
        self._known_path = Path(mail.data_dir) / "mail" / "known-nodes"
        self.user_manager.known |= self._read_known()
        self.user_manager.core.booted(float(self.reactor.seconds()))
        self._alone = self.user_manager.known <= {self.me}
        self.replicator = ProfileReplicator(mail.profiles, self._forget, self._push_profiles)
        self._local_mailboxes = _CountingMailboxes(mail.mailbox_manager, self)
        self._remote_users: dict[str, RemoteUserManager] = {}
        self._remote_boxes: dict[str, RemoteMailboxManager] = {}
        self._loop: LoopingCall | None = None
        self._poll: LoopingCall | None = None
        self.poll_interval = poll_interval
        self.hint_rounds: list[dict[str, Any]] = []
        register_handlers(
            node.registry,
            lambda: self.user_manager,
            lambda: self._local_mailboxes,
            load=self.load,
            stores=self.store_here,
        )
        node.registry.register(Hints, self._on_hints)
        node.registry.register(HintsRequest, self._on_hints_request)
        node.registry.register(ProfilePut, self._on_profiles)
        node.registry.register(LoadExchange, self._on_load)
        buckets.subscribe(self._map_changed)
        mail.attach_cluster(self)

    # --- routing --------------------------------------------------------------

    def live(self) -> list[str]:
        """Node ids of the current view (this node if the view is empty)."""
        ids = list(self.node.view.node_ids)
        return ids if ids else [self.me]

    def _address_of(self, node_id: str) -> str | None:
        m = self.node.view.member(node_id)
        return None if m is None else str(m.address)

    def call(self, node_id: str, command: type[amp.Command], /, **kw: Any) -> Deferred[Any]:
        """Run ``command`` on ``node_id`` (counted in :attr:`calls`)."""
        address = self._address_of(node_id)
        if address is None:
            return fail(PeerUnavailable(f"{node_id} is not a member"))
        name = command.commandName
        self.calls[name.decode() if isinstance(name, bytes) else str(name)] += 1
        return self.node.rpc.call(address, command, **kw)

    def users_for(self, address: str) -> IUserManager:
        """The user manager of ``address``'s bucket: ours, or an AMP proxy to its owner."""
        owner = self.buckets.owner(bucket_of(address))
        if not owner or owner == self.me:
            return self.user_manager
        proxy = self._remote_users.get(owner)
        if proxy is None:
            proxy = self._remote_users[owner] = RemoteUserManager(
                owner, self.call, self.reactor.seconds
            )
        return proxy

    def mailboxes_for(self, node_id: str) -> IMailboxManager:
        """The mailbox manager of ``node_id``: ours, or an AMP proxy (the replication seam)."""
        if node_id == self.me:
            return self._local_mailboxes
        proxy = self._remote_boxes.get(node_id)
        if proxy is None:
            proxy = self._remote_boxes[node_id] = RemoteMailboxManager(
                node_id, self.call, self._observe
            )
        return proxy

    def home_of(self, address: str) -> str:
        """The node holding ``address``'s mailbox tree: the first live node by
        rendezvous hash of (address, node) (moves only when membership changes)."""
        live = self.live()
        return max(live, key=lambda n: _raw_bucket_of(f"{address.lower()}|{n}", 1 << 31))

    def _forget(self, address: str) -> None:
        """A profile changed: drop every cached copy here."""
        self.user_manager.forget(address)
        for proxy in self._remote_users.values():
            proxy.forget(address)

    # --- load -------------------------------------------------------------------

    def load(self) -> float:
        """This node's load figure: disk work in progress here (stores, fetches,
        deletions, flag changes, and replicated updates waiting to be written), plus
        a little of the recent rate (:func:`~yimaporc.porcupine.balancer.load_figure`)."""
        extra = sum(f() for f in self.pending_work)
        return load_figure(self.inflight + extra, self._rate)

    def store_here(self, messages: Sequence[NewMessage]) -> Deferred[list[Digest]]:
        """Store on this node's disk, counting it in the load figure."""
        return self.track(lambda: self.mail.mailbox_manager.store(messages))

    def track(self, work: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        """Run ``work`` (disk work on this node), counted in the load while it runs."""
        self.inflight += 1
        self._stores += 1

        def done(result: Any) -> Any:
            self.inflight -= 1
            return result

        try:
            d = work()
        except BaseException:
            self.inflight -= 1
            raise
        return d.addBoth(done)

    def _observe(self, node: str, load: float) -> None:
        self.balancer.observe(node, load, float(self.reactor.seconds()))

    def _on_load(self, node: str, load: float) -> dict[str, Any]:
        self._observe(node, load)
        return {"load": self.load()}

    def _exchange_load(self) -> None:
        now = float(self.reactor.seconds())
        if now > self._rate_since:
            self._rate = self._stores / (now - self._rate_since)
        self._stores, self._rate_since = 0, now
        peers = [n for n in self.live() if n != self.me]
        for n in self.rng.sample(peers, min(LOAD_FANOUT, len(peers))):
            d = self.call(n, LoadExchange, node=self.me, load=self.load())
            d.addCallbacks(
                lambda r, n=n: self._observe(n, float(r["load"])),
                lambda f, n=n: self.balancer.failed(n, float(self.reactor.seconds())),
            )

    # --- profiles ------------------------------------------------------------------

    def _push_profiles(self, records: list[Record]) -> Deferred[Any]:
        peers = [n for n in self.live() if n != self.me]
        ds = [self.call(n, ProfilePut, records=[list(r) for r in records]) for n in peers]

        def lost(f: Failure, n: str) -> None:
            self.log.warn("profile push to {n} failed: {e}", n=n, e=f.getErrorMessage())

        for n, d in zip(peers, ds, strict=True):
            d.addErrback(lost, n)
        return DeferredList(ds, consumeErrors=True)

    def _on_profiles(self, records: list[Any]) -> Deferred[dict[str, Any]]:
        if not isinstance(records, list):
            raise amp.MalformedAmpBox("records must be a list")
        # Each record is checked (and a malformed one dropped) by ProfileDB.merge.
        return self.replicator.receive(records).addCallback(lambda _: {})

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
        core = getattr(self.node, "core", None)
        sync = getattr(core, "clock_sync", None)
        if sync is None or not sync.synced:
            return None
        return float(self.node.cluster_time())

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
            return
        if self._paused_at is not None and now < self._paused_at + self.pause_grace:
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

        um._on_majority(ask).addCallback(done)

    def _grant_read(self, epoch: int, members: list[str]) -> bool:
        view = (int(epoch), tuple(sorted(str(m) for m in members)))
        return self.user_manager.core.grant_read(view, float(self.reactor.seconds()))

    def _on_read_lease(self, epoch: int, members: list[str]) -> dict[str, Any]:
        return {"ok": self._grant_read(epoch, members)}

    # --- numbering --------------------------------------------------------------------

    def remind_pending(self) -> int:
        """Tell the current manager of every user with unnumbered mail here (a note
        from the delivery may have gone to a manager that was replaced); how many."""
        users = sorted(self.mail.fragment_store.pending_users)
        for user in users:
            manager: Any = self.users_for(user)
            note = getattr(manager, "note_pending", None)
            if note is not None:
                note(user, self.me).addErrback(lambda f: None)  # next sweep tries again
        return len(users)

    def _number_on(
        self, node: str, user: str, fence: str, first: int, count: int
    ) -> Deferred[tuple[int, int, int]]:
        boxes: Any = self.mailboxes_for(node)
        d: Deferred[tuple[int, int, int]] = boxes.number_pending(user, fence, first, count)
        return d

    def _mark_on(
        self, node: str, bucket: int, fence: str, mark: int, seen: list[int] | None = None
    ) -> Deferred[bool]:
        """Ask ``node`` to record ``mark``; the mark it had goes into ``seen[0]`` (max)."""

        def got(r: dict[str, Any]) -> bool:
            if seen is not None and r.get("seen") is not None:
                seen[0] = max(seen[0], int(r["seen"]))
            return bool(r["ok"])

        if node == self.me:
            return self._on_mark(bucket, fence, mark).addCallback(got)
        d = self.call(node, UidMark, bucket=bucket, fence=fence, mark=mark)
        return d.addCallback(got)

    def _holders_on(
        self, node: str, bucket: int, fence: str, holders: list[list[str]]
    ) -> Deferred[bool]:
        if node == self.me:
            return self._record_holders(bucket, fence, holders)
        d = self.call(node, UidHolders, bucket=bucket, fence=fence, holders=holders)
        return d.addCallback(lambda r: bool(r["ok"]))

    def _record_holders(self, bucket: int, fence: str, holders: Any) -> Deferred[bool]:
        pairs = [(str(h[0]), str(h[1])) for h in holders if isinstance(h, list) and len(h) == 2]
        store = self.mail.fragment_store
        d: Deferred[bool] = self.mail._run_blocking(store.record_holders, bucket, fence, pairs)
        return d

    def _on_holders(self, bucket: int, fence: str, holders: Any) -> Deferred[dict[str, Any]]:
        if not 0 <= bucket < N_BUCKETS or not isinstance(holders, list):
            raise amp.MalformedAmpBox("bad holders")
        return self._record_holders(bucket, fence, holders).addCallback(lambda ok: {"ok": ok})

    def _raise_mark(self, bucket: int, fence: str, mark: int) -> Deferred[tuple[bool, int]]:
        store = self.mail.fragment_store

        def raise_() -> tuple[bool, int]:
            before = store.bucket_mark(bucket)
            return store.raise_mark(bucket, fence, mark), before

        d: Deferred[tuple[bool, int]] = self.mail._run_blocking(raise_)
        return d

    def _on_mark(self, bucket: int, fence: str, mark: int) -> Deferred[dict[str, Any]]:
        if not 0 <= bucket < N_BUCKETS:
            raise amp.MalformedAmpBox("bucket number out of range")
        if not self.user_manager.core.may_record_mark(bucket, float(self.reactor.seconds())):
            # a read lease we confirmed for another view may still run (a reader of
            # the bucket's old manager may still list): no UIDs for its new one yet
            return succeed({"ok": False})
        d = self._raise_mark(bucket, fence, mark)
        return d.addCallback(lambda r: {"ok": r[0], "seen": r[1]})

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

        d = self.mail._run_blocking(write)
        d.addErrback(lambda f: self.log.failure("persisting the known nodes failed", f))

    # --- reconstruction ------------------------------------------------------------

    def _map_changed(self, old: BucketMap, new: BucketMap, fresh: set[int]) -> None:
        live = set(self.live())
        view = int(self.node.view.epoch)
        self._remember(live)
        if self._paused_at is not None:  # the view we were waiting for after a pause
            self._paused_at = None
            if self._last_tick is not None:
                self._lease_until = float(self.reactor.seconds()) + self.lease
        # Before any hint read (they run later, on the pool): a store fenced by a
        # manager this map no longer names now goes PENDING (fragments.py).
        self.mail.fragment_store.set_fences({b: fence_of(new, b) for b in range(len(new))})
        # Away (see BucketMapService.away): booted, or our previous view is not the
        # one the coordinator committed from. A bucket source without that notion
        # (tests) only reports the boot.
        um = self.user_manager
        away = um.core.prev_live is None or bool(getattr(self.buckets, "away", False))
        um.install(new, live, view=view, away=away)
        self.perform(um.take_outbox())

    def perform(self, actions: list[Action]) -> None:
        """Carry out the reconstruction core's sends over AMP."""
        for a in actions:
            if isinstance(a, SendHints):
                self.send_hints(a.bmap, set(a.buckets), a.view)
            elif isinstance(a, PullHints):
                self.pull_hints(a.peer, list(a.buckets), a.view)
            elif isinstance(a, PushProfiles):
                self.push_all_profiles(list(a.nodes))

    def push_all_profiles(self, nodes: list[str]) -> Deferred[None]:
        """Anti-entropy for nodes that (re)appeared: every profile record we hold.

        Only the lowest-id node of each side of a join sends, so a join costs one
        copy of the profile table per side, not one per node."""

        def send(by_bucket: dict[int, list[Record]]) -> Deferred[Any]:
            records = [list(r) for rs in by_bucket.values() for r in rs]
            ds = [self.call(n, ProfilePut, records=records) for n in nodes if n != self.me]
            return DeferredList(ds, consumeErrors=True)

        d = self.mail.profiles.records_in_buckets(list(range(N_BUCKETS))).addCallback(send)
        d.addErrback(lambda f: self.log.failure("profile anti-entropy push failed", f))
        return d.addCallback(lambda _: None)

    def _hint_entries(self, bmap: BucketMap, buckets: list[int]) -> Deferred[list[BucketHint]]:
        """Our hard state of ``buckets`` as hints (one directory read and one profile
        query per bucket), epochs from ``bmap``."""
        store = self.mail.fragment_store

        def read() -> list[tuple[int, dict[str, tuple[bool, int, int]], int, list[list[str]]]]:
            return [
                (b, store.uid_marks(b), store.bucket_mark(b), store.bucket_holders(b))
                for b in buckets
            ]

        d1 = self.mail._run_blocking(read)
        d2 = self.mail.profiles.records_in_buckets(buckets)

        def build(results: list[Any]) -> list[BucketHint]:
            (_, marks), (_, records) = results
            return [
                BucketHint(
                    b,
                    bmap.epochs[b],
                    tuple(UserHint(u, m, n, p) for u, (m, n, p) in sorted(users.items())),
                    tuple(tuple(r) for r in records.get(b, [])),
                    mark,
                    tuple((str(h[0]), str(h[1])) for h in holders),
                )
                for b, users, mark, holders in marks
            ]

        d = DeferredList([d1, d2], fireOnOneErrback=True, consumeErrors=True)
        return d.addCallback(build)

    def send_hints(
        self, new: BucketMap, buckets: set[int], view: int | None = None
    ) -> Deferred[None]:
        """Read our hard state of ``buckets`` and send each new manager its part,
        tagged with our view epoch ``view`` (default: the current one)."""
        started = float(self.reactor.seconds())
        order = sorted(b for b in buckets if new.owners[b])
        sent_in = int(self.node.view.epoch) if view is None else view

        def send(hints: list[BucketHint]) -> Deferred[None]:
            per: dict[str, list[BucketHint]] = {}
            for h in hints:
                per.setdefault(new.owners[h.bucket], []).append(h)
            ds = []
            for manager, mine in per.items():
                if manager == self.me:
                    ds.append(self._apply_hints(self.me, mine, sent_in))
                else:
                    ds.append(self._push(manager, mine, sent_in))
            self.hint_rounds.append(
                {"epoch": max(new.epochs), "buckets": len(order), "managers": len(per)}
            )
            del self.hint_rounds[:-20]

            def done(results: list[tuple[bool, Any]]) -> None:
                failed = [m for m, (ok, _) in zip(per, results, strict=True) if not ok]
                if failed:
                    self.log.warn("hints to {m} failed", m=failed)
                self.log.info(
                    "user map: hints for {n} buckets sent to {k} managers in {t:.3f}s",
                    n=len(order),
                    k=len(per),
                    t=float(self.reactor.seconds()) - started,
                )

            return DeferredList(ds, consumeErrors=True).addCallback(done)

        d = self._hint_entries(new, order).addCallback(send)
        d.addErrback(lambda f: self.log.failure("sending reconstruction hints failed", f))
        return d

    def _push(
        self, manager: str, hints: list[BucketHint], view: int, tries: int = PULL_TRIES
    ) -> Deferred[Any]:
        """One ``porcupine.hints`` call; on failure resent (``PULL_TRIES`` times,
        ``PULL_RETRY`` s apart) while ``manager`` is live and our map still gives it
        those buckets at those epochs."""

        def failed(f: Failure) -> Failure:
            still = self.user_manager.core.still_wanted(manager, hints)
            if tries > 1 and still and manager in self.live():
                self.reactor.callLater(PULL_RETRY, self._repush, manager, still, view, tries - 1)
            return f

        entries = [h.encode() for h in hints]
        d = self.call(manager, Hints, sender=self.me, hints=entries, view=view)
        return d.addErrback(failed)

    def _repush(self, manager: str, hints: list[BucketHint], view: int, tries: int) -> None:
        d = self._push(manager, hints, view, tries)
        d.addErrback(
            lambda f: self.log.warn("hints to {m} failed: {e}", m=manager, e=f.getErrorMessage())
        )

    def pull_hints(
        self, peer: str, buckets: list[int], view: int, tries: int = PULL_TRIES
    ) -> Deferred[None]:
        """Ask ``peer`` for its hints of ``buckets`` (ours; we were away) and merge the
        answer as a hint for our current map. Retried (``PULL_TRIES`` times,
        ``PULL_RETRY`` s apart) while ``peer`` is a member and the view is ``view``."""
        um = self.user_manager

        def got(r: dict[str, Any]) -> Deferred[Any]:
            ours = um.core.pulled(peer, decode_hints(r["hints"], N_BUCKETS), buckets)
            return self._apply_hints(peer, ours, um.core.view_epoch)

        def failed(f: Failure) -> None:
            still = um.core.pull_again(peer, buckets, view)
            if tries > 1 and still:
                self.reactor.callLater(PULL_RETRY, self.pull_hints, peer, still, view, tries - 1)
            else:
                self.log.warn("pulling hints from {p} failed: {e}", p=peer, e=f.getErrorMessage())

        d = self.call(peer, HintsRequest, sender=self.me, buckets=list(buckets))
        return d.addCallbacks(got, failed).addCallback(lambda _: None)

    def _on_hints_request(self, sender: str, buckets: Any) -> Deferred[dict[str, Any]]:
        if not isinstance(buckets, list) or len(buckets) > N_BUCKETS:
            raise amp.MalformedAmpBox("buckets must be a list of bucket numbers")
        try:
            wanted = sorted({int(b) for b in buckets})
        except (TypeError, ValueError) as e:
            raise amp.MalformedAmpBox("buckets must be a list of bucket numbers") from e
        if wanted and not (0 <= wanted[0] and wanted[-1] < N_BUCKETS):
            raise amp.MalformedAmpBox("bucket number out of range")
        d = self._hint_entries(self.user_manager.state.map, wanted)
        return d.addCallback(lambda hints: {"hints": [h.encode() for h in hints]})

    def _apply_hints(
        self, sender: str, hints: list[BucketHint], view: int | None = None
    ) -> Deferred[dict[str, Any]]:
        records: list[Any] = [r for h in hints for r in h.records]  # checked by ProfileDB.merge

        def apply(_: object) -> dict[str, Any]:
            for h in hints:
                self.user_manager.receive(sender, h, view)
            return {}

        d: Deferred[Any] = self.replicator.receive(records) if records else succeed(None)
        d.addErrback(lambda f: self.log.failure("merging hinted profiles failed", f))
        return d.addCallback(apply)

    def _on_hints(
        self, sender: str, hints: Any, view: int | None = None
    ) -> Deferred[dict[str, Any]]:
        if not isinstance(hints, list):
            raise amp.MalformedAmpBox("hints must be a list")
        return self._apply_hints(sender, decode_hints(hints, N_BUCKETS), view)

    # --- service ---------------------------------------------------------------------

    def poll_open_mailboxes(self) -> int:
        """Have every IMAP mailbox open here look for new mail (it may have been
        stored on another node, whose change notice only reaches its own sessions).
        Only with other nodes live; returns how many were polled."""
        if len(self.live()) < 2:
            return 0
        keys = list(self.mail.registry.boxes)
        for user, mailbox in keys:
            self.mail.registry.changed(user, mailbox)
        return len(keys)

    def startService(self) -> None:
        """Start the periodic load exchange and the IMAP poll."""
        super().startService()
        self._loop = LoopingCall(self._exchange_load)
        self._loop.clock = self.reactor
        self._loop.start(self.load_interval, now=False)
        self._poll = LoopingCall(self.poll_open_mailboxes)
        self._poll.clock = self.reactor
        self._poll.start(self.poll_interval, now=False)
        self._lease_loop = LoopingCall(self._tick)
        self._lease_loop.clock = self.reactor
        self.user_manager.core.read_leases = True  # renewed by the tick from now on
        self._lease_loop.start(self.lease / 4, now=True)
        self._sweep_loop = LoopingCall(self.remind_pending)
        self._sweep_loop.clock = self.reactor
        self._sweep_loop.start(SWEEP_INTERVAL, now=False)

    def stopService(self) -> None:
        """Stop the periodic calls."""
        for loop in (self._loop, self._poll, self._lease_loop, self._sweep_loop):
            if loop is not None and loop.running:
                loop.stop()
        super().stopService()

    def status(self) -> dict[str, Any]:
        """Cluster mail figures for ``status --json``."""
        return {
            "mail_cluster": {
                **self.user_manager.status(),
                "pauses": self.pauses,
                "lease": self.lease_ok(),
                "read_lease": {
                    "holds": self.user_manager.core.read_lease(float(self.reactor.seconds())),
                    "renewals": self.read_renewals,
                    "marks_delayed": self.user_manager.core.marks_delayed,
                    "marks_blocked": self.user_manager.core.marks_blocked(
                        float(self.reactor.seconds())
                    ),
                },
                "rpc_calls": dict(self.calls),
                "load": self.load(),
                "balancer": self.balancer.status(),
                "hint_rounds": self.hint_rounds[-5:],
            }
        }
