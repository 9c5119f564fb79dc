"""The chaos checker (``yimaporc.testing.chaos.evaluate``) on made-up histories: a clean
run is clean, and each of issue 14's violations is counted under its fault kind."""

from __future__ import annotations

from yimaporc.testing.chaos import Ack, Final, History, Phase, Poll, Read, evaluate, schedule

U = "u@example.org"


def phases() -> list[Phase]:
    return [Phase("none", "warm-up", 0.0), Phase("partition", "[1, 2] | [3, 4, 5]", 5.0)]


def acks() -> list[Ack]:
    return [Ack("m1", U, 1, 1.0, 0), Ack("m2", U, 3, 6.0, 1), Ack("m3", U, 1, 7.0, 1)]


def clean_final(nodes: int = 2) -> Final:
    imap = {(i, U): {1: ("m1",), 2: ("m2",), 3: ("m3",)} for i in range(1, nodes + 1)}
    pop3 = {(i, U): [("7.1", "m1"), ("7.2", "m2"), ("7.3", "m3")] for i in range(1, nodes + 1)}
    return Final(20.0, dict(imap), dict(pop3))  # type: ignore[arg-type]


def run(final: Final, polls: list[Poll] | None = None, reads: list[Read] | None = None) -> dict:  # type: ignore[type-arg]
    history = History(phases(), acks(), {0: 1, 1: 3}, polls or [], reads or [])
    return evaluate(history, final, 2, [U])


def test_clean_history_is_ok() -> None:
    """Every 250 once at every node by both doors, stable UIDs: ok, counts per kind."""
    report = run(clean_final())
    assert report["ok"], report["violations"]
    assert report["by_kind"]["partition"]["acknowledged"] == 2
    assert report["by_kind"]["none"]["acknowledged"] == 1
    assert report["faults"][0]["acked_by_node"] == {"p3": 1, "p1": 1}


def test_missing_hidden_and_duplicated_are_counted_for_the_fault() -> None:
    """A message listed nowhere is missing, one absent from a door hidden, one listed
    twice duplicated: each counted under the fault it was sent in."""
    final = clean_final()
    final.imap[1, U] = {1: ("m1",), 2: ("m2",), 4: ("m2",)}  # m3 missing here, m2 twice
    final.imap[2, U] = {1: ("m1",), 2: ("m2",)}
    final.pop3[1, U] = [("7.1", "m1"), ("7.2", "m2")]
    final.pop3[2, U] = [("7.1", "m1"), ("7.2", "m2")]
    report = run(final)
    c = report["by_kind"]["partition"]
    assert (c["missing"], c["duplicated"], c["hidden"]) == (1, 1, 0)
    assert not report["ok"]
    final = clean_final()
    final.pop3[2, U] = [("7.1", "m1"), ("7.2", "m2")]
    assert run(final)["by_kind"]["partition"]["hidden"] == 1


def test_uid_sharing_and_changes_and_uidl_duplicates() -> None:
    """Two messages under one UID, a message under two UIDs across nodes, and a POP3
    UIDL listed twice are all violations."""
    final = clean_final()
    final.imap[1, U] = {1: ("m1",), 2: ("m2", "m3")}
    report = run(final)
    assert report["by_kind"]["partition"]["uid_shared"] == 1
    assert report["by_kind"]["partition"]["uid_changed"] >= 1
    final = clean_final()
    final.pop3[2, U] = [("7.1", "m1"), ("7.2", "m2"), ("7.2", "m3")]
    assert run(final)["by_kind"]["partition"]["uidl_shared"] == 1


def test_new_message_below_a_uid_already_shown() -> None:
    """A message first seen under a UID lower than one a reader saw before counts as
    below_seen."""
    reads = [Read(6.5, U, 3, {1: ("m1",), 5: ("m2",)}, 1)]
    final = clean_final()
    final.imap[1, U] = {1: ("m1",), 5: ("m2",), 3: ("m3",)}
    final.imap[2, U] = {1: ("m1",), 5: ("m2",), 3: ("m3",)}
    report = run(final, reads=reads)
    assert report["by_kind"]["partition"]["below_seen"] == 1
    assert report["by_kind"]["partition"]["below_seen_unacked"] == 0
    assert not report["ok"]


def test_a_never_acknowledged_message_below_a_uid_shown_is_counted_apart() -> None:
    """A message no SMTP client got a 250 for, first seen below a UID shown, counts as
    below_seen_unacked (its own column, allowed by ``ok``: it was never acknowledged),
    not below_seen."""
    reads = [Read(6.5, U, 3, {1: ("m1",), 5: ("m2",)}, 1)]
    final = clean_final()
    final.imap[1, U] = {1: ("m1",), 5: ("m2",), 6: ("m3",), 3: ("x9",)}
    final.imap[2, U] = {1: ("m1",), 5: ("m2",), 6: ("m3",), 3: ("x9",)}
    report = run(final, reads=reads)
    assert report["total"]["below_seen"] == 0
    assert report["total"]["below_seen_unacked"] == 1
    assert report["ok"], report["violations"]  # counted, never acknowledged: allowed


def test_uidnext_decrease_and_uidvalidity_change() -> None:
    """STATUS polls: a lower UIDNEXT at the same node and another UIDVALIDITY on a
    non-empty mailbox are counted; an empty mailbox's UIDVALIDITY is not."""
    polls = [
        Poll(1.0, U, 1, 5, 77, 4, 0),
        Poll(6.0, U, 1, 3, 77, 2, 1),
        Poll(6.5, U, 2, 1, 99, 0, 1),
        Poll(7.0, U, 2, 6, 88, 5, 1),
    ]
    report = run(clean_final(), polls=polls)
    c = report["by_kind"]["partition"]
    assert (c["uidnext_decreased"], c["uidvalidity_changed"]) == (1, 1)


def test_schedules_cover_every_fault_kind() -> None:
    """The full schedule has every kind, the rolling restart last; short is a subset."""
    full = schedule("full", 1)
    assert {f.kind for f in full} == {"partition", "bridge", "kill", "pause", "skew", "rolling"}
    assert full[-1].kind == "rolling"
    assert [f.kind for f in schedule("short", 1, ["pause", "kill"])] == ["pause", "kill"]


def test_a_refusing_door_is_unreadable_not_hiding() -> None:
    """A door that refuses the final read counts once as unreadable, not as each
    message hidden."""
    final = clean_final()
    final.pop3[2, U] = None
    report = run(final)
    assert report["by_kind"]["final"]["unreadable"] == 1
    assert report["total"]["hidden"] == 0 and not report["ok"]
