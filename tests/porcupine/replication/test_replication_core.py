"""The replication manager core: events in, ordered actions out."""

from __future__ import annotations

import random

import attrs
import pytest

from yimaporc.porcupine.replication import (
    Ack,
    Acknowledge,
    Action,
    Apply,
    DropLog,
    LogEntry,
    MarkAlive,
    PersistLog,
    PurgeTombstones,
    Push,
    ReplicationConfig,
    ReplicationManager,
    Retire,
    SendMessage,
    Timestamp,
    Update,
    WipeRequired,
)

CFG = ReplicationConfig(push_initial=1.0, push_max=8.0, stall_timeout=20.0, retention=1000.0)
T0 = 1_000_000.0


def ts(n: int, node: str = "a") -> Timestamp:
    """A timestamp ``n`` microseconds after T0."""
    return Timestamp(int(T0 * 1e6) + n, node)


def mgr(node: str = "a", config: ReplicationConfig = CFG) -> ReplicationManager:
    """A manager with a fixed seed, past its first alive mark."""
    m = ReplicationManager(node, random.Random(1), config)
    m.tick(T0 - 1)
    return m


def kinds(actions: list[Action]) -> list[str]:
    """Action class names, in order (messages named by their type)."""
    return [
        type(a.message).__name__ + ">" + a.to if isinstance(a, SendMessage) else type(a).__name__
        for a in actions
    ]


def sends(actions: list[Action]) -> list[SendMessage]:
    """The SendMessage actions."""
    return [a for a in actions if isinstance(a, SendMessage)]


def test_submit_orders_log_apply_acknowledge_push() -> None:
    """The coordinator logs, applies, answers the agent, then pushes, in that order."""
    a = mgr()
    token, actions = a.submit("m1", b"hello", ["a", "b", "c"], T0)
    assert kinds(actions) == ["PersistLog", "Apply", "Acknowledge", "Push>b", "Push>c"]
    entry = actions[0].entry  # type: ignore[union-attr]
    assert entry.timestamp == Timestamp(int(T0 * 1e6), "a")
    assert entry.targets == {"a", "b", "c"} and entry.remaining == {"b", "c"}
    assert actions[2] == Acknowledge(token, entry.timestamp)


def test_single_replica_needs_no_log() -> None:
    """With one replica the store write is the whole update: no log entry, no messages."""
    a = mgr()
    _, actions = a.submit("m1", b"x", ["a"], T0)
    assert kinds(actions) == ["Apply", "Acknowledge"]
    assert len(a) == 0


def test_coordinator_must_be_a_target() -> None:
    """An update sent to a node outside the replica set is refused."""
    with pytest.raises(ValueError, match="targets"):
        mgr().submit("m1", b"x", ["b", "c"], T0)


def test_participant_logs_applies_then_acks() -> None:
    """A participant acks only after its log write and apply."""
    b = mgr("b")
    update = Update("m1", ts(5, "a"), b"x")
    actions = b.receive("a", Push(update, "a", frozenset("abc")), T0)
    assert kinds(actions) == ["PersistLog", "Apply", "Ack>a"]
    assert actions[0].entry.remaining == {"c"}  # type: ignore[union-attr]


def test_full_round_retires_everywhere() -> None:
    """After every ack the coordinator drops its entry and tells each peer to retire."""
    a, b, c = mgr("a"), mgr("b"), mgr("c")
    _, actions = a.submit("m1", b"x", "abc", T0)
    acks = []
    for s in sends(actions):
        peer = {"b": b, "c": c}[s.to]
        acks += [(s.to, r) for r in sends(peer.receive("a", s.message, T0))]
    assert kinds(a.receive(*acks[0][:1], acks[0][1].message, T0)) == []
    out = a.receive(acks[1][0], acks[1][1].message, T0)
    assert kinds(out) == ["DropLog", "Retire>b", "Retire>c"]
    for s in sends(out):
        peer = {"b": b, "c": c}[s.to]
        assert kinds(peer.receive("a", s.message, T0)) == ["DropLog"]
    assert len(a) == len(b) == len(c) == 0


