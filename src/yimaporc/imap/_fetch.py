"""FETCH and SEARCH of the selected mailbox.

FETCH loads message octets only when an item needs them, sets ``\\Seen`` for
non-PEEK body fetches of a writable mailbox (and then includes FLAGS),
filters by ``CHANGEDSINCE`` and reports ``VANISHED (EARLIER)`` for UID FETCH
with QRESYNC.  The answer is produced in batches (:data:`BATCH_MESSAGES`,
:data:`BATCH_OCTETS`): each batch is loaded, serialised and flushed, and the
next one waits for :meth:`CommandRunner.writable`, so one command's output held
in memory is bounded by a batch plus the transport's buffer.  SEARCH hands the token list to the backend's evaluator and
answers SEARCH or ESEARCH (RFC 4731).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed

from . import _commands as c
from . import _serialize as s
from ._message import Message, UnknownEncoding, binary_content
from ._outcome import Done
from ._search import SearchError, compile_search
from ._serialize import ResponseCode
from ._view import absent_uids, uid_set_text
from .interfaces import ImapError, MessageInfo

if TYPE_CHECKING:
    from ._session import CommandRunner


def _needs_body(item: c.FetchItem) -> bool:
    return isinstance(item, c.BodySection | c.BinarySection) or item.name in (
        "ENVELOPE", "BODY", "BODYSTRUCTURE", "RFC822", "RFC822.HEADER", "RFC822.TEXT",
    )  # fmt: skip


def _sets_seen(item: c.FetchItem) -> bool:
    if isinstance(item, c.BodySection):
        return not item.peek
    if isinstance(item, c.BinarySection):
        return not (item.peek or item.size)
    return item.name in ("RFC822", "RFC822.TEXT")


def answer_fetch(runner: CommandRunner, cmd: c.Fetch) -> Deferred[Done]:
    """Send the FETCH data of ``cmd``."""
    view = runner.view
    assert view is not None
    uids = view.resolve(cmd.sequence_set, cmd.uid)
    wants_flags = any(isinstance(i, c.FetchAtt) and i.name == "FLAGS" for i in cmd.items)
    # Other sessions' changes first, so FLAGS are current (Dovecot syncs before FETCH
    # too); the messages fetched get their new flags in their own FETCH response.
    d = runner.refresh(cmd.uid, skip=frozenset(uids) if wants_flags else frozenset())
    if cmd.vanished and cmd.changed_since is not None and "QRESYNC" in runner.enabled:
        since = cmd.changed_since
        d.addCallback(lambda _: runner.expunged_before(since))
        return d.addCallback(lambda old: _fetch(runner, cmd, uids, old))
    return d.addCallback(lambda _: _fetch(runner, cmd, uids))


def _fetch(runner: CommandRunner, cmd: c.Fetch, uids: list[int], old: Any = ()) -> Any:
    view = runner.view
    box = runner.mailbox
    if view is None or box is None:
        raise ImapError("mailbox closed meanwhile")
    uids = [u for u in uids if view.seq_of(u) is not None]
    items = list(cmd.items)
    if any(isinstance(i, c.BinarySection) for i in items) and "BINARY" not in (
        runner.capabilities(True)
    ):
        raise ImapError("BINARY is not supported", status="BAD")
    names = {i.name for i in items if isinstance(i, c.FetchAtt)}
    if cmd.uid and "UID" not in names:
        items.insert(0, c.FetchAtt("UID"))
    if cmd.changed_since is not None or "MODSEQ" in names:
        runner.condstore = True
        if "MODSEQ" not in names:
            items.append(c.FetchAtt("MODSEQ"))
    if cmd.vanished:
        if "QRESYNC" not in runner.enabled:
            raise ImapError("QRESYNC is not enabled", status="BAD")
        present = [m.uid for m in view.messages]
        gone = absent_uids(cmd.sequence_set, present, view.uidnext, old)
        if gone:
            runner.conn.send(s.vanished(gone, earlier=True))
    if cmd.changed_since is not None:
        since = cmd.changed_since
        uids = [u for u in uids if (view.info(u) or MessageInfo(u, (), 0, 0)).modseq > since]
    if not uids:
        return succeed(Done())
    seen_needed = not box.readonly and any(_sets_seen(i) for i in items)
    d: Deferred[Any] = succeed(None)
    marked: set[int] = set()
    if seen_needed:
        unseen = [
            u for u in uids if "\\Seen" not in (view.info(u) or MessageInfo(u, (), 0, 0)).flags
        ]
        if unseen:
            marked = set(unseen)
            d = maybeDeferred(box.store, unseen, "+", ("\\Seen",), None)
    bodies_needed = any(_needs_body(i) for i in items)

    def send(batch: list[int], raws: dict[int, bytes]) -> None:
        for uid in batch:
            info = view.info(uid)
            seq = view.seq_of(uid)
            if info is None or seq is None or (bodies_needed and uid not in raws):
                continue  # expunged meanwhile
            flags = info.flags
            if uid in marked:
                flags = (*flags, "\\Seen")
                view.set_flags(uid, flags, info.modseq)
            out: list[tuple[str, Any]] = []
            for item in items:
                out.append(_item(runner, item, info, flags, raws.get(uid)))
            if uid in marked and "FLAGS" not in names:
                out.append(("FLAGS", flags))
            runner.conn.send(s.fetch(seq, out))

    batches = deque(_batches(view, uids, bodies_needed))

    def next_batch(_: object = None) -> Any:
        # One batch loaded, serialised and written at a time; the next waits until the
        # transport has room (a client that stops reading stops the FETCH, not the node).
        if not batches:
            return Done()
        batch = batches.popleft()
        if runner.mailbox is not box:
            raise ImapError("mailbox closed meanwhile")
        loaded = maybeDeferred(box.load, batch) if bodies_needed else succeed({})

        def sent(raws: dict[int, bytes]) -> Any:
            send(batch, raws)
            if not batches:
                return Done()
            runner.flush()
            return runner.writable().addCallback(next_batch)

        return loaded.addCallback(sent)

    return d.addCallback(next_batch)


#: FETCH output is produced in batches of at most this many messages ...
BATCH_MESSAGES = 256
#: ... and, when message octets are needed, about this many octets (RFC822.SIZE
#: sum; a single larger message is one batch of its own).
BATCH_OCTETS = 1 << 20


def _batches(view: Any, uids: list[int], bodies: bool) -> list[list[int]]:
    out: list[list[int]] = []
    batch: list[int] = []
    size = 0
    for uid in uids:
        info = view.info(uid)
        octets = info.size if (bodies and info is not None) else 0
        if batch and (len(batch) >= BATCH_MESSAGES or size + octets > BATCH_OCTETS):
            out.append(batch)
            batch, size = [], 0
        batch.append(uid)
        size += octets
    if batch:
        out.append(batch)
    return out


def _item(runner: CommandRunner, item: c.FetchItem, info: MessageInfo, flags: tuple[str, ...], raw: bytes | None) -> tuple[str, Any]:  # fmt: skip
    if isinstance(item, c.FetchAtt):
        name = item.name
        if name == "FLAGS":
            return name, flags
        if name == "UID":
            return name, info.uid
        if name == "RFC822.SIZE":
            return name, info.size
        if name == "INTERNALDATE":
            return name, info.internal_date
        if name == "MODSEQ":
            return name, info.modseq
    assert raw is not None
    if isinstance(item, c.BinarySection):
        return item.echo, _binary(raw, item)
    return item.echo, runner.renderer.render(raw, item, info.internal_date)


def _binary(raw: bytes, item: c.BinarySection) -> bytes | int | None:
    try:
        data = binary_content(Message(raw).root, item.part)
    except UnknownEncoding as e:
        raise ImapError(f"unknown Content-Transfer-Encoding {e}", "UNKNOWN-CTE") from None
    if item.size:
        return 0 if data is None else len(data)
    if data is not None and item.partial is not None:
        data = data[item.partial[0] : item.partial[0] + item.partial[1]]
    return data


def answer_search(runner: CommandRunner, cmd: c.Search) -> Deferred[Done]:
    """Send the SEARCH or ESEARCH data of ``cmd`` (and keep its result for ``$`` when
    it says ``RETURN (SAVE)``)."""
    view = runner.view
    assert view is not None and runner.mailbox is not None
    saving = cmd.returns is not None and "SAVE" in cmd.returns
    # ``$`` in the keys is the previous result, even in a SEARCH that saves anew.
    criteria = with_saved_result(cmd.criteria, view.resolve("$", True))
    if saving:
        view.saved = []  # a failing SEARCH (SAVE) leaves $ empty (RFC 5182 2.1)
    if cmd.charset is not None and cmd.charset not in ("UTF-8", "US-ASCII"):
        raise ImapError("unsupported charset", ResponseCode("BADCHARSET", ("US-ASCII", "UTF-8")))
    messages = list(view.messages)
    try:  # a MODSEQ key enables CONDSTORE and adds the highest MODSEQ found (RFC 7162 3.1.5)
        uses_modseq = compile_search(list(criteria), cmd.charset).uses_modseq
    except SearchError:
        uses_modseq = False  # the backend's search answers the error
    if uses_modseq:
        runner.condstore = True

    def got(uids: list[int]) -> Done:
        wanted = set(uids)
        found = [(i + 1, m.uid) for i, m in enumerate(messages) if m.uid in wanted]
        numbers = [uid if cmd.uid else seq for seq, uid in found]
        top = None
        if uses_modseq and found:
            top = max(m.modseq for m in messages if m.uid in wanted)
        if cmd.returns is None:
            runner.conn.send(s.search(numbers, top))
            return Done()
        opts = [o for o in cmd.returns if o != "SAVE"] or ([] if saving else ["ALL"])
        if saving:
            view.saved = _saved(found, opts)
        if not opts:  # RETURN (SAVE) alone: nothing untagged (RFC 5182 2.4)
            return Done()
        items: list[tuple[str, int | str]] = []
        if "MIN" in opts and numbers:
            items.append(("MIN", min(numbers)))
        if "MAX" in opts and numbers:
            items.append(("MAX", max(numbers)))
        if "COUNT" in opts:
            items.append(("COUNT", len(numbers)))
        if "ALL" in opts and numbers:
            items.append(("ALL", uid_set_text(numbers)))
        if top is not None:
            items.append(("MODSEQ", top))
        runner.conn.send(s.esearch(cmd.tag, cmd.uid, items))
        return Done()

    return maybeDeferred(runner.mailbox.search, criteria, cmd.charset, messages).addCallback(got)


def _saved(found: list[tuple[int, int]], opts: list[str]) -> list[int]:
    """What ``$`` keeps (RFC 5182 2.4): with MIN and/or MAX alone only those messages,
    else every message found."""
    uids = [uid for _, uid in found]
    if not uids or not opts or {"ALL", "COUNT"} & set(opts):
        return uids
    keep = ([uids[0]] if "MIN" in opts else []) + ([uids[-1]] if "MAX" in opts else [])
    return sorted(set(keep))


#: SEARCH keys followed by that many arguments (NOT/OR take keys; HEADER two strings;
#: MODSEQ one or three, see :func:`with_saved_result`).
_KEY_ARGS = dict.fromkeys(
    ("BCC", "BEFORE", "BODY", "CC", "FROM", "KEYWORD", "ON", "SENTBEFORE", "SENTON",
     "SENTSINCE", "SINCE", "SUBJECT", "TEXT", "TO", "UNKEYWORD", "LARGER", "SMALLER",
     "OLDER", "YOUNGER"), 1,
) | {"HEADER": 2}  # fmt: skip


def with_saved_result(tokens: tuple[Any, ...], saved: list[int]) -> tuple[Any, ...]:
    """SEARCH keys with ``$`` and ``UID $`` (SEARCHRES) replaced by the saved UIDs, so the
    backend's evaluator never sees ``$``; anything else stays as it was."""
    out: list[Any] = []
    saved_key: list[Any] = ["UID", uid_set_text(saved)] if saved else ["NOT", "ALL"]
    i, n = 0, len(tokens)

    def copy(count: int) -> None:
        nonlocal i
        out.extend(tokens[i : i + count])
        i += count

    def key() -> None:
        nonlocal i
        tok = tokens[i]
        if isinstance(tok, list):
            out.append(list(with_saved_result(tuple(tok), saved)))
            i += 1
            return
        if not isinstance(tok, str):
            copy(1)
            return
        name = tok.upper()
        if tok == "$" or (name == "UID" and i + 1 < n and tokens[i + 1] == "$"):
            out.append(saved_key)
            i += 1 if tok == "$" else 2
            return
        copy(1)
        if name in ("NOT", "OR"):
            return  # their operands are the keys that follow: the loop reads them
        if name == "MODSEQ":
            copy(3 if i < n and isinstance(tokens[i], bytes) else 1)
        else:
            copy(_KEY_ARGS.get(name, 1 if name == "UID" else 0))

    while i < n:
        key()
    return tuple(out)
