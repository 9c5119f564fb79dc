"""Property tests: POP3 stuffing round-trips; UIDs only ascend whatever the operations."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from yimaporc.porcupine._pop3 import dot_stuff
from yimaporc.porcupine.fragments import FragmentStore
from yimaporc.porcupine.values import INBOX, NewMessage

line = st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


def unstuff(payload: bytes) -> bytes:
    """What a POP3 client does with a multi-line response body."""
    lines = payload.split(b"\r\n")[:-1]
    return b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


@given(st.lists(st.one_of(line, st.just(b"."), st.just(b".."), st.just(b"")), max_size=30))
def test_dot_stuff_round_trips(lines: list[bytes]) -> None:
    """Un-stuffing what RETR sends gives back the stored CRLF message, and no line is a lone dot."""
    body = b"".join(ln + b"\r\n" for ln in lines)
    payload = dot_stuff(body)
    assert unstuff(payload) == body
    assert all(ln != b"." for ln in payload.split(b"\r\n"))


USERS = ["a@example.org", "b@example.org"]


class UidMachine(RuleBasedStateMachine):
    """Random stores, copies, deletes, renames and restarts: UIDs never go back or repeat."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.clock = 1000.0
        self.store = FragmentStore(Path(self.dir.name), "n1", lambda: self.clock)
        self.high: dict[
            tuple[str, str, int], int
        ] = {}  # (user, box, uidvalidity) -> highest UID seen
        self.boxes = {u: {INBOX} for u in USERS}

    @rule(user=st.sampled_from(USERS), n=st.integers(1, 3))
    def deliver(self, user: str, n: int) -> None:
        self.store.store([NewMessage(user, INBOX, b"x", (), 0.0) for _ in range(n)])

    @rule(user=st.sampled_from(USERS), name=st.sampled_from(["A", "B"]))
    def create(self, user: str, name: str) -> None:
        if name not in self.boxes[user]:
            self.store.create_mailbox(user, name)
            self.boxes[user].add(name)

    @rule(user=st.sampled_from(USERS), dest=st.sampled_from(["A", "B"]))
    def copy_all(self, user: str, dest: str) -> None:
        if dest in self.boxes[user]:
            uids = [d.uid for d in self.store.digests(user, INBOX)]
            self.store.copy(user, INBOX, uids, dest)

    @rule(user=st.sampled_from(USERS), box=st.sampled_from([INBOX, "A", "B"]), k=st.integers(0, 3))
    def delete_some(self, user: str, box: str, k: int) -> None:
        if box in self.boxes[user]:
            uids = [d.uid for d in self.store.digests(user, box)][:k]
            self.store.delete(user, box, uids)

    @rule(user=st.sampled_from(USERS), name=st.sampled_from(["A", "B"]))
    def drop_mailbox(self, user: str, name: str) -> None:
        if name in self.boxes[user]:
            self.store.delete_mailbox(user, name)
            self.boxes[user].discard(name)

    @rule()
    def restart(self) -> None:
        self.store.close()
        self.store = FragmentStore(Path(self.dir.name), "n1", lambda: self.clock)
        self.store.recover()

    @invariant()
    def uids_ascend(self) -> None:
        for user in USERS:
            for info in self.store.mailboxes(user):
                uids = [d.uid for d in self.store.digests(user, info.name)]
                assert uids == sorted(set(uids))
                assert all(u < info.uidnext for u in uids)
                key = (user, info.name, info.uidvalidity)
                assert info.uidnext - 1 >= self.high.get(key, 0)
                self.high[key] = info.uidnext - 1

    def teardown(self) -> None:
        self.store.close()
        self.dir.cleanup()


TestUids = UidMachine.TestCase
TestUids.settings = settings(max_examples=8, stateful_step_count=20, deadline=None)
