"""Calls to one peer, sent as batches while an earlier batch is out.

A :class:`CallBatcher` sends an item at once when nothing is on the way to that peer,
so an idle node adds no delay. While a batch is out, new items for the peer wait and
leave together when it answers, as one call per run of items of one kind (at most
``max_items`` each). Under load one RPC then carries many items: the RPC's fixed cost
(a box, its Deferreds, its timeout, a write and a read on each side) is paid per
batch. One batch per peer is out at a time and the queue is first in, first out, so
a peer handles the items in the order they were given, across kinds (a session's
stop never overtakes its start).

Each kind is a batch command that takes the items as an ``amp.AmpList`` argument and
answers one result per item, in order, as the AmpList ``results``; a result with a
non-empty ``error`` fails that item's Deferred with :class:`BatchItemFailed`. A failed
call fails every item of its batch.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.protocols import amp
from twisted.python.failure import Failure

from .interfaces import IRpcCaller


class BatchItemFailed(Exception):
    """The peer answered this item of a batch with an error (its text)."""


class CallBatcher:
    """Sends items to peers, one batch in flight per peer.

    ``kinds``: for each kind of item, its batch command and the name of the command's
    AmpList argument.
    """

    def __init__(
        self,
        rpc: IRpcCaller,
        kinds: dict[str, tuple[type[amp.Command], str]],
        max_items: int = 64,
    ) -> None:
        self.rpc = rpc
        self.kinds = kinds
        self.max_items = max_items
        self._waiting: dict[str, list[_Item]] = {}
        self._out: set[str] = set()
        #: Calls made and items sent (items / calls: the mean batch).
        self.calls = 0
        self.items = 0

    def call(self, address: str, kind: str, item: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """Send ``item`` of ``kind`` to ``address`` now or with the next batch; its result."""
        if kind not in self.kinds:
            raise KeyError(kind)
        d: Deferred[dict[str, Any]] = Deferred()
        self._waiting.setdefault(address, []).append((kind, item, d))
        if address not in self._out:
            self._send(address)
        return d

    def _send(self, address: str) -> None:
        queue = self._waiting.get(address)
        if not queue:
            self._waiting.pop(address, None)
            return
        kind = queue[0][0]
        n = 1
        while n < len(queue) and n < self.max_items and queue[n][0] == kind:
            n += 1
        batch, rest = queue[:n], queue[n:]
        if rest:
            self._waiting[address] = rest
        else:
            del self._waiting[address]
        self._out.add(address)
        self.calls += 1
        self.items += n
        command, arg = self.kinds[kind]
        sent = self.rpc.call(address, command, **{arg: [i for _, i, _ in batch]})
        sent.addCallbacks(
            self._answered,
            self._failed,
            callbackArgs=(address, batch),
            errbackArgs=(address, batch),
        )

    def _answered(self, answer: dict[str, Any], address: str, batch: list[_Item]) -> None:
        results = answer.get("results", [])
        self._next(address)
        for k, (_, _, d) in enumerate(batch):
            if k >= len(results):
                d.errback(BatchItemFailed(f"{address} answered {len(results)} of {len(batch)}"))
            elif results[k].get("error"):
                d.errback(BatchItemFailed(results[k]["error"]))
            else:
                d.callback(results[k])

    def _failed(self, failure: Failure, address: str, batch: list[_Item]) -> None:
        self._next(address)
        for _, _, d in batch:
            d.errback(failure)

    def _next(self, address: str) -> None:
        self._out.discard(address)
        if address in self._waiting:
            self._send(address)


_Item = tuple[str, dict[str, Any], Deferred[dict[str, Any]]]
