"""RFC 1982 serial arithmetic on 16-bit RTP sequence numbers (the one implementation)."""

from __future__ import annotations

# --- RFC 1982 serial arithmetic on 16-bit sequence numbers ---------------------------

SEQ_MOD = 1 << 16
SEQ_HALF = 1 << 15
SEQ_MASK = SEQ_MOD - 1


def seq_add(a: int, n: int) -> int:
    """``a + n`` in 16-bit sequence space (``n`` may be negative)."""
    return (a + n) & SEQ_MASK


def seq_diff(a: int, b: int) -> int:
    """Signed distance from ``a`` to ``b``: ``seq_add(a, seq_diff(a, b)) == b``.

    In ``[-32768, 32767]``; ``-32768`` means the order is undefined (RFC 1982 §3.2).
    """
    d = (b - a) & SEQ_MASK
    return d - SEQ_MOD if d >= SEQ_HALF else d


def seq_lt(a: int, b: int) -> bool:
    """True when ``a`` precedes ``b`` (RFC 1982 §3.2; false both ways at distance 2**15)."""
    return 0 < ((b - a) & SEQ_MASK) < SEQ_HALF


def seq_gt(a: int, b: int) -> bool:
    """True when ``a`` follows ``b``."""
    return seq_lt(b, a)


def unwrap_seq(reference: int, seq16: int) -> int:
    """The extended (unbounded) number congruent to ``seq16`` nearest ``reference``.

    ``reference`` is an already extended number (e.g. the highest seen), so
    ``unwrap_seq(65535, 0) == 65536`` and ``unwrap_seq(65536, 65535) == 65535``.
    """
    if not 0 <= seq16 <= SEQ_MASK:
        raise ValueError(f"not a 16-bit sequence number: {seq16}")
    return reference + seq_diff(reference & SEQ_MASK, seq16)


class SeqUnwrapper:
    """Extends the 16-bit sequence numbers of one source to 64-bit ones.

    The first number seen starts at ``cycles * 65536 + seq``; later numbers are
    placed nearest the highest seen, so a late packet from before a wrap keeps
    its order.  ``cycles`` defaults to 1 so a packet just before the first one
    (across 0 -> 65535) still extends to a non-negative number.
    """

    def __init__(self, cycles: int = 1) -> None:
        self._cycles = cycles
        self.highest: int | None = None

    def unwrap(self, seq16: int) -> int:
        """The extended number of ``seq16``; remembers the highest."""
        if self.highest is None:
            if not 0 <= seq16 <= SEQ_MASK:
                raise ValueError(f"not a 16-bit sequence number: {seq16}")
            self.highest = ext = (self._cycles << 16) | seq16
            return ext
        ext = unwrap_seq(self.highest, seq16)
        if ext > self.highest:
            self.highest = ext
        return ext
