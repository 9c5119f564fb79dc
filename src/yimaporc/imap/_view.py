"""A session's view of its selected mailbox, and LIST pattern matching.

:class:`MailboxView` holds what the client was told (sequence numbers, flags,
MODSEQs) and turns a fresh :class:`~.interfaces.Snapshot` into the untagged
updates that bring the client in step: EXPUNGE (or VANISHED under QRESYNC),
EXISTS, FETCH FLAGS.  Expunges are withheld while a non-UID FETCH, STORE or
SEARCH runs (RFC 3501 7.4.1).
"""

from __future__ import annotations

import base64
import bisect
from collections.abc import Iterable

from . import _serialize as s
from .interfaces import ImapError, MessageInfo, Snapshot


def uid_set_text(uids: Iterable[int]) -> str:
    """``1:3,7`` for UIDs (sorted, runs joined)."""
    out: list[str] = []
    start = prev = None
    for u in sorted(set(uids)):
        if prev is not None and u == prev + 1:
            prev = u
            continue
        if start is not None:
            out.append(str(start) if start == prev else f"{start}:{prev}")
        start = prev = u
    if start is not None:
        out.append(str(start) if start == prev else f"{start}:{prev}")
    return ",".join(out)


def absent_uids(
    text: str, present: list[int], uidnext: int, gone_before: Iterable[int] = ()
) -> str:
    """The UIDs a UID set names below ``uidnext`` that are not in ``present`` (sorted),
    as set text, in O(len(present)) whatever the ranges' width (VANISHED (EARLIER));
    ``gone_before``: UIDs known to have been expunged before the client's mod-sequence,
    left out too (QRESYNC reports only what went since; what the backend cannot vouch
    for is reported, which RFC 7162 allows)."""
    extra = list(gone_before)
    if extra:
        present = sorted({*present, *extra})
    top = uidnext - 1
    gaps: list[tuple[int, int]] = []
    for lo, hi in _ranges(text, top):
        lo, hi = max(lo, 1), min(hi, top)
        if lo > hi:
            continue
        a, b = bisect.bisect_left(present, lo), bisect.bisect_right(present, hi)
        cur = lo
        for u in present[a:b]:
            if u > cur:
                gaps.append((cur, u - 1))
            cur = u + 1
        if cur <= hi:
            gaps.append((cur, hi))
    gaps.sort()
    merged: list[tuple[int, int]] = []
    for a, b in gaps:
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return ",".join(str(a) if a == b else f"{a}:{b}" for a, b in merged)


def _ranges(text: str, star: int) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        lo_s, _, hi_s = item.partition(":")
        lo = star if lo_s == "*" else int(lo_s)
        hi = lo if not hi_s else (star if hi_s == "*" else int(hi_s))
        out.append((min(lo, hi), max(lo, hi)))
    return out


