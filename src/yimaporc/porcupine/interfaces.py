"""The seams of a Porcupine node's mail service (seed §2.2).

Every method returns a Deferred of plain values (:mod:`.values`), so that the
cluster issue can put AMP between a caller and a manager without touching
either: a delivery proxy on one node calls the user manager of the recipient's
bucket, then the mailbox manager of the node it chose, exactly as it calls the
in-process ones here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.defer import Deferred
from twisted.mail.smtp import IMessageDelivery
from zope.interface import Attribute, Interface

from .values import Digest, MailboxInfo, NewMessage, Profile

if TYPE_CHECKING:
    from ._cluster_profiles import ProfileReplicator
    from .reconstruct import Horizon
    from .users import UserManager


class IProfileDB(Interface):
    """Hard, consistent user profiles (address, scrypt hash, replicas)."""

    def add(address: str, password: str, replicas: int) -> Deferred[Profile]:
        """Create a profile; fails with ``UserExists``."""

    def get(address: str) -> Deferred[Profile | None]:
        """The profile of ``address``, or None."""

    def set_password(address: str, password: str) -> Deferred[None]:
        """Replace the password hash; fails with ``NoSuchUser``."""

    def remove(address: str) -> Deferred[None]:
        """Delete the profile; fails with ``NoSuchUser``."""

    def verify(address: str, password: str) -> Deferred[Profile]:
        """The profile if ``password`` is right; fails with ``BadCredentials``."""

    def cached(address: str, password: str) -> Profile | None:
        """The profile if the verified-credential cache vouches for ``password`` now
        (memory only: no I/O, no scrypt), else None."""

    def users() -> Deferred[list[Profile]]:
        """Every profile, by address."""

    def users_in_bucket(bucket: int) -> Deferred[list[Profile]]:
        """The profiles of one user-map bucket (soft-state reconstruction)."""

    def count() -> int:
        """How many profiles there are (kept in memory, no I/O)."""


class IUserManager(Interface):
    """Soft state of the users of the buckets a node manages."""

    def profile(address: str) -> Deferred[Profile | None]:
        """The user's profile (cached), or None for an unknown user."""

    def authenticate(address: str, password: str) -> Deferred[Profile]:
        """The profile if the password is right; fails with ``BadCredentials``."""

    def cached_login(address: str, password: str) -> Profile | None:
        """The profile if this node's auth cache vouches for ``password`` now (memory
        only: no RPC, no pool job, no scrypt), else None: then :meth:`authenticate`
        decides."""

    def fragments(address: str) -> Deferred[tuple[str, ...]]:
        """The nodes holding mail for ``address`` (its mailbox fragment list)."""

    def add_fragment(address: str, node: str, first: int | None = 0) -> Deferred[None]:
        """``node`` now holds mail for ``address``; ``first`` (> 0): the UID a delivery
        plan allocated is now stored there (it leaves the visibility horizon)."""

    def add_holder(address: str, node: str, first: int, fence: str) -> Deferred[str]:
        """Record ``node`` as a holder of ``address``'s mail (on a majority, in a
        cluster), then renew the delivery plan's allocation at ``first``: a first
        message on a new holder waits for that record, and the allocation must not
        age meanwhile.  The fence to store under; empty: store unnumbered."""

    def remove_fragment(address: str, node: str) -> Deferred[None]:
        """``node`` holds no more mail for ``address``."""

    def reserve_uids(address: str, count: int) -> Deferred[int]:
        """The first of ``count`` fresh UIDs for ``address``; 0: the storing node numbers
        (a cluster of one); :data:`~.values.PENDING`: none may be handed out now."""

    def delivery_plan(
        address: str, count: int, unfenced: bool = False, replicas: int = 1
    ) -> Deferred[tuple[tuple[str, ...], int, str]]:
        """The fragment list, the first of ``count`` reserved UIDs and their fence, in
        one question (the delivery proxy's); ``unfenced``: no fence (the storing node
        numbers it as given); ``replicas``: the user's replica count."""

    def note_pending(address: str, node: str) -> Deferred[None]:
        """A message for ``address`` was stored unnumbered on ``node``: number it."""

    def away_of(address: str) -> tuple[str, ...]:
        """Nodes out of reach holding mail for ``address`` (as of the last fragments())."""

    def certain(address: str) -> bool:
        """Does the manager know every node holding ``address``'s mail?"""

    def horizon_of(address: str) -> Horizon | None:
        """The visibility horizon that goes with the last fragments() (None: none)."""


