"""Stream control actions: one vocabulary from the player's decision to the scheduler.

A player's flow control (:mod:`.player.flow`), its RTCP feedback (:mod:`.feedback`),
the RTSP node (PLAY, PAUSE, TEARDOWN, the relay's takeovers), the cluster RPC
(:class:`~.streaming.StreamControl`) and the delivery workers
(:class:`~._workerchannel.WorkerControl`) all speak :class:`StreamAction`.  On the
wire it stays the same ASCII word as before (``pause``, ``resume``, ``speed``,
``stop``), so nodes of older and newer versions keep talking; :class:`StreamActionArgument`
hands a handler the member, and a word this node does not know is an
:class:`~yimaporc.cluster.rpc.UnknownValue` (an ``UNKNOWN_VALUE`` error answer and the
RPC guard's ``refused_unknown_value`` counter, never a traceback).
"""

from __future__ import annotations

import enum

from twisted.protocols import amp

from ..cluster.rpc import UnknownValue

__all__ = ["StreamAction", "StreamActionArgument", "UnknownValue"]


class StreamAction(enum.StrEnum):
    """What a :class:`~.streaming.StreamControl` asks of a session's schedule."""

    #: Stop sending at cluster time ``at`` (``value`` > 0: the media position to stop at).
    PAUSE = "pause"
    #: Go on from where the pause left off, at cluster time ``at``.
    RESUME = "resume"
    #: Deliver at ``value`` times real time from cluster time ``at``.
    SPEED = "speed"
    #: Forget the session.
    STOP = "stop"


#: The longest action word (a longer one is refused before any decoding).
_LONGEST = max(len(a.value) for a in StreamAction)


class StreamActionArgument(amp.Argument):
    """An AMP argument carrying a :class:`StreamAction` as its ASCII word."""

    def toString(self, inObject: StreamAction) -> bytes:
        """The member's word (a plain string must name a member: ``ValueError`` else)."""
        return StreamAction(inObject).value.encode("ascii")

    def fromString(self, inString: bytes) -> StreamAction:
        """The member named by ``inString``; anything else is :class:`UnknownValue`."""
        if len(inString) <= _LONGEST:
            try:
                return StreamAction(inString.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                pass
        raise UnknownValue(f"unknown stream action {inString[:32]!r}")
