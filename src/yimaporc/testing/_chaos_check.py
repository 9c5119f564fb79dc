"""The chaos run's records (faults, phases, acknowledgements, reads) and its checker:
issue 14's invariants over a run's history (:func:`evaluate`), the report table
and the fault schedules (:mod:`yimaporc.testing.chaos`)."""

from __future__ import annotations

import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import attrs


@attrs.frozen
class User:
    """A mailbox owner with its replica count."""

    address: str
    password: str
    replicas: int


@attrs.frozen
class Fault:
    """One step of a schedule: ``kind`` held ``hold`` seconds, then healed."""

    kind: str
    hold: float


@attrs.define
class Phase:
    """What happened during one fault (from its start to the next fault's start)."""

    kind: str
    detail: str
    start: float
    heal: float = 0.0
    #: Seconds from each heal (a rolling restart has one per node) to one view.
    to_one_view: list[float | None] = attrs.field(factory=list)
    #: Seconds from the (last) heal until every message acknowledged during the
    #: fault (for partitions: by the minority side) is listed at every node; None if
    #: not within the wait.
    visible_after: float | None = None
    minority: list[int] = attrs.field(factory=list)
    #: Acknowledged while this phase lasted, per node that gave the 250.
    acked_by_node: dict[str, int] = attrs.field(factory=dict)


@attrs.frozen
class Ack:
    """A 250: ``marker`` for ``user``, through node ``node``, while phase ``phase``."""

    marker: str
    user: str
    node: int
    t: float
    phase: int


@attrs.frozen
class Poll:
    """One IMAP STATUS answer."""

    t: float
    user: str
    node: int
    uidnext: int
    uidvalidity: int
    messages: int
    phase: int


@attrs.frozen
class Read:
    """One IMAP listing of INBOX: UID -> markers found under it (more than one is a
    violation)."""

    t: float
    user: str
    node: int
    uids: dict[int, tuple[str, ...]]
    phase: int


def log_criticals(path: Path) -> dict[str, int]:
    """Critical log events and unhandled errors in a node's log (tracebacks a run
    provoked), by logger."""
    out: dict[str, int] = defaultdict(int)
    if path.exists():
        for m in re.finditer(
            r"\[([\w.]+)#critical\]|\] (Unhandled Error)", path.read_text(errors="replace")
        ):
            out[m.group(1) or m.group(2)] += 1
    return dict(out)


@attrs.frozen
class History:
    """What the nemesis did and the clients saw during a run."""

    phases: list[Phase]
    acks: list[Ack]
    attempts: dict[int, int]
    polls: list[Poll]
    reads: list[Read]


@attrs.frozen
class Final:
    """The listings read at every node after the heal: ``(node, user)`` -> IMAP UID
    listing / POP3 (UIDL, marker) list, None where refused."""

    t: float
    imap: dict[tuple[int, str], dict[int, tuple[str, ...]] | None]
    pop3: dict[tuple[int, str], list[tuple[str, str]] | None]


