"""The mail scenario's model (:mod:`.mail`): its constants, the shape of a run
(:class:`Scenario`), a node's record, a run's :class:`Outcome`, and the helpers that
stand in for the OS (seeded ``uuid4``, files closed when a process dies)."""

from __future__ import annotations

import contextlib
import random
import uuid
from collections.abc import Iterator
from typing import Any

import attrs

from ..porcupine.node import PorcupineNode
from ..porcupine.replication import ReplicationConfig
from .kernel import SimHost

SECRET = b"m" * 32
DOMAIN = "example.org"
PASSWORD = "pw-sim"
CLUSTER_PORT, SMTP_PORT, POP3_PORT, IMAP_PORT = 7946, 25, 110, 143
CLIENT_IP = "10.0.9.1"

#: Replication tuned for minutes, not days: pushes retried within seconds.
REPLICATION = ReplicationConfig(
    acks_before_reply=2, push_initial=0.2, push_max=4.0, stall_timeout=10.0, alive_interval=30.0
)


@attrs.define
class Scenario:
    """One run's shape (all times in simulated seconds)."""

    nodes: int = 3
    users: int = 3
    messages: int = 12
    #: deliveries and reads are spread over this window, so are the faults
    window: float = 30.0
    faults: int = 4
    reads: int = 8
    skew: float = 0.2
    #: how long the run may take after the heal to satisfy the final invariants
    settle: float = 90.0
    client_timeout: float = 30.0
    #: a run that needs more events than this is stuck (:class:`Livelock`)
    max_events: int = 2_000_000
    latency: tuple[float, float] = (0.0005, 0.004)
    #: nodes hand R=1 deliveries to the user's manager node (False: the receiving
    #: node places them, the placement regression seeds were found with)
    handover: bool = False
    #: users get 1, 2, ... up to this many replicas in turn (at most one per node)
    max_replicas: int = 2
    #: the fault kinds drawn from (each equally likely)
    fault_kinds: tuple[str, ...] = ("partition", "bridge", "pause", "crash")


class Livelock(RuntimeError):
    """The run kept executing events without reaching its end (time stood still)."""


@attrs.define(eq=False)
class MailHost:
    """One node's host (and disk) and, while up, the node built on it."""

    node_id: str
    host: SimHost
    seeds: tuple[str, ...]
    node: PorcupineNode | None = None
    boots: int = 0
    #: The host's own clock skew (a "clockstep" restart adds to it for one boot).
    skew: float = 0.0

    @property
    def ip(self) -> str:
        return self.host.ip


@attrs.define
class Outcome:
    """What one run did and found."""

    seed: int
    digest: str
    problems: list[str]
    acked: int
    sent: int
    reads: int
    refusals: int
    faults: list[str]
    events: int
    sim_seconds: float
    cpu_seconds: float

    def as_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@contextlib.contextmanager
def seeded_uuid4(rng: random.Random) -> Iterator[None]:
    """``uuid.uuid4`` draws from ``rng`` while the run lasts (file and request names
    made by the shells are then the same on every replay)."""
    original = uuid.uuid4

    def uuid4() -> uuid.UUID:
        return uuid.UUID(int=rng.getrandbits(128), version=4)

    uuid.uuid4 = uuid4  # type: ignore[assignment]
    try:
        yield
    finally:
        uuid.uuid4 = original  # type: ignore[assignment]


def close_files(node: PorcupineNode) -> None:
    """What the OS does for a killed process: its database handles are closed."""
    storage = node.mail.storage
    if node.replication is not None:
        node.replication.log_store.close()
        node.replication.objects.close()
    storage.fragment_store.close()
    storage.profiles.close()


def refusal_reason(replies: list[bytes]) -> str:
    if not replies:
        return "no connection"
    last = replies[-1].strip().splitlines()[-1] if replies[-1].strip() else b""
    return last[:60].decode("ascii", "replace")