def test_duplicate_and_older_pushes_are_acked_not_logged() -> None:
    """Duplicates and older updates are recognised by timestamp: acked, never re-applied."""
    b = mgr("b")
    new = Update("m1", ts(10, "a"), b"new")
    b.receive("a", Push(new, "a", frozenset("ab")), T0)
    again = b.receive("a", Push(new, "a", frozenset("ab")), T0)
    assert kinds(again) == ["Ack>a"]
    old = Update("m1", ts(9, "c"), b"old")
    out = b.receive("c", Push(old, "c", frozenset("abc")), T0)
    assert kinds(out) == ["Ack>c"]
    assert b.entries()[0].update == new


def test_newer_update_replaces_entry() -> None:
    """The log never holds two entries for one object: a newer push replaces the older."""
    b = mgr("b")
    b.receive("a", Push(Update("m1", ts(1, "a"), b"1"), "a", frozenset("ab")), T0)
    out = b.receive("c", Push(Update("m1", ts(2, "c"), None), "c", frozenset("bc")), T0)
    assert kinds(out) == ["PersistLog", "Apply", "Ack>c"]
    assert [e.timestamp for e in b.entries()] == [ts(2, "c")]


def test_retries_back_off_to_the_cap() -> None:
    """Unacked pushes are retried with doubling (jittered) delays capped at push_max."""
    a = mgr()
    a.submit("m1", b"x", "ab", T0)
    times: list[float] = []
    now = T0
    while len(times) < 8:
        deadline = a.next_deadline()
        assert deadline is not None and deadline > now
        now = deadline
        if sends(a.tick(now)):
            times.append(now)
    gaps = [t2 - t1 for t1, t2 in zip([T0, *times], times)]
    assert 0.75 <= gaps[0] <= 1.25
    assert gaps[1] > gaps[0] and gaps[2] > gaps[1]
    assert max(gaps) <= 8 * 1.25


def test_pushes_only_to_live_and_at_once_on_return() -> None:
    """A dead peer is not pushed to; it is pushed to immediately when it comes back."""
    a = mgr()
    a.set_live({"a", "b"}, T0)
    _, actions = a.submit("m1", b"x", "abc", T0)
    assert kinds(actions)[-1:] == ["Push>b"]
    assert sends(a.tick(T0 + 100)) == [SendMessage("b", actions[-1].message)]  # type: ignore[union-attr]
    out = a.set_live({"a", "b", "c"}, T0 + 100.5)
    assert kinds(out) == ["Push>c"]


def test_participant_takes_over_when_coordinator_leaves() -> None:
    """When the coordinator leaves the live set a participant pushes to the rest and retires."""
    b = mgr("b")
    update = Update("m1", ts(5, "a"), b"x")
    b.receive("a", Push(update, "a", frozenset("abcd")), T0)
    assert b.tick(T0 + 1) == []
    out = b.set_live({"b", "c", "d"}, T0 + 2)
    assert kinds(out) == ["Push>c", "Push>d"]
    b.receive("c", Ack("m1", update.timestamp), T0 + 2)
    out = b.receive("d", Ack("m1", update.timestamp), T0 + 2)
    assert kinds(out) == ["DropLog", "Retire>a", "Retire>c", "Retire>d"]


def test_participant_takes_over_a_stalled_entry() -> None:
    """A participant whose live coordinator stays silent past stall_timeout pushes itself."""
    b = mgr("b")
    b.set_live("abc", T0)
    b.receive("a", Push(Update("m1", ts(5, "a"), b"x"), "a", frozenset("abc")), T0)
    assert b.next_deadline() == pytest.approx(T0 + 20)
    assert b.tick(T0 + 19) == []
    assert kinds(b.tick(T0 + 20)) == ["Push>c"]


def test_two_replicas_participant_retires_on_stall() -> None:
    """With two replicas a lost Retire is healed by the participant retiring on its own."""
    b = mgr("b")
    b.receive("a", Push(Update("m1", ts(5, "a"), b"x"), "a", frozenset("ab")), T0)
    assert kinds(b.tick(T0 + 21)) == ["DropLog", "Retire>a"]


