"""Remote managers: :class:`RemoteUserManager` and :class:`RemoteMailboxManager` call
the cluster commands over ``node.rpc`` and implement the same interfaces as the local
managers, so ``users_for(address)`` is the local manager when this node owns the
address's bucket and an AMP proxy to the owner otherwise, and ``mailboxes_for(node)``
likewise; :func:`register_handlers` answers the commands with this node's managers.
(Moved out of ``cluster.py``.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from ._cluster_commands import (
    MbCopy,
    MbCreateMailbox,
    MbDelete,
    MbDeleteMailbox,
    MbDemote,
    MbDigests,
    MbFetch,
    MbMailboxes,
    MbNumber,
    MbRemoveUser,
    MbRenameMailbox,
    MbSetFlags,
    MbStore,
    MbSubscribe,
    MbTombstones,
    MbUsersInBucket,
    MbView,
    UmAddFragment,
    UmAddHolder,
    UmAuthenticate,
    UmFragments,
    UmPending,
    UmPlan,
    UmProfile,
    UmRemoveFragment,
    UmReserveUids,
    _Cmd,
)
from ._cluster_wire import (
    StorageFull,
    _digest_in,
    _digest_out,
    _info_in,
    _info_out,
    _profile_in,
    _profile_out,
    pack_bodies,
    pack_messages,
    storage_full,
    unpack_bodies,
    unpack_messages,
)
from .authcache import AuthCache
from .interfaces import IMailboxManager, IUserManager
from .reconstruct import (
    Horizon,
)

if TYPE_CHECKING:
    from ..cluster.rpc import RpcRegistry

from .values import (
    BadCredentials,
    Digest,
    MailboxInfo,
    NewMessage,
    NoSuchMailbox,
    Profile,
)

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
    A login the manager accepted is remembered the same ``profile_ttl`` seconds
    (:class:`~.authcache.AuthCache`, keyed on the hash the manager verified
    against; dropped by :meth:`forget`), so a client's next logins through this
    node make no ``authenticate`` RPC (:meth:`cached_login`).
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
        self._logins = AuthCache(now, profile_ttl) if now is not None else None
        self._verified: dict[str, tuple[Profile, float]] = {}

    def forget(self, address: str) -> None:
        """Drop the cached profile and logins of ``address``."""
        self._profiles.pop(address.lower(), None)
        self._verified.pop(address.lower(), None)
        if self._logins is not None:
            self._logins.forget(address.lower())

    def cached_login(self, address: str, password: str) -> Profile | None:
        """The profile if the manager accepted this password for ``address`` less than
        ``profile_ttl`` seconds ago and no newer profile was heard of since, else None."""
        address = address.lower()
        hit = self._verified.get(address)
        if hit is None or self._logins is None or self.now is None or hit[1] <= self.now():
            return None
        profile = hit[0]
        ok = self._logins.check(address, profile.password_hash, password, count_miss=False)
        return profile if ok else None

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
        self, address: str, count: int, unfenced: bool = False, replicas: int = 1
    ) -> Deferred[tuple[tuple[str, ...], int, str]]:
        """See :meth:`ClusterUserManager.delivery_plan`."""
        d = self.call(UmPlan, user=address, count=count, unfenced=unfenced, replicas=replicas)
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
            if self._logins is not None and self.now is not None:
                if len(self._verified) > 10_000:
                    self._verified.clear()
                    self._logins.clear()
                self._verified[address.lower()] = (p, self.now() + self.profile_ttl)
                self._logins.remember(address.lower(), p.password_hash, password)
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

    def add_fragment(self, address: str, node: str, first: int | None = 0) -> Deferred[None]:
        """See :class:`IUserManager`; ``first``: see :meth:`ClusterUserManager.add_fragment`."""
        kw: dict[str, Any] = {"first": first} if first and first > 0 else {}
        d = self.call(UmAddFragment, user=address, node=node, **kw)
        return d.addCallback(lambda _: None)

    def add_holder(self, address: str, node: str, first: int, fence: str) -> Deferred[str]:
        """See :meth:`ClusterUserManager.add_holder`."""
        d = self.call(UmAddHolder, user=address, node=node, first=first, fence=fence)
        return d.addCallback(lambda r: str(r["fence"]))

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
        self,
        user: str,
        mailbox: str,
        uids: Sequence[int],
        flags: Sequence[str],
        mode: int,
        unchanged_since: int | None = None,
    ) -> Deferred[dict[int, tuple[str, ...]]]:
        """See :class:`IMailboxManager`."""
        extra = {} if unchanged_since is None else {"unchanged_since": unchanged_since}
        d = self.call(
            MbSetFlags,
            user=user,
            mailbox=mailbox,
            uids=list(uids),
            flags=list(flags),
            mode=mode,
            **extra,
        )
        return d.addCallback(lambda r: {int(u): tuple(f) for u, f in r["flags"]})

    def tombstones(self, user: str, mailbox: str) -> Deferred[dict[int, int]]:
        """See :class:`IMailboxManager`."""
        d = self.call(MbTombstones, user=user, mailbox=mailbox)
        return d.addCallback(lambda r: {int(u): int(m) for u, m in r["tombstones"]})

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
    registry: RpcRegistry,
    users: Callable[[], IUserManager],
    mailboxes: Callable[[], IMailboxManager],
    *,
    load: Callable[[], float] = lambda: 0.0,
    stores: Callable[[Sequence[NewMessage]], Deferred[list[Digest]]] | None = None,
) -> None:
    """Answer the manager commands on ``registry`` with this node's local managers.

    ``users()`` and ``mailboxes()`` are called per command (tests hand in fakes that
    way); ``stores`` (default: ``mailboxes().store``) lets the caller count load.
    A mailbox command that fails on a full disk answers :class:`StorageFull` (the
    caller sees this node out of reach for it), not an unknown error.
    """

    def full(f: Failure) -> Failure:
        if storage_full(f.value):
            return Failure(StorageFull(f"mail storage full: {f.getErrorMessage()}"))
        return f

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

        def out(nodes: tuple[str, ...]) -> dict[str, Any]:
            r = {
                "nodes": list(nodes),
                "away": list(um_.away_of(user)),
                "certain": um_.certain(user),
            }
            h = um_.horizon_of(user)
            if h is not None:
                r["horizon"] = h.encode()
            return r

        d: Deferred[tuple[str, ...]] = um_.fragments(user)
        return d.addCallback(out)

    registry.register(UmFragments, fragments)
    registry.register(UmAddFragment, um("add_fragment", none))
    registry.register(UmRemoveFragment, um("remove_fragment", none))

    def add_holder(user: str, node: str, first: int, fence: str) -> Deferred[dict[str, Any]]:
        d = users().add_holder(user, node, first, fence)
        return d.addCallback(lambda f: {"fence": f})

    registry.register(UmAddHolder, add_holder)

    def reserve(user: str, count: int) -> Deferred[dict[str, Any]]:
        d = users().reserve_uids(user, count)
        return d.addCallback(lambda first: {"first": first})

    registry.register(UmReserveUids, reserve)

    def plan(
        user: str, count: int, unfenced: bool = False, replicas: int = 1
    ) -> Deferred[dict[str, Any]]:
        d = users().delivery_plan(user, count, bool(unfenced), max(1, min(replicas, 64)))
        return d.addCallback(lambda r: {"nodes": list(r[0]), "first": r[1], "fence": r[2]})

    registry.register(UmPlan, plan)

    def pending(user: str, node: str) -> Deferred[dict[str, Any]]:
        return users().note_pending(user, node).addCallback(none)

    registry.register(UmPending, pending)

    def number(user: str, fence: str, first: int, count: int) -> Deferred[dict[str, Any]]:
        d = mailboxes().number_pending(user, fence, first, count)
        return d.addCallback(lambda r: {"done": r[0], "left": r[1], "top": r[2]})

    registry.register(MbNumber, number)

    def demote(user: str, mailbox: str, uid: int, key: str) -> Deferred[dict[str, Any]]:
        d = mailboxes().demote(user, mailbox, uid, key)
        return d.addCallback(lambda ok: {"done": ok})

    registry.register(MbDemote, demote)

    def store(messages: bytes) -> Deferred[dict[str, Any]]:
        batch = unpack_messages(messages)
        d = stores(batch) if stores is not None else mailboxes().store(batch)
        return d.addCallbacks(
            lambda ds: {"digests": [_digest_out(x) for x in ds], "load": load()}, full
        )

    registry.register(MbStore, store)

    def mb(method: str, out: Callable[[Any], dict[str, Any]], **rename: str) -> Callable[..., Any]:
        def handler(**kw: Any) -> Deferred[dict[str, Any]]:
            for wire, arg in rename.items():
                kw[arg] = kw.pop(wire)
            d: Deferred[Any] = getattr(mailboxes(), method)(**kw)
            return d.addCallbacks(out, full)

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
    registry.register(
        MbTombstones, mb("tombstones", lambda t: {"tombstones": [[u, m] for u, m in t.items()]})
    )
    registry.register(MbCopy, mb("copy", lambda xs: {"digests": [_digest_out(x) for x in xs]}))
    registry.register(MbDelete, mb("delete", lambda us: {"uids": list(us)}))
    registry.register(MbRemoveUser, mb("remove_user", none))
    registry.register(MbUsersInBucket, mb("users_in_bucket", lambda us: {"users": list(us)}))
