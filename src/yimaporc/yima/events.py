"""Log lines an operator acts on for Yima storage: parity lost.

:class:`ParityWatch` listens to membership: when a member that holds disks of the
catalog leaves the view, the blocks on its disks have no redundancy left (titles with
parity) or are gone (titles without), and it says so once, with what to do.
:meth:`ParityWatch.group_incomplete` is told when a block could not be rebuilt because
another block of its parity group is missing too (data lost until a node comes back),
and logs that once per title and group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from ..cluster.membership import IMembershipListener, View

__all__ = ["ParityWatch"]

#: Distinct (title, group) losses remembered so each is logged once.
MAX_REMEMBERED = 4096


@implementer(IMembershipListener)
class ParityWatch:
    """Logs parity losses; ``catalog()`` gives the current catalog (``disks``, ``media``)."""

    log = Logger()

    def __init__(self, catalog: Callable[[], Any]) -> None:
        self.catalog = catalog
        self._told: set[tuple[str, int]] = set()

    def membership_changed(self, old: View, new: View) -> None:
        """A member with disks left the view: its blocks lost their parity protection."""
        if not old.members:
            return
        cat = self.catalog()
        gone = set(old.node_ids) - set(new.node_ids)
        for node_id in sorted(gone):
            disks = sorted(d.disk_id for d in cat.disks if d.node_id == node_id)
            if not disks or not cat.media:
                continue
            titles = list(cat.media.values())
            protected = sum(1 for m in titles if m.parity_group > 0)
            bare = len(titles) - protected
            self.log.warn(
                "storage: parity lost: node {node} left with disk(s) {disks}: {p} title(s) "
                "now have no redundancy for their blocks there (a second failure in a parity "
                "group loses data) and {b} title(s) without parity lost those blocks; "
                "restart the node, or rebuild its disks elsewhere (yimaporc disks rebuild)",
                node=node_id,
                disks=",".join(disks),
                p=protected,
                b=bare,
                event="parity_lost",
            )

    def group_incomplete(self, media: str, group: int, block: str, why: str) -> None:
        """``block`` of ``media`` is missing and parity group ``group`` cannot rebuild it."""
        key = (media, group)
        if key in self._told:
            return
        if len(self._told) >= MAX_REMEMBERED:
            self._told.clear()
        self._told.add(key)
        self.log.error(
            "storage: parity lost: {media} block {block} is missing and parity group "
            "{group} cannot rebuild it ({why}); the title plays with a gap until the "
            "missing node or disk is back",
            media=media,
            block=block,
            group=group,
            why=why,
            event="parity_lost",
        )