class ICachingChecker(ICredentialsChecker):
    """A credentials checker that can vouch for credentials from memory (the login
    then takes no throttle slot: no scrypt runs)."""

    def cached_avatar_id(credentials: Any) -> bytes | None:
        """The avatar id if a cache vouches for ``credentials`` now, else None (then
        ``requestAvatarId`` decides)."""


class ISmtpDelivery(IMessageDelivery):
    """The ``IMessageDelivery`` of one SMTP session, as the session's own checks use it."""

    authenticated_as: str | None = Attribute(
        "The address the session authenticated as (SMTP AUTH), None if it did not: "
        "a submission session may only send as that address."
    )


class ISmtpSession(Interface):
    """One SMTP session as its delivery sees it (``smtp.User.protocol``): the
    :class:`~._smtp.MailESMTP` that took the recipient."""

    policy = Attribute("The listener's SmtpPolicy (the MX one or a submission one).")
    startedTLS: bool = Attribute("True once the session runs over TLS (STARTTLS or 465).")

    def message_for(rcpt: Any) -> Any:
        """The ``smtp.IMessage`` that takes this session's DATA for ``rcpt`` (a
        validated ``delivery.Recipient``)."""


class IMailboxManager(Interface):
    """The mailbox fragments stored on one node's disk."""

    node_id: str

    def store(messages: Sequence[NewMessage]) -> Deferred[list[Digest]]:
        """Store durably (fsync, rename, commit) before firing; one Digest per message."""

    def mailboxes(user: str) -> Deferred[list[MailboxInfo]]:
        """The user's mailboxes in this fragment (INBOX always exists)."""

    def create_mailbox(user: str, name: str) -> Deferred[MailboxInfo]:
        """Create a mailbox; fails with ``MailboxExists``."""

    def delete_mailbox(user: str, name: str) -> Deferred[None]:
        """Delete a mailbox and its messages; fails with ``NoSuchMailbox``."""

    def rename_mailbox(user: str, old: str, new: str) -> Deferred[None]:
        """Rename a mailbox (and those below it), UIDVALIDITY kept."""

    def subscribe(user: str, name: str, subscribed: bool) -> Deferred[None]:
        """Set the LSUB subscription of a mailbox."""

    def digests(user: str, mailbox: str) -> Deferred[list[Digest]]:
        """The messages of a mailbox, by ascending UID."""

    def fetch(user: str, mailbox: str, uids: Sequence[int]) -> Deferred[dict[int, bytes]]:
        """The bodies of those of ``uids`` that exist."""

    def set_flags(
        user: str,
        mailbox: str,
        uids: Sequence[int],
        flags: Sequence[str],
        mode: int,
        unchanged_since: int | None = None,
    ) -> Deferred[dict[int, tuple[str, ...]]]:
        """Replace (mode 0), add (1) or remove (-1) flags; the new flags per UID.  With
        ``unchanged_since`` (CONDSTORE), messages whose MODSEQ is above it are left
        alone and out of the answer."""

    def tombstones(user: str, mailbox: str) -> Deferred[dict[int, int]]:
        """``{uid: modseq}`` of the expunges of the mailbox this node remembers
        (bounded, the oldest forgotten first: see ``porcupine._modseq``)."""

    def copy(user: str, mailbox: str, uids: Sequence[int], dest: str) -> Deferred[list[Digest]]:
        """Copy messages into ``dest`` (new UIDs there)."""

    def delete(user: str, mailbox: str, uids: Sequence[int]) -> Deferred[list[int]]:
        """Remove messages; the UIDs actually removed."""

    def remove_user(user: str) -> Deferred[None]:
        """Drop the user's whole fragment on this node."""

    def users_in_bucket(bucket: int) -> Deferred[list[str]]:
        """The users this node holds mail for in ``bucket`` (reconstruction, §3.3)."""

    def view(user: str, mailbox: str) -> Deferred[tuple[list[MailboxInfo], list[Digest] | None]]:
        """:meth:`mailboxes` and :meth:`digests` of ``mailbox`` in one call (None: no
        such mailbox in this fragment)."""

    def number_pending(
        user: str, fence: str, first: int, count: int
    ) -> Deferred[tuple[int, int, int]]:
        """Number up to ``count`` of ``user``'s unnumbered messages from ``first`` on, if
        ``fence`` is current; ``(numbered, left, top)``."""

    def demote(user: str, mailbox: str, uid: int, key: str) -> Deferred[bool]:
        """Message ``key`` under ``uid`` back to unnumbered (two messages under one UID)."""