class MailboxView:
    """What one session has shown of its selected mailbox."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.messages: list[MessageInfo] = list(snapshot.messages)
        self.uidnext = snapshot.uidnext
        self.highestmodseq = snapshot.highestmodseq
        self._last: Snapshot | None = snapshot
        #: SEARCHRES (RFC 5182): the UIDs the last ``SEARCH RETURN (SAVE)`` found; a new
        #: view (SELECT/EXAMINE) starts empty, expunged UIDs drop out in :meth:`resolve`.
        self.saved: list[int] = []
        self._reindex()

    def _reindex(self) -> None:
        self._index = {m.uid: i for i, m in enumerate(self.messages)}
        self._uids = [m.uid for m in self.messages]  # ascending, as UIDs are in IMAP

    def __len__(self) -> int:
        return len(self.messages)

    def seq_of(self, uid: int) -> int | None:
        """The sequence number of ``uid`` (None if not in the view)."""
        i = self._index.get(uid)
        return None if i is None else i + 1

    def info(self, uid: int) -> MessageInfo | None:
        """The view's record of ``uid``."""
        i = self._index.get(uid)
        return None if i is None else self.messages[i]

    def resolve(self, text: str, uid: bool) -> list[int]:
        """The UIDs a sequence set names, in sequence order.

        Sequence numbers beyond the view are a client error (BAD); UID ranges
        name the UIDs present (``*`` is the highest, RFC 3501 6.4.8).
        """
        if text == "$":  # SEARCHRES: the saved result, less what was expunged since
            return [u for u in self.saved if u in self._index]
        if uid:
            if not self.messages:
                return []
            uids = self._uids
            picked: set[int] = set()
            for lo, hi in _ranges(text, uids[-1]):
                a, b = bisect.bisect_left(uids, lo), bisect.bisect_right(uids, hi)
                if b - a == len(uids):
                    return list(uids)
                picked.update(uids[a:b])
            return sorted(picked)
        n = len(self.messages)
        ranges = _ranges(text, n)
        if n == 0 or any(hi > n or lo < 1 for lo, hi in ranges):
            raise ImapError("no such message", status="BAD")
        seqs: set[int] = set()
        for lo, hi in ranges:
            seqs.update(range(lo, hi + 1))
        return [self._uids[i - 1] for i in sorted(seqs)]

    def set_flags(self, uid: int, flags: tuple[str, ...], modseq: int) -> None:
        """Record flags the client was just told."""
        i = self._index.get(uid)
        if i is not None:
            m = self.messages[i]
            self.messages[i] = MessageInfo(m.uid, flags, m.size, m.internal_date, modseq)
            self._last = None

    def update(
        self,
        snapshot: Snapshot,
        allow_expunge: bool = True,
        vanished: bool = False,
        modseq: bool = False,
        silent: frozenset[int] = frozenset(),
        skip: frozenset[int] = frozenset(),
    ) -> list[s.Data]:
        """Responses that bring the client from the view to ``snapshot``; the view follows.

        ``vanished``: report expunges as ``VANISHED`` (QRESYNC enabled);
        ``modseq``: FETCH updates carry MODSEQ (CONDSTORE enabled); ``silent``:
        UIDs whose flag change the client asked not to hear of (STORE .SILENT);
        ``skip``: UIDs whose new flags the command itself is about to send (FETCH).
        """
        if snapshot is self._last:
            return []  # the backend says nothing changed since the last look
        self._last = snapshot
        out: list[s.Data] = []
        current = {m.uid: m for m in snapshot.messages}
        if allow_expunge:
            gone = [i for i, m in enumerate(self.messages) if m.uid not in current]
            if gone:
                if vanished:
                    out.append(s.vanished(uid_set_text(self.messages[i].uid for i in gone)))
                else:
                    # Highest first: each EXPUNGE leaves lower numbers unchanged.
                    out += [s.expunge(i + 1) for i in reversed(gone)]
                self.messages = [m for m in self.messages if m.uid in current]
                self._reindex()
        for i, m in enumerate(self.messages):
            new = current.get(m.uid)
            if new is None or (set(new.flags) == set(m.flags) and new.modseq == m.modseq):
                continue
            self.messages[i] = new
            changed = set(new.flags) != set(m.flags)
            if new.uid in skip:
                continue
            if (changed and new.uid not in silent) or (modseq and new.uid in silent):
                items: list[tuple[str, object]] = [("FLAGS", new.flags), ("UID", new.uid)]
                if modseq:
                    items.append(("MODSEQ", new.modseq))
                out.append(s.fetch(i + 1, items))
        known_max = self.messages[-1].uid if self.messages else 0
        added = [m for m in snapshot.messages if m.uid > known_max and m.uid not in self._index]
        if added:
            self.messages += added
            self._reindex()
            out.append(s.exists(len(self.messages)))
        self.uidnext = max(self.uidnext, snapshot.uidnext)
        self.highestmodseq = max(self.highestmodseq, snapshot.highestmodseq)
        return out