def test_late_duplicate_push_after_retire_gets_retire() -> None:
    """A push for an update this node saw retired is answered with Retire, not re-logged."""
    b = mgr("b")
    update = Update("m1", ts(5, "a"), b"x")
    b.receive("a", Push(update, "a", frozenset("abc")), T0)
    b.receive("a", Retire("m1", update.timestamp), T0)
    out = b.receive("c", Push(update, "a", frozenset("abc")), T0 + 1)
    assert kinds(out) == ["Retire>c"]
    older = Update("m1", ts(4, "c"), b"old")
    assert kinds(b.receive("c", Push(older, "c", frozenset("abc")), T0 + 1)) == ["Ack>c"]


def test_submit_timestamp_beats_known_versions() -> None:
    """A new update is stamped newer than the agent's read version and the logged entry."""
    a = mgr()
    ahead = Timestamp(int((T0 + 50) * 1e6), "z")
    _, actions = a.submit("m1", b"x", "ab", T0, current=ahead)
    ts1 = actions[0].entry.timestamp  # type: ignore[union-attr]
    assert ts1 > ahead
    _, actions = a.submit("m1", None, "ab", T0)
    assert actions[0].entry.timestamp > ts1  # type: ignore[union-attr]


def test_acks_before_reply_waits_for_a_second_copy() -> None:
    """With acks_before_reply=2 the agent is answered only once a participant acked."""
    cfg = ReplicationConfig(acks_before_reply=2, push_max=8.0, stall_timeout=20.0)
    a = mgr("a", cfg)
    token, actions = a.submit("m1", b"x", "abc", T0)
    assert "Acknowledge" not in kinds(actions)
    ts = actions[0].entry.timestamp  # type: ignore[union-attr]
    assert a.receive("b", Ack("m1", ts), T0) == [Acknowledge(token, ts)]


def test_retention_drops_entries_and_purges_tombstones() -> None:
    """Entries older than the retention are dropped; tombstones older are purgeable."""
    a = mgr()
    a.set_live({"a"}, T0)
    _, actions = a.submit("m1", None, "ab", T0)
    ts = actions[0].entry.timestamp  # type: ignore[union-attr]
    assert a.next_deadline() == pytest.approx(T0 - 1 + 60)
    out = a.tick(T0 + 1000.5)
    assert DropLog("m1", ts) in out
    assert PurgeTombstones(int((T0 + 0.5) * 1e6)) in out
    assert MarkAlive(int((T0 + 1000.5) * 1e6)) in out
    assert len(a) == 0


def test_push_older_than_retention_is_not_applied() -> None:
    """A push older than the retention is acked but neither logged nor applied."""
    b = mgr("b")
    stale = Update("m1", Timestamp(int((T0 - 2000) * 1e6), "a"), b"x")
    assert kinds(b.receive("a", Push(stale, "a", frozenset("ab")), T0)) == ["Ack>a"]


def test_recover_reapplies_and_resumes() -> None:
    """After a restart the core re-applies its log and the coordinator pushes again."""
    update = Update("m1", Timestamp(int(T0 * 1e6), "a"), b"x")
    mine = LogEntry(update, "a", frozenset("abc"), frozenset("bc"))
    theirs = LogEntry(Update("m2", update.timestamp, b"y"), "c", frozenset("ac"), frozenset())
    a, actions = ReplicationManager.recover(
        "a", [mine, theirs], int(T0 * 1e6), T0 + 5, random.Random(1), CFG
    )
    assert kinds(actions) == ["Apply", "Apply", "MarkAlive", "PurgeTombstones", "Push>b", "Push>c"]
    assert len(a) == 2
    assert a.status().awaiting == {"b": 1, "c": 1}
    assert a.status().oldest_pending == update.timestamp


def test_node_away_longer_than_retention_must_be_wiped() -> None:
    """Restarting after more than the retention raises WipeRequired with a clear message."""
    last = int(T0 * 1e6)
    with pytest.raises(WipeRequired, match="wipe its hard state") as info:
        ReplicationManager.recover("a", [], last, T0 + 1001, random.Random(1), CFG)
    assert info.value.node_id == "a"
    ReplicationManager.recover("a", [], last, T0 + 999, random.Random(1), CFG)
    ReplicationManager.recover("a", [], None, T0, random.Random(1), CFG)