class ILocalMailboxes(IMailboxManager):
    """The mailbox manager of this node's own disk (not one reached over AMP)."""

    def shown(user: str, marks: dict[str, tuple[int, int]]) -> Deferred[dict[str, int]]:
        """Record the highest UIDNEXT shown per mailbox (``marks``: name ->
        (UIDVALIDITY, UIDNEXT)); the highest ever recorded per mailbox."""


class ILoadBalancer(Interface):
    """The choice of store nodes (seed §5) from the nodes' load figures
    (:class:`~.balancer.LoadBalancer`)."""

    def observe(node: str, load: float, now: float) -> None:
        """``node`` reported ``load`` at ``now``; it is reachable."""

    def failed(node: str, now: float) -> None:
        """A call to ``node`` failed at ``now``: avoid it a while."""

    def load_of(node: str, now: float) -> float:
        """The load assumed for ``node`` (a replicated message is read from the least
        loaded of its holders)."""

    def choose(
        live: Sequence[str],
        fragments: Sequence[str],
        replicas: int,
        now: float,
        prefer: str | None = None,
    ) -> list[str]:
        """The ``replicas`` nodes to store the next message of a user on, best first
        (``prefer``: the delivering node, first while the balance allows it)."""

    def status() -> dict[str, Any]:
        """Counters for ``/api/status``."""


class IMailTopology(Interface):
    """Where a node's mail service finds managers: one node, or the cluster.

    Chosen once, by the composition root (:class:`~.topology.LocalTopology` for a
    node alone, :class:`~.cluster.MailCluster` in a cluster), and handed to the
    mail service's constructor; nothing switches it later.
    """

    #: This node's own user manager (the one of the buckets it manages).
    user_manager: UserManager
    #: The one profile write path.
    replicator: ProfileReplicator
    #: The delivery proxy's load balancer (None: affinity, then this node).
    balancer: ILoadBalancer | None

    def users_for(address: str) -> IUserManager:
        """The user manager of ``address``'s bucket (local, or a proxy to its owner)."""

    def mailboxes_for(node_id: str) -> IMailboxManager:
        """The mailbox manager of ``node_id`` (``KeyError``: no such node here)."""

    def live() -> list[str]:
        """Node ids of the current view (this node if alone)."""

    def home_of(address: str) -> str:
        """The node holding ``address``'s mailbox tree."""

    def holders_of(address: str) -> set[str]:
        """The nodes that may hold mail for ``address`` (a deletion asks them all)."""

    def forget(address: str) -> None:
        """A profile changed: drop every cached copy of it here."""

    def known_nodes() -> set[str]:
        """Every node ever seen in a view (a cluster persists them)."""