def evaluate(h: History, final: Final, count: int, users: list[str]) -> dict[str, Any]:
    """Issue 14's invariants over a run's ``History`` and ``Final`` listings, counted
    per fault kind (a message counts for the fault during which it was sent)."""
    phase_of = {a.marker: a.phase for a in h.acks}
    by_user: dict[str, set[str]] = defaultdict(set)
    for a in h.acks:
        by_user[a.user].add(a.marker)
    counts: dict[str, dict[str, int]] = {p.kind: defaultdict(int) for p in h.phases}
    counts["final"] = defaultdict(int)  # the reads after the schedule
    violations: list[str] = []

    def bad(kind: str, counter: str, text: str) -> None:
        counts[kind][counter] += 1
        if counts[kind][counter] <= 10:  # the first 10 of each (kind, counter)
            violations.append(f"[{kind}] {counter}: {text}")

    def kind_of(marker: str) -> str:
        return h.phases[phase_of.get(marker, 0)].kind

    for p in h.phases:
        p.acked_by_node.clear()
    for a in h.acks:
        counts[h.phases[a.phase].kind]["acknowledged"] += 1
        by_node = h.phases[a.phase].acked_by_node
        by_node[f"p{a.node}"] = by_node.get(f"p{a.node}", 0) + 1
    for p_index, n in h.attempts.items():
        counts[h.phases[p_index].kind]["attempted"] += n
    for u in users:
        seen_anywhere: set[str] = set()
        per_door: dict[tuple[int, str], dict[str, int]] = {}
        for i in range(1, count + 1):
            listing = final.imap[i, u]
            pop = final.pop3[i, u]
            # A door that refuses is counted once as unreadable (a final read comes
            # after the heal and settling: nothing is out of reach), not as hiding
            # each message.
            if listing is None:
                bad("final", "unreadable", f"IMAP at p{i} refused {u} after the heal")
            if pop is None:
                bad("final", "unreadable", f"POP3 at p{i} refused {u} after the heal")
            imap_counts: dict[str, int] = defaultdict(int)
            for uid, ms in (listing or {}).items():
                for m in ms:
                    imap_counts[m] += 1
                if len(ms) > 1:
                    bad(kind_of(ms[0]), "uid_shared",
                        f"p{i} IMAP {u}: UID {uid} lists {list(ms)}")  # fmt: skip
            pop_counts: dict[str, int] = defaultdict(int)
            uidls: dict[str, list[str]] = defaultdict(list)
            for uidl, m in pop or []:
                pop_counts[m] += 1
                uidls[uidl].append(m)
            for uidl, named_by in uidls.items():
                if len(named_by) > 1:
                    bad(
                        kind_of(named_by[0]),
                        "uidl_shared",
                        f"p{i} POP3 {u}: UIDL {uidl} for {named_by}",
                    )
            for door, got in (("IMAP", imap_counts), ("POP3", pop_counts)):
                if got.get("?"):
                    bad("final", "unreadable", f"{door} at p{i} {u}: {got['?']} unreadable")
            if listing is not None:
                per_door[i, "imap"] = imap_counts
            if pop is not None:
                per_door[i, "pop3"] = pop_counts
            seen_anywhere |= set(imap_counts) | set(pop_counts)
        for marker in sorted(by_user[u]):
            k = kind_of(marker)
            if marker not in seen_anywhere:
                bad(k, "missing", f"{marker} for {u} listed nowhere")
                continue
            absent = [f"p{i}/{door}" for (i, door), c in per_door.items() if c[marker] == 0]
            twice = [f"p{i}/{door}" for (i, door), c in per_door.items() if c[marker] > 1]
            if absent:
                bad(k, "hidden", f"{marker} for {u} not listed by {absent}")
            if twice:
                bad(k, "duplicated", f"{marker} for {u} listed twice by {twice}")
    # The same UID must name the same message at every node, in every read.
    names: dict[tuple[str, int], dict[str, tuple[float, int]]] = defaultdict(dict)
    uid_of: dict[tuple[str, str], set[int]] = defaultdict(set)
    reads = list(h.reads) + [
        Read(final.t, user, i, listing, 0)
        for (i, user), listing in final.imap.items()
        if listing is not None
    ]
    for r in reads:
        for uid, ms in r.uids.items():
            for m in ms:
                names[r.user, uid].setdefault(m, (r.t, r.node))
                uid_of[r.user, m].add(uid)
    for (user, uid), named in names.items():
        if len(named) > 1:
            first = min(named, key=lambda m: named[m][0])
            bad(kind_of(first), "uid_changed",
                f"{user} UID {uid} named {sorted(named)} in different reads")  # fmt: skip
    for (user, m), uids in uid_of.items():
        if len(uids) > 1:
            bad(kind_of(m), "uid_changed", f"{user} {m} listed under UIDs {sorted(uids)}")
    # New messages appear above every UID shown before (reads in time order).
    top: dict[str, int] = defaultdict(int)
    first_seen: set[tuple[str, str]] = set()
    for r in sorted(reads, key=lambda r: r.t):
        for uid, ms in sorted(r.uids.items()):
            for m in ms:
                if (r.user, m) not in first_seen:
                    first_seen.add((r.user, m))
                    if uid < top[r.user]:
                        # Never acknowledged (no 250): counted apart, see docs/chaos.md.
                        what = "below_seen" if m in phase_of else "below_seen_unacked"
                        bad(kind_of(m), what,
                            f"{r.user} {m} first seen under UID {uid} at p{r.node} "
                            f"({r.t:.1f} s), below UID {top[r.user]} shown before")  # fmt: skip
        if r.uids:
            top[r.user] = max(top[r.user], max(r.uids))
    # STATUS polls: UIDNEXT never lower at a node; UIDVALIDITY fixed once non-empty.
    last: dict[tuple[str, int], Poll] = {}
    validity: dict[str, set[int]] = defaultdict(set)
    for poll in sorted(h.polls, key=lambda p: p.t):
        key = (poll.user, poll.node)
        prev = last.get(key)
        if prev is not None and poll.uidnext < prev.uidnext:
            bad(h.phases[poll.phase].kind, "uidnext_decreased",
                f"{poll.user} at p{poll.node}: UIDNEXT {prev.uidnext} -> {poll.uidnext} "
                f"({prev.t:.1f} s -> {poll.t:.1f} s)")  # fmt: skip
        last[key] = poll
        if poll.messages:
            if validity[poll.user] and poll.uidvalidity not in validity[poll.user]:
                bad(h.phases[poll.phase].kind, "uidvalidity_changed",
                    f"{poll.user} at p{poll.node}: UIDVALIDITY {poll.uidvalidity}, "
                    f"before {sorted(validity[poll.user])}")  # fmt: skip
            validity[poll.user].add(poll.uidvalidity)
    counters = ("attempted", "acknowledged", "missing", "duplicated", "hidden",
                "uid_shared", "uid_changed", "below_seen", "below_seen_unacked",
                "uidnext_decreased", "uidvalidity_changed", "uidl_shared",
                "unreadable")  # fmt: skip
    by_kind = {k: {c: counts[k].get(c, 0) for c in counters} for k in counts}
    total = {c: sum(v[c] for v in by_kind.values()) for c in counters}
    return {
        "nodes": count,
        "polls": len(h.polls),
        "reads": len(h.reads),
        "faults": [attrs.asdict(p) for p in h.phases[1:]],
        "by_kind": by_kind,
        "total": total,
        "violations": violations,
        # below_seen_unacked is counted but allowed: a message no client got a 250
        # for, back below UIDs shown after its coordinator died or lapsed (the
        # client's retry is its own message; docs/mail.md, "A holder that goes away
        # meanwhile").  Every other invariant must hold.
        "ok": all(total[c] == 0 for c in counters[2:] if c != "below_seen_unacked"),
    }