def test_config_is_checked() -> None:
    """Nonsensical tunables are refused at construction."""
    with pytest.raises(ValueError):
        ReplicationConfig(acks_before_reply=0)
    with pytest.raises(ValueError):
        ReplicationConfig(push_max=100.0, stall_timeout=50.0)
    with pytest.raises(ValueError):
        ReplicationConfig(retention=0)


def test_persist_actions_are_barriers_before_replies() -> None:
    """In every batch, no Ack/Acknowledge precedes the batch's PersistLog and Apply."""
    a, b = mgr("a"), mgr("b")
    _, actions = a.submit("m1", b"x", "ab", T0)
    for batch in (actions, b.receive("a", sends(actions)[0].message, T0)):
        names = kinds(batch)
        reply = next(i for i, n in enumerate(names) if n in ("Acknowledge", "Ack>a"))
        assert names.index("PersistLog") < names.index("Apply") < reply
        assert isinstance(batch[0], PersistLog) and isinstance(batch[1], Apply)


def test_long_log_keeps_events_cheap() -> None:
    """20,000 entries waiting for a dead peer do not slow down other updates."""
    import time

    a = mgr()
    a.set_live({"a", "b"}, T0)
    for k in range(20_000):
        a.submit(f"w{k}", b"x", "ac", T0)
    start = time.perf_counter()
    now = T0
    for k in range(2_000):
        now += 0.001
        _, actions = a.submit(f"m{k}", b"y", "ab", now)
        ts = actions[0].entry.timestamp  # type: ignore[union-attr]
        a.receive("b", Ack(f"m{k}", ts), now)
        a.tick(now)
        a.next_deadline()
    assert time.perf_counter() - start < 2.0
    assert len(a) == 20_000
    assert len(a._timers) <= 4 * len(a) + 64


def test_single_replica_update_supersedes_logged_entry() -> None:
    """Shrinking an object to one replica drops its old entry and answers the old agent."""
    a = mgr("a", attrs.evolve(CFG, acks_before_reply=2))
    old_token, actions = a.submit("m1", b"x", "ab", T0)
    old_ts = actions[0].entry.timestamp  # type: ignore[union-attr]
    token, actions = a.submit("m1", b"y", "a", T0)
    assert kinds(actions) == ["DropLog", "Acknowledge", "Apply", "Acknowledge"]
    assert actions[1] == Acknowledge(old_token, old_ts)
    assert actions[3].token == token  # type: ignore[union-attr]
    assert len(a) == 0


def test_retire_of_newer_update_drops_older_entry() -> None:
    """A Retire for a newer timestamp also retires this node's older entry."""
    b = mgr("b")
    b.receive("a", Push(Update("m1", ts(1, "a"), b"1"), "a", frozenset("abc")), T0)
    assert kinds(b.receive("c", Retire("m1", ts(2, "c")), T0)) == ["DropLog"]
    assert kinds(b.receive("a", Retire("m1", ts(0, "a")), T0)) == []


def test_retired_memory_is_bounded() -> None:
    """The memory of retired updates keeps at most retired_memory_entries objects."""
    b = mgr("b", attrs.evolve(CFG, retired_memory_entries=10))
    for k in range(50):
        b.receive("a", Retire(f"m{k}", ts(k)), T0)
    assert len(b._retired) == 10
    assert set(b._retired) == {f"m{k}" for k in range(40, 50)}
    b.tick(T0 + CFG.retired_memory + 1)
    assert b._retired == {}


def test_status_counts_entries_awaiting_each_peer() -> None:
    """status() reports log length, oldest pending timestamp and per-peer backlog."""
    a = mgr()
    a.set_live({"a"}, T0)
    for k in range(3):
        a.submit(f"m{k}", b"x", "abc" if k else "ab", T0 + k)
    st = a.status()
    assert st.log_length == 3
    assert st.oldest_pending == Timestamp(int(T0 * 1e6), "a")
    assert st.awaiting == {"b": 3, "c": 2}
