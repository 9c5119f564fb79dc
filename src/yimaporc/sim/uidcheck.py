"""The UID rules a mail client relies on, checked on every read (issue 14 item 1):
shared by the kernel's mail scenario (:mod:`yimaporc.sim.mail`) and the bench's mail cost
model (``bench/mailmodel``)."""

from __future__ import annotations

from collections import Counter

import attrs


@attrs.define
class UidChecker:
    """What IMAP/POP3 clients were shown, checked against issue 14 item 1 on every read:
    never two messages under one UID, a UID never reused or changed (a message once
    shown under a UID keeps it), every newly visible message above every UID already
    shown, UIDNEXT (per serving node) never lower; :meth:`MailSim.final_problems` adds
    "no acknowledged message hidden after the heal"."""

    violations: list[str] = attrs.field(factory=list)
    pairs: dict[str, set[tuple[str, int]]] = attrs.field(factory=dict)  # user -> (msg, uid)
    msg_of: dict[tuple[str, int], str] = attrs.field(factory=dict)  # (user, uid) -> msg
    top: dict[str, int] = attrs.field(factory=dict)  # user -> highest UID shown anywhere
    uidnext: dict[tuple[str, str], int] = attrs.field(factory=dict)  # (node, user) -> shown
    reads: int = 0
    refusals: int = 0
    refused_why: Counter[str] = attrs.field(factory=Counter)
    last_refusal: tuple[str, str, str] = ("", "", "")

    def read(self, node: str, user: str, listing: list[tuple[str, int]], uidnext: int) -> None:
        """A client at ``node`` was shown ``listing`` ((msg, uid) pairs) and ``uidnext``."""
        self.reads += 1
        bad = self.violations.append
        before = self.uidnext.get((node, user), 0)
        if uidnext < before:
            bad(f"{user} at {node}: UIDNEXT went down {before} -> {uidnext}")
        self.uidnext[(node, user)] = max(before, uidnext)
        by_uid: dict[int, str] = {}
        by_msg: dict[str, int] = {}
        for msg, uid in listing:
            if by_uid.setdefault(uid, msg) != msg:
                bad(f"{user} at {node}: two messages under UID {uid}: {by_uid[uid]}, {msg}")
            if by_msg.setdefault(msg, uid) != uid:
                bad(f"{user} at {node}: {msg} listed under two UIDs {by_msg[msg]} and {uid}")
            if not 0 < uid < uidnext:
                bad(f"{user} at {node}: UID {uid} outside 1..UIDNEXT {uidnext}")
        seen = self.pairs.setdefault(user, set())
        now = set(listing)
        for msg, uid in sorted(seen - now):
            bad(f"{user} at {node}: {msg} was shown as UID {uid}, now missing or changed")
        top = self.top.get(user, 0)
        for msg, uid in sorted(now - seen, key=lambda p: p[1]):
            if uid <= top:
                bad(f"{user} at {node}: {msg} newly visible as UID {uid} <= {top} shown")
            if self.msg_of.setdefault((user, uid), msg) != msg:
                bad(f"{user}: UID {uid} reused: {self.msg_of[(user, uid)]} then {msg}")
        seen |= now
        if now:
            self.top[user] = max(top, max(uid for _, uid in now))
