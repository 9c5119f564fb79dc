"""Porcupine's cluster AMP commands (moved out of ``cluster.py``).

Every :class:`~.interfaces.IUserManager` and :class:`~.interfaces.IMailboxManager`
method is a command (``porcupine.um.*``, ``porcupine.mb.*``) answered by the node's
local managers (:func:`~._cluster_remote.register_handlers`); the reconstruction,
profile and load exchanges have theirs too.  Manager errors (``NoSuchUser``,
``NoSuchMailbox``...) cross as AMP errors (:data:`~._cluster_wire.ERRORS`).
"""

from __future__ import annotations

from twisted.protocols import amp

from ..cluster.rpc import BigBytes
from ._cluster_wire import ERRORS, BucketList, HintList, HolderList, Json, RecordList

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


class UmAddHolder(_Cmd):
    """IUserManager.add_holder: record ``node`` as a holder on a majority, then renew
    the plan's allocation at ``first`` (a delivery's first message on ``node``);
    ``fence``: the one to store under, empty when the allocation is gone."""

    commandName = b"porcupine.um.add_holder"
    arguments = [
        *_U,
        (b"node", amp.Unicode()),
        (b"first", amp.Integer()),
        (b"fence", amp.Unicode()),
    ]
    response = [(b"fence", amp.Unicode())]


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
    is the allocation's fence, checked by the storing node.  ``unfenced``: no
    fence; ``replicas``: the user's replica count (a replicated delivery's
    allocation is held longer; absent from an older node: 1)."""

    commandName = b"porcupine.um.plan"
    arguments = [
        *_U,
        (b"count", amp.Integer()),
        (b"unfenced", amp.Boolean(optional=True)),
        (b"replicas", amp.Integer(optional=True)),
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


class DlDeliver(_Cmd):
    """A delivery for an R=1 user handed to the node that manages the user, which runs
    the delivery proxy itself (plan, store, holder records all local when it stores
    the message on its own disk): one call in place of plan, store and add_fragment
    (``DeliveryProxy.forward``).  The reply is the stored copies' digests, sent once
    the message is durable and its holder recorded, as a local delivery's 250."""

    commandName = b"porcupine.dl.deliver"
    arguments = [*_U, (b"body", BigBytes()), (b"when", amp.Float())]
    response = [(b"digests", Json())]


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
    arguments = [
        *_M,
        (b"uids", Json()),
        (b"flags", Json()),
        (b"mode", amp.Integer()),
        (b"unchanged_since", amp.Integer(optional=True)),
    ]
    response = [(b"flags", Json())]


class MbTombstones(_Cmd):
    """IMailboxManager.tombstones (``[[uid, modseq], ...]``)."""

    commandName = b"porcupine.mb.tombstones"
    arguments = _M
    response = [(b"tombstones", Json())]


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
    arguments = [
        (b"bucket", amp.Integer()),
        (b"fence", amp.Unicode()),
        (b"holders", HolderList()),
    ]
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
        (b"hints", HintList()),
        (b"view", amp.Integer(optional=True)),
    ]


class HintsRequest(_Cmd):
    """The pull: a manager whose soft state may have missed hints (it was *away*)
    asks for the callee's hints of ``buckets`` (same entries as :class:`Hints`)."""

    commandName = b"porcupine.hints-request"
    arguments = [(b"sender", amp.Unicode()), (b"buckets", BucketList())]
    response = [(b"hints", HintList())]


class ProfilePut(_Cmd):
    """Profile records (newest ``updated`` wins) pushed by the node that wrote them."""

    commandName = b"porcupine.profiles"
    arguments = [(b"records", RecordList())]


class LoadExchange(_Cmd):
    """The periodic load swap: the caller's load in, the callee's out."""

    commandName = b"porcupine.load"
    arguments = [(b"node", amp.Unicode()), (b"load", amp.Float())]
    response = [(b"load", amp.Float())]


COMMANDS: tuple[type[_Cmd], ...] = (
    UmProfile, UmAuthenticate, UmFragments, UmAddFragment, UmAddHolder, UmRemoveFragment,
    UmReserveUids, UmPlan, UmPending, MbNumber, MbDemote, UidMark, UidHolders,
    MbStore, MbMailboxes, MbCreateMailbox, MbDeleteMailbox, MbRenameMailbox, MbSubscribe,
    MbDigests, MbFetch, MbSetFlags, MbTombstones, MbCopy, MbDelete, MbRemoveUser, MbUsersInBucket,
    Hints, HintsRequest, ProfilePut, LoadExchange, DlDeliver,
)  # fmt: skip
