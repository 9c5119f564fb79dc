"""The player's view of RTP sequence numbers: extended to unbounded ones per source.

The RFC 1982 arithmetic itself is :mod:`yimaporc.rtp`'s (one implementation for
the server and the player).
"""

from __future__ import annotations

from ...rtp import SEQ_MOD, seq_lt, unwrap_seq

__all__ = ["SeqExtender", "extend_seq", "seq_lt"]


def extend_seq(last: int | None, seq16: int) -> int:
    """Extend ``seq16`` to the unbounded number nearest the extended ``last`` one.

    ``last`` is the previously extended number (None for the first packet).
    A step forward across 65535 -> 0 lands on the next cycle, a late packet
    from before the wrap lands on the previous one, so reordering and
    duplicates around the wrap keep their order.
    """
    if not 0 <= seq16 < SEQ_MOD:
        raise ValueError(f"not a 16-bit sequence number: {seq16}")
    if last is None:
        return seq16
    return unwrap_seq(last, seq16)


class SeqExtender:
    """Stateful :func:`extend_seq` for one RTP source (remembers the highest seen)."""

    def __init__(self) -> None:
        self.highest: int | None = None

    def extend(self, seq16: int) -> int:
        """The extended number of ``seq16``."""
        ext = extend_seq(self.highest, seq16)
        if self.highest is None or ext > self.highest:
            self.highest = ext
        return ext
