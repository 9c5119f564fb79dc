"""The user manager (seed §2.2): profiles via the profile DB, fragment lists in memory.

The fragment list of a user is soft state: :class:`UserManager` keeps it in a
:class:`~yimaporc.porcupine.softstate.UserManagerState` (the structure the
cluster's reconstruction fills from hints) and seeds it at start from this
node's own hard state.  Delivery and retrieval keep it current.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from .interfaces import IProfileDB, IUserManager
from .reconstruct import Horizon
from .softstate import UserManagerState
from .usermap import N_BUCKETS
from .values import Profile


@implementer(IUserManager)
class UserManager:
    """Profiles (hard, via ``profiles``) and fragment lists (soft) of managed users."""

    def __init__(self, node_id: str, profiles: IProfileDB, cache_size: int = 100_000) -> None:
        self.node_id = node_id
        self.profiles = profiles
        self.state = UserManagerState(node_id, N_BUCKETS)
        self._cache: dict[str, Profile] = {}
        self._cache_size = cache_size

    def forget(self, address: str) -> None:
        """Drop the cached profile (after passwd, deluser, or a newer replica)."""
        self._cache.pop(address.lower(), None)

    def seed(self, node: str, users: Iterable[str]) -> None:
        """``node`` holds mail for ``users`` (its hard state, read at start)."""
        for user in users:
            self.state.add_fragment(user, node)

    def profile(self, address: str) -> Deferred[Profile | None]:
        """See :class:`IUserManager` (cached: the user profile soft state, seed §2.1)."""
        address = address.lower()
        cached = self._cache.get(address)
        if cached is not None:
            return succeed(cached)

        def remember(p: Profile | None) -> Profile | None:
            if p is not None:
                if len(self._cache) >= self._cache_size:
                    self._cache.clear()
                self._cache[address] = p
            return p

        return self.profiles.get(address).addCallback(remember)

    def authenticate(self, address: str, password: str) -> Deferred[Profile]:
        """See :class:`IUserManager`."""
        return self.profiles.verify(address.lower(), password)

    def cached_login(self, address: str, password: str) -> Profile | None:
        """The profile if this node's auth cache vouches for the password (no scrypt),
        else None: then :meth:`authenticate` decides."""
        return self.profiles.cached(address.lower(), password)

    def fragments(self, address: str) -> Deferred[tuple[str, ...]]:
        """See :class:`IUserManager`."""
        return succeed(tuple(sorted(self.state.fragment_list(address.lower()))))

    def add_fragment(self, address: str, node: str, first: int | None = 0) -> Deferred[None]:
        """See :class:`IUserManager` (no horizon here: ``first`` is not needed)."""
        self.state.add_fragment(address.lower(), node)
        return succeed(None)

    def add_holder(self, address: str, node: str, first: int, fence: str) -> Deferred[str]:
        """See :class:`IUserManager` (nothing ages here: the fence as given)."""
        return self.add_fragment(address, node).addCallback(lambda _: fence)

    def reserve_uids(self, address: str, count: int) -> Deferred[int]:
        """0: in a cluster of one the storing node numbers messages itself."""
        return succeed(0)

    def delivery_plan(
        self, address: str, count: int, unfenced: bool = False, replicas: int = 1
    ) -> Deferred[tuple[tuple[str, ...], int, str]]:
        """The fragment list, UID 0 (the storing node numbers) and no fence."""
        return self.fragments(address).addCallback(lambda nodes: (nodes, 0, ""))

    def note_pending(self, address: str, node: str) -> Deferred[None]:
        """Nothing to do: in a cluster of one nothing is stored unnumbered."""
        return succeed(None)

    def away_of(self, address: str) -> tuple[str, ...]:
        """None: a cluster of one has no member out of reach."""
        return ()

    def certain(self, address: str) -> bool:
        """Always: every holder is this node."""
        return True

    def horizon_of(self, address: str) -> Horizon | None:
        """None: no allocation is ever outstanding here."""
        return None

    def remove_fragment(self, address: str, node: str) -> Deferred[None]:
        """See :class:`IUserManager`."""
        self.state.remove_fragment(address.lower(), node)
        return succeed(None)
