"""Batches of mutated inputs per door, a check after each, triage of tracebacks into a corpus."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from ...cluster.wire import MAC_SIZE, MAGIC, MsgType
from ._check import Bounds, Checker, CheckResult, LogWatch, Traceback, parse_tracebacks
from ._lab import SOURCES, Lab
from ._mutate import mutate, segments
from ._seeds import Transcripts, datagrams, stream_transcripts
from ._send import Job, Sent, run_jobs, send_datagrams

#: Datagram types a re-signed mutation may keep: they only ask for an answer.
RESIGN_TYPES = (MsgType.PING, MsgType.TIME_REQ)


@attrs.frozen
class Options:
    """How one run fuzzes."""

    inputs: int = 10_000
    seed: int = 0
    workers: int = 32
    batch: int = 5_000
    udp_rate: float = 3_000.0
    triage_seconds: float = 60.0
    max_seconds: float = float("inf")  # stop a door after this long even if inputs remain
    bounds: Bounds = attrs.field(factory=Bounds)


@attrs.define
class DoorReport:
    """What fuzzing one door found."""

    door: str
    inputs: int = 0
    seconds: float = 0.0
    batches: int = 0
    failed_batches: int = 0
    crashed: bool = False
    problems: list[str] = attrs.field(factory=list)
    tracebacks: Counter[str] = attrs.field(factory=Counter)
    first_lines: dict[str, str] = attrs.field(factory=dict)
    reproducers: list[str] = attrs.field(factory=list)
    counters: Counter[str] = attrs.field(factory=Counter)
    rss_kib: tuple[int, int] = (0, 0)
    fds: tuple[int, int] = (0, 0)
    client_seconds_max: float = 0.0

    @property
    def rate(self) -> float:
        """Inputs per second."""
        return self.inputs / self.seconds if self.seconds else 0.0

    @property
    def clean(self) -> bool:
        """No crash, no traceback and no failed check."""
        return not self.crashed and not self.problems and not self.tracebacks

    def as_json(self) -> dict[str, Any]:
        """A JSON-able summary."""
        return {
            "door": self.door, "inputs": self.inputs, "seconds": round(self.seconds, 1),
            "inputs_per_second": round(self.rate, 1), "batches": self.batches,
            "failed_batches": self.failed_batches, "crashed": self.crashed,
            "problems": self.problems[:50], "tracebacks": dict(self.tracebacks),
            "traceback_first_lines": self.first_lines, "reproducers": self.reproducers,
            "rss_kib": {"baseline": self.rss_kib[0], "max": self.rss_kib[1]},
            "fds": {"baseline": self.fds[0], "max": self.fds[1]},
            "client_seconds_max": round(self.client_seconds_max, 3),
            "counters": dict(self.counters),
        }  # fmt: skip

    def summary(self) -> str:
        """A few human lines."""
        lines = [
            f"{self.door}: {self.inputs} inputs in {self.seconds:.0f}s ({self.rate:.0f}/s), "
            f"{self.batches} batches, {self.failed_batches} failed, crashed={self.crashed}, "
            f"RSS {self.rss_kib[0]}->{self.rss_kib[1]} KiB, fds {self.fds[0]}->{self.fds[1]}, "
            f"real client max {self.client_seconds_max:.2f}s"
        ]
        lines += [f"  problem: {p}" for p in dict.fromkeys(self.problems)][:20]
        lines += [
            f"  traceback x{n}: {self.first_lines[sig]}  [{sig}]"
            for sig, n in self.tracebacks.most_common()
        ]
        lines += [f"  reproducer: {r}" for r in self.reproducers]
        return "\n".join(lines)


# --- making inputs -----------------------------------------------------------------------


def stream_job(rng: random.Random, door: str, seeds: Transcripts) -> Job:
    """One connection: usually a valid preamble, 1-16 mutated bodies, sometimes a polite end."""
    k = rng.choice((1, 1, 2, 4, 8, 16))
    parts = []
    if seeds.preamble:
        parts.append(
            seeds.preamble if rng.random() < 0.8 else mutate(rng, seeds.preamble, seeds.bodies)
        )
    parts += [mutate(rng, rng.choice(seeds.bodies), seeds.bodies) for _ in range(k)]
    if seeds.closing and rng.random() < 0.5:
        parts.append(seeds.closing)
    ending = rng.choices(("read", "close", "reset"), (7, 2, 1))[0]
    prelude = ""
    if door == "cluster-amp" and rng.random() < 0.3:
        prelude = "amp-auth"
    elif door == "rtsp" and rng.random() < 0.4:
        prelude = "rtsp-session"
    return Job(k, tuple(segments(rng, b"".join(parts))), ending, prelude)


def resign(key: bytes, data: bytes) -> bytes:
    """``data`` with a valid MAC under ``key``."""
    signed = data[:-MAC_SIZE]
    return signed + hmac.new(key, signed, hashlib.sha256).digest()[:MAC_SIZE]


def datagram_input(rng: random.Random, seeds: Sequence[bytes], key: bytes) -> bytes:
    """A mutated membership datagram; some (asking-only types) re-signed with the real key."""
    data = mutate(rng, rng.choice(seeds), seeds, max_size=65_000)
    if (
        rng.random() < 0.4
        and len(data) > len(MAGIC) + MAC_SIZE
        and data.startswith(MAGIC)
        and data[len(MAGIC)] in RESIGN_TYPES
    ):
        data = resign(key, data)
    return data


# --- corpus ------------------------------------------------------------------------------


def _job_json(job: Job) -> dict[str, Any]:
    return {
        "chunks": [base64.b64encode(c).decode() for c in job.chunks],
        "ending": job.ending, "prelude": job.prelude, "inputs": job.inputs,
    }  # fmt: skip


def _job_from_json(obj: dict[str, Any]) -> Job:
    return Job(
        int(obj.get("inputs", 1)), tuple(base64.b64decode(c) for c in obj["chunks"]),
        obj.get("ending", "read"), str(obj.get("prelude", "")),
    )  # fmt: skip


def save_reproducer(corpus: Path, door: str, job: Job, why: str) -> Path:
    """``corpus/door/HASH.bin`` (the raw bytes, for ``nc`` too) and ``HASH.json`` (how to send)."""
    data = job.data
    name = hashlib.sha1(job.prelude.encode() + b"|" + data).hexdigest()[:16]
    d = corpus / door
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.bin").write_bytes(data)
    meta = {"door": door, "why": why, **_job_json(job)}
    (d / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return d / f"{name}.bin"


def save_batch(
    corpus: Path, door: str, seed: int, batch: int, jobs: Sequence[Job], why: str
) -> Path:
    """A whole batch (for cumulative failures: memory, fds, view) as JSON lines."""
    d = corpus / door
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"batch-s{seed}-b{batch}.jsonl"
    with path.open("w") as f:
        f.write(json.dumps({"door": door, "why": why}) + "\n")
        for job in jobs:
            f.write(json.dumps(_job_json(job)) + "\n")
    return path


def load_replay(path: Path, door: str | None) -> tuple[str, list[Job]]:
    """The door and jobs saved in ``path`` (.bin with its .json, a bare .bin, or .jsonl)."""
    if path.suffix == ".jsonl":
        lines = path.read_text().splitlines()
        head = json.loads(lines[0])
        return door or head["door"], [_job_from_json(json.loads(line)) for line in lines[1:]]
    meta_path = path.with_suffix(".json")
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return door or meta["door"], [_job_from_json(meta)]
    found = door or path.parent.name
    return found, [Job(1, (path.read_bytes(),), "read")]


# --- running -----------------------------------------------------------------------------


@attrs.define
class DoorFuzzer:
    """Fuzzes one door of a started :class:`Lab`."""

    lab: Lab
    door: str
    options: Options
    corpus: Path
    report: DoorReport = attrs.field(init=False)
    checker: Checker = attrs.field(init=False)
    rng: random.Random = attrs.field(init=False)
    saved: set[str] = attrs.field(factory=set)
    triage_left: float = 0.0
    log: Callable[[str], None] = print

    def __attrs_post_init__(self) -> None:
        self.report = DoorReport(self.door)
        self.checker = Checker(self.lab, self.door, self.options.bounds)
        self.rng = random.Random(f"{self.options.seed}/{self.door}")
        self.triage_left = self.options.triage_seconds

    def make_batch(self, n: int) -> list[Job]:
        """Jobs carrying about ``n`` inputs."""
        jobs: list[Job] = []
        total = 0
        if self.door == "cluster-udp":
            seeds = datagrams()
            key = self.lab.membership_key()
            return [Job(1, (datagram_input(self.rng, seeds, key),)) for _ in range(n)]
        host, port = self.lab.address(self.door)
        seeds_ = stream_transcripts(self.door, host, port)
        while total < n:
            job = stream_job(self.rng, self.door, seeds_)
            jobs.append(job)
            total += job.inputs
        return jobs

    def send(self, jobs: Sequence[Job], workers: int | None = None) -> Sent:
        """Send ``jobs`` to the door."""
        host, port = self.lab.address(self.door)
        w = workers or self.options.workers
        if self.door == "cluster-udp":
            return send_datagrams(host, port, [j.data for j in jobs], self.options.udp_rate, w)
        return run_jobs(host, port, jobs, w, self.lab.rpc_key())

    def run(self) -> DoorReport:
        """Fuzz ``options.inputs`` inputs in batches, checking after each."""
        r = self.report
        self.checker.baseline()
        r.rss_kib = (self.checker.baseline_rss, self.checker.baseline_rss)
        r.fds = (self.checker.baseline_fds, self.checker.baseline_fds)
        start = time.monotonic()
        while (
            r.inputs < self.options.inputs
            and not r.crashed
            and time.monotonic() - start < self.options.max_seconds
        ):
            jobs = self.make_batch(min(self.options.batch, self.options.inputs - r.inputs))
            sent = self.send(jobs)
            r.counters.update(sent.counters)
            r.inputs += sum(j.inputs for j in jobs)
            r.batches += 1
            result = self.checker.check()
            self._absorb(result, jobs, sent)
            self.log(
                f"[{self.door}] batch {r.batches}: {r.inputs} inputs, {r.inputs / (time.monotonic() - start):.0f}/s, "
                f"RSS {result.rss_kib} KiB, fds {result.fds}, client {result.client_seconds:.2f}s"
                + (f", PROBLEMS: {'; '.join(result.problems)}" if result.problems else "")
            )
        r.seconds = time.monotonic() - start
        r.rss_kib = (self.checker.baseline_rss, self.checker.max_rss)
        r.fds = (self.checker.baseline_fds, self.checker.max_fds)
        return r

    def _absorb(self, result: CheckResult, jobs: Sequence[Job], sent: Sent) -> None:
        r = self.report
        r.client_seconds_max = max(r.client_seconds_max, result.client_seconds)
        for tb in result.tracebacks:
            r.tracebacks[tb.signature] += 1
            r.first_lines.setdefault(tb.signature, tb.exception)
        if not result.problems:
            return
        r.failed_batches += 1
        r.problems.extend(result.problems)
        proc = self.checker.node.process
        if proc is not None and proc.poll() is not None:
            r.crashed = True
            r.reproducers.append(
                str(save_batch(self.corpus, self.door, self.options.seed, r.batches, jobs, "crash"))
            )
            return
        new = {tb.signature for tb in result.tracebacks} - self.saved
        if new:
            self._triage(result.tracebacks, new, jobs, sent)
        others = [p for p in result.problems if "tracebacks in the log" not in p]
        if others and not any(".jsonl" in p for p in r.reproducers):  # one batch file a door
            why = "; ".join(others)
            r.reproducers.append(
                str(save_batch(self.corpus, self.door, self.options.seed, r.batches, jobs, why))
            )

    def _triage(
        self, tracebacks: Sequence[Traceback], wanted: set[str], jobs: Sequence[Job], sent: Sent
    ) -> None:
        """Find one job per new traceback signature by replaying suspects, one source address each."""
        deadline = time.monotonic() + self.triage_left
        for sig in sorted(wanted):
            if time.monotonic() > deadline:
                break
            slots = {tb.slot for tb in tracebacks if tb.signature == sig}
            if None in slots or self.door == "cluster-udp":
                suspects = list(jobs)
            else:
                suspects = [j for j, s in zip(jobs, sent.slot_of_job, strict=True) if s in slots]
            located = self._locate(sig, suspects, deadline)
            if located is not None:
                job, how = located
                self.saved.add(sig)
                path = save_reproducer(self.corpus, self.door, job, f"{sig} ({how})")
                self.report.reproducers.append(str(path))
                self.log(f"[{self.door}] reproducer for {sig}: {path}")
        self.triage_left = max(0.0, deadline - time.monotonic())
        for w in self.checker.logs.values():
            w.read_new()  # the replays' own tracebacks are not new findings

    def _replay(self, group: Sequence[Job]) -> tuple[list[Traceback], dict[int, int]]:
        """Tracebacks the node logs for ``group`` (sent at once), and each slot's job index."""
        watch = LogWatch(self.checker.node.log_path)
        watch.mark()
        single = [attrs.evolve(j, ending="read") for j in group]
        sent = self.send(single, workers=min(len(single), SOURCES))
        job_of_slot = {slot: i for i, slot in enumerate(sent.slot_of_job)}
        pause = threading.Event()
        found: list[Traceback] = []
        for _ in range(10):  # the node logs shortly after it answers
            found += parse_tracebacks(watch.read_new())
            if found:
                pause.wait(0.2)
                found += parse_tracebacks(watch.read_new())
                break
            pause.wait(0.1)
        return found, job_of_slot

    def _locate(self, sig: str, suspects: Sequence[Job], deadline: float) -> tuple[Job, str] | None:
        for i in range(0, len(suspects), SOURCES):
            if time.monotonic() > deadline:
                return None
            group = list(suspects[i : i + SOURCES])
            found, job_of_slot = self._replay(group)
            tbs = [tb for tb in found if tb.signature == sig]
            for tb in tbs:
                if tb.slot in job_of_slot and self.door != "cluster-udp":
                    return group[job_of_slot[tb.slot]], "named by the log prefix on replay"
            if tbs:
                job = self._bisect(sig, group, deadline)
                if job is not None and any(tb.signature == sig for tb in self._replay([job])[0]):
                    return job, "bisected, then reproduced alone"
                return None
        return None

    def _bisect(self, sig: str, group: list[Job], deadline: float) -> Job | None:
        while len(group) > 1 and time.monotonic() < deadline:
            half = group[: len(group) // 2]
            if any(tb.signature == sig for tb in self._replay(half)[0]):
                group = half
            else:
                group = group[len(group) // 2 :]
        return group[0] if len(group) == 1 else None


def replay(lab: Lab, door: str, jobs: Sequence[Job], options: Options) -> tuple[CheckResult, Sent]:
    """Send saved ``jobs`` once to a fresh lab node and check it."""
    fuzzer = DoorFuzzer(lab, door, options, Path("."))
    fuzzer.checker.baseline()
    sent = fuzzer.send(jobs, workers=min(len(jobs), options.workers))
    # Some failures are logged late: an "Unhandled error in Deferred" only when the
    # Deferred is collected, after its connection is gone.  Give them half a second.
    watch = LogWatch(fuzzer.checker.node.log_path)
    watch.mark()
    pause = threading.Event()
    for _ in range(10):
        if any(b in watch.read_new() for b in ("Traceback", "Unhandled")):
            break
        pause.wait(0.05)
    return fuzzer.checker.check(), sent
