"""Pure helpers of the merged listing: one mailbox tree from the fragments' trees,
and the failure plumbing of calls fanned out to several nodes."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import FirstError
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..values import MailboxInfo

__all__ = ["log_failures", "merge_trees", "unwrap"]

_log = Logger()


def merge_trees(trees: list[tuple[str, list[MailboxInfo]]]) -> list[MailboxInfo]:
    """One tree from the fragments': highest UIDNEXT, counts summed, the lowest
    UIDVALIDITY among the nodes holding messages in the mailbox (of all holders if
    none does), so an empty mailbox on a new home node does not change it, and as
    HIGHESTMODSEQ the highest given out, capped by the lowest bound (docs/mail.md,
    "Mod-sequences": every change made after the listing is above it)."""
    out: dict[str, MailboxInfo] = {}
    validity: dict[str, tuple[bool, int]] = {}
    highest: dict[str, int] = {}
    bound: dict[str, int] = {}
    for _, infos in trees:
        for i in infos:
            highest[i.name] = max(highest.get(i.name, 0), i.highestmodseq)
            if i.modseq_bound > 0:
                bound[i.name] = min(bound.get(i.name, i.modseq_bound), i.modseq_bound)
            key = (i.messages == 0, i.uidvalidity)  # holders with messages sort first
            validity[i.name] = min(validity.get(i.name, key), key)
            have = out.get(i.name)
            if have is None:
                out[i.name] = i
                continue
            out[i.name] = MailboxInfo(
                i.name,
                i.uidvalidity,
                max(have.uidnext, i.uidnext),
                have.messages + i.messages,
                have.unseen + i.unseen,
                have.subscribed and i.subscribed,
            )
    return [
        MailboxInfo(
            n,
            validity[n][1],
            out[n].uidnext,
            out[n].messages,
            out[n].unseen,
            out[n].subscribed,
            min(highest[n], bound.get(n, highest[n])),
            bound.get(n, 0),
        )
        for n in sorted(out)
    ]


def unwrap(f: Failure) -> Failure:
    """The first failure inside a ``gatherResults`` failure (else ``f`` itself)."""
    if isinstance(f.value, FirstError):
        sub: Failure = f.value.subFailure
        return sub
    return f


def log_failures(results: list[tuple[bool, Any]], value: Any) -> Any:
    """Log the failures a :class:`DeferredList` collected, then go on with ``value``."""
    for ok, result in results:
        if not ok:
            _log.failure("mailbox clean-up after delete failed", result)
    return value
