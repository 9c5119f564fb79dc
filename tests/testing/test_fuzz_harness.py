"""The fuzzing harness's own parts: mutations, segmentation, log reading, corpus files."""

from __future__ import annotations

import random
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from yimaporc.testing.fuzz import Job, mutate, parse_tracebacks, segments
from yimaporc.testing.fuzz._check import LogWatch
from yimaporc.testing.fuzz._lab import slot_of, source_address
from yimaporc.testing.fuzz._run import load_replay, resign, save_batch, save_reproducer, stream_job
from yimaporc.testing.fuzz._seeds import SCOPE, datagrams, imap, smtp

LOG = """\
2026-12-06T01:34:23+0000 [MailESMTP,73,127.0.107.100] Receiving message for delivery
2026-12-06T01:34:24+0000 [POP3,12,127.0.107.103] Unhandled Error
\tTraceback (most recent call last):
\t  File "/x/site-packages/twisted/mail/pop3.py", line 560, in state_COMMAND
\t    self.processCommand(*line.split())
\t  File "/x/site-packages/twisted/mail/pop3.py", line 588, in processCommand
\t    return f(*a)
\tbuiltins.TypeError: do_STAT() takes 1 positional argument but 2 were given
2026-12-06T01:34:25+0000 [-] Unhandled error in Deferred:
\tTraceback (most recent call last):
\t  File "/w/src/yimaporc/cluster/rpc.py", line 56, in fromBox
\tbuiltins.KeyError: b'payload.1'
2026-12-06T02:18:06+0000 [twisted.protocols.amp#critical] Amp server or network failure unhandled
\tTraceback (most recent call last):
\tFailure: twisted.protocols.amp.RemoteAmpError: Code<AUTH_FAILED> (local): bad proof
\tTraceback: <class 'yimaporc.cluster.rpc.AuthFailed'>: bad proof
\t/x/site-packages/twisted/internet/defer.py:205:maybeDeferred
\t/w/src/yimaporc/cluster/rpc.py:160:_prove
"""


def test_parse_tracebacks_names_exception_frame_and_slot() -> None:
    """Each twistd traceback block gives its exception line, innermost frame and source slot."""
    tbs = parse_tracebacks(LOG)
    assert [tb.exception for tb in tbs] == [
        "builtins.TypeError: do_STAT() takes 1 positional argument but 2 were given",
        "builtins.KeyError: b'payload.1'",
        "twisted.protocols.amp.RemoteAmpError: Code<AUTH_FAILED> (local): bad proof",
    ]
    assert tbs[0].slot == 3 and tbs[1].slot is None
    assert tbs[0].frame == 'File "twisted/mail/pop3.py", line 588, in processCommand'
    assert (
        tbs[1].signature
        == 'builtins.KeyError at File "yimaporc/cluster/rpc.py", line 56, in fromBox'
    )
    assert tbs[2].frame == 'File "yimaporc/cluster/rpc.py", line 160, in _prove'
    assert parse_tracebacks(LOG.splitlines(keepends=True)[0]) == []


def test_source_addresses_map_back_to_slots() -> None:
    """Slot n connects from 127.0.107.(100+n); other addresses are no slot."""
    assert [slot_of(source_address(n)) for n in (0, 5, 149)] == [0, 5, 149]
    assert slot_of("127.0.0.1") is None and slot_of("127.0.107.1") is None


def test_logwatch_reads_only_new_text_and_follows_rotation(tmp_path: Path) -> None:
    """New lines once each, also across twistd's rotation of LOG to LOG.1."""
    log = tmp_path / "n.log"
    log.write_text("old\n")
    watch = LogWatch(log)
    watch.mark()
    with log.open("a") as f:
        f.write("one\n")
    assert watch.read_new() == "one\n"
    with log.open("a") as f:
        f.write("two\n")
    log.rename(tmp_path / "n.log.1")
    log.write_text("three\n")
    assert watch.read_new() == "two\nthree\n"
    assert watch.read_new() == ""


@given(st.integers(0, 2**32), st.sampled_from(smtp().bodies + imap().bodies))
def test_mutation_is_a_function_of_the_seed(seed: int, data: bytes) -> None:
    """The same seed gives the same mutant; mutants stay within the size cap."""
    others = smtp().bodies
    a = mutate(random.Random(seed), data, others, max_size=4096)
    assert a == mutate(random.Random(seed), data, others, max_size=4096)
    assert len(a) <= 4096


@given(st.integers(0, 2**32), st.binary(max_size=500))
def test_segments_reassemble(seed: int, data: bytes) -> None:
    """However it is cut into TCP writes, the bytes are the same, in order, none empty."""
    parts = segments(random.Random(seed), data)
    assert b"".join(parts) == data
    assert all(parts) or parts == [b""]


def test_jobs_keep_the_preamble_most_of_the_time() -> None:
    """Most connections log in validly first, so mutations reach the logged-in state."""
    rng = random.Random(1)
    seeds = imap()
    jobs = [stream_job(rng, "imap", seeds) for _ in range(200)]
    valid = sum(j.data.startswith(seeds.preamble) for j in jobs)
    assert 120 < valid < 200
    assert all(1 <= j.inputs <= 16 for j in jobs)


def test_resign_makes_the_mac_valid() -> None:
    """A re-signed mutant parses with the real key (so it reaches the parser behind the MAC)."""
    from yimaporc.cluster import wire

    key = b"r" * 32
    raw = datagrams()[4]  # a PING MACed with a foreign key
    try:
        wire.parse(key, SCOPE, raw)
    except wire.BadMac:
        pass
    else:
        raise AssertionError("foreign MAC accepted")
    assert isinstance(wire.parse(key, SCOPE, resign(key, raw)).body, wire.Ping)


def test_reproducers_and_batches_replay_as_saved(tmp_path: Path) -> None:
    """Saved .bin/.json and .jsonl files load back to the same jobs and door."""
    job = Job(3, (b"a1 LOGIN x y\r\n", b"a2 NOOP\r\n"), "reset", "")
    path = save_reproducer(tmp_path, "imap", job, "sig")
    assert path.read_bytes() == job.data
    assert load_replay(path, None) == ("imap", [job])
    bare = tmp_path / "pop3" / "x.bin"
    bare.parent.mkdir()
    bare.write_bytes(b"USER a b\r\n")
    assert load_replay(bare, None) == ("pop3", [Job(1, (b"USER a b\r\n",), "read")])
    jobs = [job, Job(1, (b"\x00",), "read", "amp-auth")]
    batch = save_batch(tmp_path, "cluster-amp", 1, 2, jobs, "rss")
    assert load_replay(batch, None) == ("cluster-amp", jobs)


def test_logwatch_follows_several_rotations_between_looks(tmp_path: Path) -> None:
    """Three rotations between two looks (LOG -> LOG.1 -> LOG.2 -> LOG.3): nothing lost, nothing twice."""
    log = tmp_path / "n.log"
    log.write_text("a\n")
    watch = LogWatch(log)
    assert watch.read_new() == "a\n"
    for text in ("b\n", "c\n", "d\n"):
        with log.open("a") as f:
            f.write(text)
        for n in range(3, 0, -1):  # twistd's rotation: shift the old ones up, then LOG -> LOG.1
            p = tmp_path / f"n.log.{n}"
            if p.exists():
                p.rename(tmp_path / f"n.log.{n + 1}")
        log.rename(tmp_path / "n.log.1")
        log.write_text("")
    with log.open("a") as f:
        f.write("e\n")
    assert watch.read_new() == "b\nc\nd\ne\n"
    assert watch.read_new() == ""
