"""NTP-style estimation of the cluster's common time reference (sans-IO).

The reference is the member with the lowest address.  Every other member asks
it for the time (``TimeReq``/``TimeResp``) and keeps the offset of the sample
with the smallest round trip among the last few.  Answers carry the
responder's *cluster* time, so when the reference changes (it died, or a lower
address joined) the new reference keeps the offset it already had and
``cluster_time()`` does not jump.
"""

from __future__ import annotations

from collections import deque

import attrs

from .wire import Member, TimeReq, TimeResp


@attrs.frozen
class TimeSample:
    """One exchange: ``offset`` to add to local time, ``rtt`` it was measured with."""

    offset: float
    rtt: float


class ClockSync:
    """Estimates ``offset`` so that ``local_now + offset`` is the cluster time."""

    def __init__(
        self, me: str, interval: float = 1.0, fast_interval: float = 0.2, keep: int = 8
    ) -> None:
        self.me = me
        self.interval = interval
        self.fast_interval = fast_interval
        self.offset = 0.0
        self.reference: Member | None = None
        self.samples: deque[TimeSample] = deque(maxlen=keep)
        self._next = 0.0

    @property
    def synced(self) -> bool:
        """True once we are the reference or hold at least one sample from it."""
        return self.reference is None or bool(self.samples)

    @property
    def rtt(self) -> float | None:
        """Best round trip to the reference, if measured."""
        return min(s.rtt for s in self.samples) if self.samples else None

    def set_members(self, members: tuple[Member, ...], now: float) -> None:
        """Pick the reference (lowest address) among ``members``."""
        ref = min(members, key=lambda m: m.sort_key) if members else None
        if ref is not None and ref.node_id == self.me:
            ref = None
        if ref != self.reference:
            self.reference = ref
            self.samples.clear()
            self._next = now

    def next_deadline(self) -> float | None:
        """When :meth:`tick` wants to run next."""
        return None if self.reference is None else self._next

    def tick(self, now: float) -> list[tuple[str, TimeReq]]:
        """Requests to send: ``(address, TimeReq)``."""
        if self.reference is None or now < self._next:
            return []
        self._next = now + (self.fast_interval if len(self.samples) < 4 else self.interval)
        return [(self.reference.address, TimeReq(now))]

    def answer(self, req: TimeReq, now: float) -> TimeResp:
        """Our answer to a request that arrived at local time ``now``."""
        t = now + self.offset
        return TimeResp(req.t1, t, t)

    def on_response(self, sender: str, resp: TimeResp, now: float) -> None:
        """Fold in a response from the reference received at local time ``now``."""
        if self.reference is None or sender != self.reference.node_id:
            return
        rtt = (now - resp.t1) - (resp.t3 - resp.t2)
        if rtt < 0 or now < resp.t1:
            return
        offset = ((resp.t2 - resp.t1) + (resp.t3 - now)) / 2
        self.samples.append(TimeSample(offset, rtt))
        self.offset = min(self.samples, key=lambda s: s.rtt).offset
