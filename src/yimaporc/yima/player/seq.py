"""RFC 1982 serial arithmetic for 16-bit RTP sequence numbers, extended to 64 bits."""

from __future__ import annotations

MOD = 1 << 16
HALF = 1 << 15


def seq_lt(a: int, b: int) -> bool:
    """True when 16-bit serial ``a`` precedes ``b`` (RFC 1982 section 3.2)."""
    return a != b and ((b - a) % MOD) < HALF


def extend_seq(last: int | None, seq16: int) -> int:
    """Extend ``seq16`` to the unbounded number nearest the extended ``last`` one.

    ``last`` is the previously extended number (None for the first packet).
    A step forward across 65535 -> 0 lands on the next cycle, a late packet
    from before the wrap lands on the previous one, so reordering and
    duplicates around the wrap keep their order.
    """
    if not 0 <= seq16 < MOD:
        raise ValueError(f"not a 16-bit sequence number: {seq16}")
    if last is None:
        return seq16
    delta = (seq16 - last) % MOD
    if delta >= HALF:
        delta -= MOD
    return last + delta


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