def pattern_match(pattern: str, name: str, delimiter: str) -> bool:
    """LIST wildcard match in O(len(pattern) * len(name)): ``*`` any, ``%`` no delimiter;
    the ``INBOX`` of a name in INBOX's hierarchy matches in any case (``inbox*``)."""
    fold = 5 if name == "INBOX" or name.startswith("INBOX" + delimiter) else 0
    # prev[j]: pattern[:i] matches name[:j]
    prev = [True] + [False] * len(name)
    for p in pattern:
        cur = [False] * (len(name) + 1)
        if p == "*":
            seen = False
            for j in range(len(name) + 1):
                seen = seen or prev[j]
                cur[j] = seen
        elif p == "%":
            run = False
            for j in range(len(name) + 1):
                if j > 0 and name[j - 1] == delimiter:
                    run = False
                run = run or prev[j]
                cur[j] = run
        else:
            for j in range(1, len(name) + 1):
                c = name[j - 1]
                cur[j] = prev[j - 1] and (c == p or (j <= fold and c == p.upper()))
        prev = cur
    return prev[len(name)]


def normalise_inbox(name: str, delimiter: str) -> str:
    """``inbox`` and ``InBox/x`` -> ``INBOX`` and ``INBOX/x`` (INBOX is case-insensitive)."""
    head, sep, rest = name.partition(delimiter)
    if head.upper() == "INBOX":
        return "INBOX" + sep + rest
    return name


_MUTF7_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,"
_MUTF7_B64 = frozenset(_MUTF7_ALPHABET)


def valid_mailbox_name(name: str) -> bool:
    """``name`` is modified UTF-7 (RFC 3501 5.1.3): printable ASCII, ``&-`` for ``&``,
    ``&...-`` runs of modified base64 holding UTF-16 of non-ASCII characters only.
    Raw 8-bit names are refused (without UTF8=ACCEPT), as Dovecot does."""
    i = 0
    while i < len(name):
        ch = name[i]
        if not " " <= ch <= "~":
            return False
        if ch != "&":
            i += 1
            continue
        end = name.find("-", i + 1)
        if end < 0:
            return False
        run = name[i + 1 : end]
        i = end + 1
        if not run:
            continue
        if not set(run) <= _MUTF7_B64:
            return False
        acc, bits, raw = 0, 0, bytearray()
        for b in run:
            acc = ((acc << 6) | _MUTF7_ALPHABET.index(b)) & 0xFFFF
            bits += 6
            if bits >= 8:
                bits -= 8
                raw.append((acc >> bits) & 0xFF)
        if bits >= 6 or acc & ((1 << bits) - 1) or len(raw) % 2:
            return False
        try:
            text = raw.decode("utf-16-be")
        except UnicodeDecodeError:
            return False
        if any(" " <= t <= "~" for t in text):
            return False
    return True


def mutf7_encode(name: str) -> str:
    """A Unicode mailbox name as modified UTF-7 (RFC 3501 5.1.3): what the backends
    store; UTF8=ACCEPT clients send and receive the Unicode form."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            data = "".join(run).encode("utf-16-be")
            b64 = base64.b64encode(data).decode("ascii").rstrip("=").replace("/", ",")
            out.append("&" + b64 + "-")
            run.clear()

    for ch in name:
        if " " <= ch <= "~":
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    flush()
    return "".join(out)


def mutf7_decode(name: str) -> str:
    """A modified UTF-7 mailbox name as Unicode (a name that is not valid modified
    UTF-7 is returned unchanged)."""
    if "&" not in name or not valid_mailbox_name(name):
        return name
    out: list[str] = []
    i = 0
    while i < len(name):
        ch = name[i]
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = name.index("-", i + 1)
        run = name[i + 1 : end].replace(",", "/")
        out.append(
            "&" if not run else base64.b64decode(run + "=" * (-len(run) % 4)).decode("utf-16-be")
        )
        i = end + 1
    return "".join(out)
