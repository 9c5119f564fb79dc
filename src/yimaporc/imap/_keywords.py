"""Bounds on IMAP keywords (flags without a backslash), checked before anything is
stored: a STORE or APPEND past one is ``NO [LIMIT]`` (RFC 9051 7.1) as a whole.

Unbounded, a client could add keywords without end (``STORE 1:* +FLAGS (k1 ... k4000)``
again and again): every digest, snapshot and ``FETCH FLAGS`` of the mailbox grows
with them.  The mailbox bound is checked against the session's view (another
session's change made meanwhile may pass it by one command's keywords).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from .interfaces import ImapError, MessageInfo


@attrs.frozen
class KeywordLimits:
    """``length``: octets of one keyword (Dovecot's ``mail_max_keyword_length``);
    ``per_message``: keywords on one message; ``per_mailbox``: distinct keywords in
    one mailbox (its PERMANENTFLAGS list ``\\*`` only while below it)."""

    length: int = 50
    per_message: int = 64
    per_mailbox: int = 512


DEFAULT_KEYWORD_LIMITS = KeywordLimits()


def keywords(flags: Iterable[str]) -> set[str]:
    """The keywords among ``flags``, case-folded (IMAP flags are case-insensitive)."""
    return {f.lower() for f in flags if not f.startswith("\\")}


def mailbox_keywords(messages: Iterable[MessageInfo]) -> set[str]:
    """The distinct keywords on ``messages``."""
    out: set[str] = set()
    for m in messages:
        if m.flags:
            out |= keywords(m.flags)
    return out


def may_create(limits: KeywordLimits, messages: Iterable[MessageInfo]) -> bool:
    """True while a new keyword can still be added to the mailbox (``\\*``)."""
    return len(mailbox_keywords(messages)) < limits.per_mailbox


def _limit(text: str) -> ImapError:
    return ImapError(text, "LIMIT")


def check_new(limits: KeywordLimits, flags: Iterable[str]) -> set[str]:
    """The keywords of ``flags`` for one message (APPEND, or STORE's replace): ImapError
    ``NO [LIMIT]`` for one too long or too many."""
    new = keywords(flags)
    if any(len(k.encode("utf-8")) > limits.length for k in new):
        raise _limit(f"keywords are limited to {limits.length} octets")
    if len(new) > limits.per_message:
        raise _limit(f"at most {limits.per_message} keywords per message")
    return new


def check_store(
    limits: KeywordLimits, mode: str, flags: Iterable[str], targets: list[MessageInfo],
    messages: Iterable[MessageInfo],
) -> None:  # fmt: skip
    """STORE ``mode`` (``""``, ``"+"``, ``"-"``) of ``flags`` on ``targets``, with the
    mailbox's ``messages`` (the session's view): ImapError ``NO [LIMIT]`` if a message
    or the mailbox would pass a bound.  Removing is never refused."""
    if mode == "-":
        return
    new = check_new(limits, flags) if mode == "" else keywords(flags)
    if not new:
        return
    if mode == "+":
        if any(len(k.encode("utf-8")) > limits.length for k in new):
            raise _limit(f"keywords are limited to {limits.length} octets")
        for m in targets:
            old = keywords(m.flags)
            if not new <= old and len(old | new) > limits.per_message:
                raise _limit(f"at most {limits.per_message} keywords per message")
    check_mailbox(limits, new, messages)


def check_mailbox(limits: KeywordLimits, new: set[str], messages: Iterable[MessageInfo]) -> None:
    """ImapError ``NO [LIMIT]`` if keywords ``new`` would take the mailbox of ``messages``
    past its bound of distinct keywords (one it already passed keeps its own)."""
    known = mailbox_keywords(messages) if new else set()
    if not new <= known and len(known | new) > limits.per_mailbox:
        raise _limit(f"at most {limits.per_mailbox} distinct keywords per mailbox")