def schedule(name: str, seed: int, kinds: list[str] | None = None) -> list[Fault]:
    """``full``: every fault kind twice (pauses 4-5 s, partitions 12 s, ...), in a
    seeded order with the rolling restart last; ``short``: one of each of ``kinds``,
    held briefly (for the default suite, < 90 s)."""
    rng = random.Random(seed)
    if name == "short":
        holds = {"partition": 8.0, "bridge": 8.0, "kill": 4.0, "pause": 4.0, "skew": 5.0,
                 "rolling": 2.0}  # fmt: skip
        return [Fault(k, holds[k]) for k in (kinds or ["partition", "pause", "kill"])]
    steps = [
        Fault("partition", 12.0),
        Fault("partition", 15.0),
        Fault("bridge", 15.0),
        Fault("bridge", 12.0),
        Fault("kill", 6.0),
        Fault("kill", 4.0),
        Fault("pause", 4.0),
        Fault("pause", 5.0),
        Fault("skew", 10.0),
        Fault("skew", 10.0),
    ]
    steps = [s for s in steps if kinds is None or s.kind in kinds]
    rng.shuffle(steps)
    if kinds is None or "rolling" in kinds:
        steps.append(Fault("rolling", 5.0))
    return steps


def table(report: dict[str, Any]) -> str:
    """The report's counts per fault kind and heal times as a text table."""
    cols = ("acknowledged", "missing", "duplicated", "hidden", "uid_shared", "uid_changed",
            "below_seen", "below_seen_unacked", "uidnext_decreased", "uidvalidity_changed",
            "uidl_shared", "unreadable")  # fmt: skip
    short = ("acked", "missing", "dup", "hidden", "uid2x", "uidchg", "below", "below-u",
             "uidnext-", "uidval", "uidl2x", "unread")  # fmt: skip
    lines = [f"{'fault':<10}" + "".join(f"{s:>9}" for s in short)]
    for kind, c in report["by_kind"].items():
        lines.append(f"{kind:<10}" + "".join(f"{c[k]:>9}" for k in cols))
    t = report["total"]
    lines.append(f"{'total':<10}" + "".join(f"{t[k]:>9}" for k in cols))
    lines.append("")
    lines.append(f"{'heal':<9}{'at s':>8}  {'one view after s':<24}{'visible after s':>16}  detail")
    for f in report["faults"]:
        views = ",".join("-" if x is None else f"{x:.1f}" for x in f["to_one_view"])
        vis = "-" if f["visible_after"] is None else f"{f['visible_after']:.1f}"
        lines.append(f"{f['kind']:<9}{f['heal']:>8.1f}  {views:<24}{vis:>16}  {f['detail']}")
    crit = {k: sum(v.values()) for k, v in report.get("log_criticals", {}).items() if v}
    if crit:
        lines.append(f"critical log events / unhandled errors per node: {crit}")
    if report["violations"]:
        lines.append("")
        lines += report["violations"][:40]
    return "\n".join(lines)
