"""The replication simulator's model (:mod:`.sim`): its tunables, network faults, a
node's disk and state, crash plans and the agent's submissions."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import attrs

from ._manager import ReplicationConfig, ReplicationManager
from ._values import (
    Action,
    Timestamp,
)
from .memory import MemoryLog, MemoryObjectStore

#: Simulator tunables: fast retries so that runs last seconds of virtual time.
SIM_CONFIG = ReplicationConfig(
    push_initial=0.05, push_max=1.0, stall_timeout=3.0, alive_interval=30.0
)


@attrs.define
class Faults:
    """Network behaviour: latency range (s), loss and duplication probabilities."""

    latency: tuple[float, float] = (0.0005, 0.005)
    loss: float = 0.0
    duplicate: float = 0.0


@attrs.define
class Disk:
    """What survives a crash: the update log and the object store."""

    log: MemoryLog = attrs.field(factory=MemoryLog)
    store: MemoryObjectStore = attrs.field(factory=MemoryObjectStore)


@attrs.define
class CrashPlan:
    """Crash ``node`` just before it performs the ``nth`` action matching ``when``.

    The node restarts ``down_for`` seconds later (never, if None).
    """

    node: str
    when: Callable[[str, Action], bool]
    nth: int = 1
    down_for: float | None = 0.5
    seen: int = 0
    fired: bool = False


@attrs.define(eq=False)
class SimNode:
    """One node: its disk and, while up, its core."""

    node_id: str
    skew: float
    disk: Disk = attrs.field(factory=Disk)
    core: ReplicationManager | None = None
    timer_gen: int = 0
    spin: int = 0
    last_tick: float = -1.0
    #: highest version ever applied per object (tombstones included), to catch regressions
    high: dict[str, Timestamp] = attrs.field(factory=dict)
    #: actions the shell has yet to perform, in order; ``busy`` while a write is on disk
    backlog: deque[Action] = attrs.field(factory=deque)
    busy: bool = False
    boots: int = 0

    @property
    def up(self) -> bool:
        """True while the node runs."""
        return self.core is not None


@attrs.define
class Submission:
    """One agent request, and what became of it."""

    object_id: str
    body: bytes | None
    targets: tuple[str, ...]
    coordinator: str | None = None
    token: int | None = None
    #: the timestamp the agent was answered with
    timestamp: Timestamp | None = None
    acknowledged: bool = False
    attempts: int = 0
    #: every timestamp a coordinator gave this request (one per attempt)
    stamps: list[Timestamp] = attrs.field(factory=list)
