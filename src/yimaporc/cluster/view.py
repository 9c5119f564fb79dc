"""TRM's values: the configuration, the view, the listener interface and the core's actions."""

from __future__ import annotations

from collections.abc import Callable

import attrs
from zope.interface import Interface

from .wire import (
    Body,
    Member,
)


@attrs.frozen
class TrmConfig:
    """Timers of the protocol, in seconds."""

    probe_interval: float = 1.0
    ping_interval: float = 0.5
    suspect_timeout: float = 2.5
    indirect_probes: int = 2
    relay_timeout: float = 0.4
    late_tolerance: float = 0.25
    max_health: int = 4
    round_timeout: float = 0.4
    commit_timeout: float = 1.5
    trigger_backoff: float = 0.2
    known_ttl: float = 600.0
    member_probe_factor: float = 4.0

    @property
    def detection_bound(self) -> float:
        """The longest live members take to drop a silent member from the view: the
        next ping, the suspect timeout at the highest health multiplier, then the
        three rounds and the commit (Porcupine holds some UIDs this long)."""
        suspect = self.suspect_timeout * (1 + self.max_health)
        rounds = self.trigger_backoff + 3 * self.round_timeout + self.commit_timeout
        return self.ping_interval + suspect + rounds


@attrs.frozen
class View:
    """What a node believes the group is: epoch, members (address order), coordinator."""

    epoch: int
    members: tuple[Member, ...]
    coordinator: str
    attachment: bytes = b""

    def member(self, node_id: str) -> Member | None:
        """The member with ``node_id``, if any."""
        for m in self.members:
            if m.node_id == node_id:
                return m
        return None

    @property
    def node_ids(self) -> tuple[str, ...]:
        """Member ids in address order."""
        return tuple(m.node_id for m in self.members)


EMPTY_VIEW = View(0, (), "")


class IMembershipListener(Interface):
    """Told about every committed membership change (user map, stream planner...)."""

    def membership_changed(old: View, new: View) -> None:
        """``new`` was committed; ``old`` was the previous view."""


@attrs.frozen
class Send:
    """Action: send ``body`` to ``address`` (``host:port``)."""

    address: str
    body: Body


@attrs.frozen
class ViewChanged:
    """Action: the committed view changed from ``old`` to ``new``."""

    old: View
    new: View


Action = Send | ViewChanged
AttachmentFor = Callable[[View, tuple[Member, ...], int], bytes]
