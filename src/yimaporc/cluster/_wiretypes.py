"""The values of a membership datagram: scope, members, bodies, header (docs/wire.md).

Pure data, shared by the construct specification (:mod:`._wirespec`) and the fast
codec (:mod:`.wire`, the public face that re-exports everything here).
"""

from __future__ import annotations

import enum
import functools
import re

import attrs

MAGIC = b"YPM2"
MAC_SIZE = 16
MAX_DATAGRAM = 60_000


class MalformedPacket(Exception):
    """The bytes are not a well-formed membership datagram."""


class BadMac(MalformedPacket):
    """The datagram's MAC does not verify with our key."""


class WrongScope(MalformedPacket):
    """The datagram belongs to another cluster or another node kind."""


_SCOPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_scope_name(value: str, what: str = "cluster name") -> str:
    """``value`` if it is 1-64 ASCII letters, digits, '.', '_' or '-' (not first)."""
    if not _SCOPE_NAME.fullmatch(value):
        raise ValueError(
            f"{what} {value!r}: use 1-64 ASCII letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)"
        )
    return value


@attrs.frozen
class Scope:
    """The cluster (by name) and the node kind a datagram or RPC connection belongs to.

    Nodes of different kinds never share a scope, so they never form one group,
    whatever secret or name they are given.
    """

    cluster: str = attrs.field(validator=lambda _i, _a, v: check_scope_name(v))
    kind: str = attrs.field(validator=lambda _i, _a, v: check_scope_name(v, "node kind"))

    def __str__(self) -> str:
        return f"{self.kind}/{self.cluster}"


class MsgType(enum.IntEnum):
    """Datagram types."""

    PROBE = 1
    NEW_GROUP = 2
    REPLY = 3
    COMMIT = 4
    PING = 5
    ACK = 6
    TIME_REQ = 7
    TIME_RESP = 8
    PING_REQ = 9
    INDIRECT_ACK = 10


@attrs.frozen(order=True, cache_hash=True)
class Member:
    """A cluster member: its id, its cluster address ``host:port`` and its boot number.

    Members are hashed and sorted on every datagram a node handles (views are sets and
    sorted tuples of them), so the hash is cached and the sort key memoised.
    """

    node_id: str
    address: str
    incarnation: int = 0

    @property
    def sort_key(self) -> tuple[tuple[int, ...], int, str]:
        """Address order (numeric IPv4 when possible, then port), as TRM pings use it."""
        return _sort_key(self.address, self.node_id)


@functools.lru_cache(maxsize=4096)
def _sort_key(address: str, node_id: str) -> tuple[tuple[int, ...], int, str]:
    return (*address_key(address), node_id)


@functools.lru_cache(maxsize=4096)
def address_key(address: str) -> tuple[tuple[int, ...], int]:
    """Sort key of ``host:port``: dotted quads numerically, others by code points
    (memoised: a pure function of the string, asked for on every sort of a view)."""
    host, _, port = address.rpartition(":")
    try:
        parts = tuple(int(x) for x in host.split("."))
    except ValueError:
        parts = tuple(ord(ch) for ch in host)
    try:
        p = int(port)
    except ValueError:
        p = 0
    return (parts, p)


# --- bodies -----------------------------------------------------------------


@attrs.frozen
class Probe:
    """A coordinator's periodic announcement to nodes outside its group."""

    epoch: int
    members: tuple[Member, ...]


@attrs.frozen
class NewGroup:
    """TRM round 1: coordinator proposes ``proposal`` for a new group."""

    proposal: int


@attrs.frozen
class Reply:
    """TRM round 2: a member's answer, with its own epoch proposal and view."""

    proposal: int
    coordinator: str
    epoch: int
    members: tuple[Member, ...]


@attrs.frozen
class Commit:
    """TRM round 3: the new group, its epoch, and an attachment (e.g. the user map)."""

    epoch: int
    members: tuple[Member, ...]
    attachment: bytes = b""


@attrs.frozen
class Ping:
    """Liveness check of the next-highest neighbour; carries the pinger's epoch."""

    epoch: int
    nonce: int


@attrs.frozen
class Ack:
    """Answer to a ping: the answerer's epoch and whether the pinger is in its view."""

    epoch: int
    nonce: int
    member: bool


@attrs.frozen
class TimeReq:
    """NTP-style request: ``t1`` is the requester's clock at send."""

    t1: float


@attrs.frozen
class TimeResp:
    """NTP-style response: ``t2`` receive and ``t3`` send times on the responder's clock."""

    t1: float
    t2: float
    t3: float


@attrs.frozen
class PingReq:
    """Indirect probe (SWIM ping-req): please ping ``target_id`` at ``target_address`` for me."""

    nonce: int
    target_id: str
    target_address: str


@attrs.frozen
class IndirectAck:
    """A relay's answer to :class:`PingReq` ``nonce``: the target answered (``ok``, with its
    ``epoch``) or did not within the relay's timeout (a nack: the relay itself is reachable)."""

    nonce: int
    target_id: str
    ok: bool
    epoch: int


Body = Probe | NewGroup | Reply | Commit | Ping | Ack | TimeReq | TimeResp | PingReq | IndirectAck


@attrs.frozen
class Header:
    """Who sent a datagram, and its anti-replay and Lamport counters."""

    sender: str
    address: str
    incarnation: int
    seq: int
    lamport: int


@attrs.frozen
class Datagram:
    """A parsed, authenticated membership datagram."""

    header: Header
    body: Body
