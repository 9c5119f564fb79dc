"""The player core's vocabulary: the events a shell feeds in, the actions it carries out.

Events:   :class:`PacketArrived`, :class:`ProbeAnswered`.
Actions:  :class:`Deliver` (to the decoder / ``--out``), :class:`SendNack`
          (unicast to one node), :class:`Pause`, :class:`Resume`,
          :class:`SetSpeed` (one per serving node, equal ``at_ct`` for a
          stream-wide change), :class:`SendProbe`, :class:`RequestHandover`.
"""

from __future__ import annotations

import attrs

# --- events ------------------------------------------------------------------------


@attrs.frozen
class PacketArrived:
    """One RTP packet (first transmission or retransmission) as the shell decoded it.

    ``gseq`` is already extended past 16 bits (:func:`.seq.extend_seq`).
    """

    stream: str
    node: int
    gseq: int
    node_seq: int
    media_time: float
    size: int
    retransmission: bool = False
    payload: bytes = b""


@attrs.frozen
class ProbeAnswered:
    """The answer to :class:`SendProbe` ``token`` came back from ``node``."""

    stream: str
    node: int
    token: int


# --- actions -----------------------------------------------------------------------


@attrs.frozen
class Deliver:
    """Hand one packet to the decoder (in global order, at its playout instant)."""

    stream: str
    gseq: int
    media_time: float
    payload: bytes


@attrs.frozen
class SendNack:
    """Ask ``node`` (only) to resend its packets ``node_seqs`` (RTCP Generic NACK)."""

    stream: str
    node: int
    node_seqs: tuple[int, ...]


@attrs.frozen
class Pause:
    """Pause-resume: ``node`` stops this stream's schedule at cluster time ``at_ct``.

    Every node gets the same ``at_ct`` and the common schedule's position there,
    ``media_time``, so all stop at the same media position and resume from it
    together, also a node whose own schedule drifted (a slow node resumes in
    step instead of carrying its lag over every pause). 0: not given (the
    node's own position at ``at_ct``).
    """

    stream: str
    node: int
    at_ct: float
    media_time: float = 0.0


@attrs.frozen
class Resume:
    """Pause-resume: the schedule restarts at cluster time ``at_ct`` where it was stopped."""

    stream: str
    node: int
    at_ct: float


@attrs.frozen
class SetSpeed:
    """Delta p: ``node`` delivers at ``speed`` x real time from cluster time ``at_ct`` on."""

    stream: str
    node: int
    speed: float
    at_ct: float


@attrs.frozen
class SendProbe:
    """Measure the round trip to ``node`` (answered by :class:`ProbeAnswered`)."""

    stream: str
    node: int
    token: int


@attrs.frozen
class RequestHandover:
    """Packets of ``node`` are overdue and it is silent (``node`` -1: owner unknown, the
    whole stream is silent): ask the stream's other nodes to serve the share holding
    global packet ``gseq`` from there on (YIMA HANDOVER, docs/wire.md)."""

    stream: str
    node: int
    gseq: int


Action = Deliver | SendNack | Pause | Resume | SetSpeed | SendProbe | RequestHandover
