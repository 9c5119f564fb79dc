"""How a command ends (:class:`Done`) and small helpers shared by the command runners."""

from __future__ import annotations

import attrs

from ._serialize import ResponseCode
from .interfaces import MailboxStatus


@attrs.frozen
class Done:
    """How a command ends: ``status [code] text``."""

    status: str = "OK"
    text: str = ""
    code: ResponseCode | None = None


def _code(name: str | ResponseCode | None) -> ResponseCode | None:
    if isinstance(name, ResponseCode):
        return name
    try:
        return ResponseCode(name) if name else None
    except ValueError:
        return None


def status_items(st: MailboxStatus, items: tuple[str, ...]) -> list[tuple[str, int]]:
    """STATUS items from a :class:`MailboxStatus`."""
    values = {
        "MESSAGES": st.messages, "RECENT": st.recent, "UIDNEXT": st.uidnext,
        "UIDVALIDITY": st.uidvalidity, "UNSEEN": st.unseen, "HIGHESTMODSEQ": st.highestmodseq,
        "SIZE": st.size, "DELETED": st.deleted,
    }  # fmt: skip
    return [(i, values[i]) for i in items]
