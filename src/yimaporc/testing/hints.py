"""Reconstruction hints in their wire form, for tests of a user manager.

A node's user manager takes decoded hints (:meth:`ClusterUserManager.receive` of a
:class:`~yimaporc.porcupine.reconstruct.BucketHint`); the wire's JSON lists are decoded
once, by the ``porcupine.hints`` command's :class:`~yimaporc.porcupine._cluster_wire.HintList`
argument.  Tests that write a hint as that list (``[bucket, epoch, [[user, has_mail,
uidnext, unnumbered]...], [record...], mark, [[user, node]...]]``) hand it over with
:func:`apply_hint`, which decodes it the same way.
"""

from __future__ import annotations

from typing import Any

from ..porcupine._cluster_wire import HintList
from ..porcupine.cluster import ClusterUserManager

__all__ = ["apply_hint"]


def apply_hint(
    manager: ClusterUserManager, sender: str, entry: list[Any], view: int | None = None
) -> bool:
    """Merge one bucket's hint, written as it travels, from ``sender`` (sent in view
    ``view``) as the ``porcupine.hints`` handler would: decoded by HintList (a
    malformed entry is dropped: False), then :meth:`ClusterUserManager.receive`
    (True if it counted)."""
    hints = HintList.decode([entry])
    return bool(hints) and manager.receive(sender, hints[0], view)
