"""A Jepsen-style chaos run against 5 real ``twistd porcupine-node`` processes (issue 14).

Each node runs in its own network namespace (``ychaos-pN``), joined to the root
namespace by a veth pair into the bridge ``ychbr0`` (10.123.0.0/24; node N is
10.123.0.N, the clients in the root namespace use 10.123.0.254). A nemesis cuts and
heals the network with iptables inside the namespaces (clean and bridge partitions),
SIGKILLs and restarts nodes, pauses them with SIGSTOP/SIGCONT, restarts one under a
skewed clock (libfaketime) and restarts them all in turn. Meanwhile SMTP clients
deliver to random nodes, recording every 250 with a unique marker, for users with
``--replicas`` 1, 2 and 3, and IMAP readers poll STATUS and the UID listing at random
nodes. After the heals the checker reads every mailbox at every node by IMAP and POP3
and checks issue 14's invariants; the report counts them per fault kind.

Its parts: ``_chaos_net`` (namespaces, bridge, cuts), ``_chaos_clients`` (SMTP,
IMAP and POP3 clients, the recorder), ``_chaos_check`` (records, the checker, the
report table, the schedules); this module runs them (:class:`Chaos`) and re-exports
their public names.

Run ``python -m yimaporc.testing.chaos --schedule full --json chaos-report.json``
(root only; ``make chaos``); docs/chaos.md says what is checked.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from ._chaos_check import (
    Ack,
    Fault,
    Final,
    History,
    Phase,
    Poll,
    Read,
    User,
    evaluate,
    log_criticals,
    schedule,
    table,
)
from ._chaos_clients import Recorder, imap_session, pop3_listing, smtp_send
from ._chaos_net import (
    ADMIN,
    CLUSTER,
    IMAP,
    KINDS,
    LOCK,
    POP3,
    PREFIX,
    SMTP,
    Network,
    faketime_lib,
    ip_of,
    unavailable,
)
from .procs import NodeProc, wait_for

__all__ = [
    "KINDS",
    "PREFIX",
    "Ack",
    "Chaos",
    "ChaosNode",
    "Fault",
    "Final",
    "History",
    "Network",
    "Phase",
    "Poll",
    "Read",
    "Recorder",
    "User",
    "evaluate",
    "imap_session",
    "log_criticals",
    "main",
    "one_view",
    "pop3_listing",
    "schedule",
    "settled",
    "smtp_send",
    "table",
    "unavailable",
]


@attrs.define
class ChaosNode(NodeProc):
    """A porcupine node started inside its namespace, optionally with a skewed clock."""

    ns: str = ""
    skew: str | None = None
    stopped: bool = False

    def start(self) -> None:
        """Launch ``ip netns exec NS twistd ...`` (``ip`` execs, so the PID is twistd's)."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.skew is not None:
            lib = faketime_lib()
            assert lib is not None, "libfaketime is missing"
            env.update(LD_PRELOAD=lib, FAKETIME=self.skew, FAKETIME_DONT_RESET="1")
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, *self.argv()], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        self.stopped = False

    def alive(self) -> bool:
        """Started, not exited."""
        return self.process is not None and self.process.poll() is None

    def probe(self) -> dict[str, Any] | None:
        """Its status document, or None (down, paused, cut off, exited)."""
        if not self.alive() or self.stopped:
            return None
        try:
            with urllib.request.urlopen(self.admin_url + "/api/status", timeout=2) as r:
                doc: dict[str, Any] = json.load(r)
                return doc
        except (OSError, ValueError):
            return None

    def send(self, sig: int) -> None:
        """Send ``sig`` to the node's PID."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(sig)
            self.stopped = sig == signal.SIGSTOP


def one_view(nodes: list[ChaosNode]) -> bool:
    """Every node answers with the same epoch and all of ``nodes`` as members, every
    node has buckets, and none is settling."""
    want = {n.node_id for n in nodes}
    docs = [n.probe() for n in nodes]
    if any(d is None for d in docs):
        return False
    epochs = {d["epoch"] for d in docs if d is not None}
    return len(epochs) == 1 and all(
        d is not None and {m["node_id"] for m in d["members"]} == want for d in docs
    )


def settled(nodes: list[ChaosNode]) -> bool:
    """One view, every node has buckets, none settling."""
    if not one_view(nodes):
        return False
    want = {n.node_id for n in nodes}
    for n in nodes:
        doc = n.probe()
        if doc is None or set(doc.get("buckets", {})) != want:
            return False
        if doc.get("mail_cluster", {}).get("settling_buckets"):
            return False
    return True


class Chaos:
    """The cluster, the nemesis, the clients and the checker of one run."""

    def __init__(
        self,
        base: Path,
        seed: int = 0,
        count: int = 5,
        senders: int = 8,
        readers: int = 2,
        log: Callable[[str], None] = lambda s: print(s, flush=True),
        replicas: tuple[int, ...] = (1, 1, 2, 2, 3, 3),
        sender_per_user: bool = False,
    ) -> None:
        self.base = base
        self.rng = random.Random(seed)
        self.count = count
        self.senders = senders
        self.readers = readers
        self.log = log
        self.run_id = f"r{seed}x{os.getpid()}"
        self.net = Network(count)
        self.rec = Recorder()
        self.phases: list[Phase] = [Phase("none", "warm-up", 0.0)]
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.users = [
            User(f"u{i}r{r}@example.org", f"pw-{i}", r) for i, r in enumerate(replicas, start=1)
        ]
        #: One sender per user (each user's deliveries one at a time) instead of
        #: ``senders`` threads delivering to random users.
        self.sender_per_user = sender_per_user
        self.secret = base / "cluster.secret"
        self.nodes: list[ChaosNode] = []

    # -- set-up ---------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.t0

    def make_node(self, i: int) -> ChaosNode:
        host = ip_of(i)
        join = [f"{ip_of(j)}:{CLUSTER}" for j in range(1, self.count + 1) if j != i]
        args = ["--domain", "example.org"]
        for svc, port in (("smtp", SMTP), ("pop3", POP3), ("imap", IMAP)):
            args += [f"--{svc}", f"tcp:{port}:interface={host}"]
        return ChaosNode(
            "porcupine", f"p{i}", host, self.base / f"p{i}" / "data", CLUSTER, ADMIN,
            extra=args, join=join if i > 1 else [], secret_file=self.secret, ns=Network.ns(i),
        )  # fmt: skip

    @contextlib.contextmanager
    def cluster(self) -> Iterator[None]:
        """Namespaces and 5 started, settled nodes with the users; everything removed
        and stopped at the end (also on failure)."""
        self.base.mkdir(parents=True, exist_ok=True)
        with open(LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            left = Network.cleanup_leftovers()
            if left:
                self.log(f"removed leftovers of an earlier run: {' '.join(left)}")
            try:
                self.net.setup()
                self.secret.write_text(os.urandom(16).hex())
                self.nodes = [self.make_node(i) for i in range(1, self.count + 1)]
                for n in self.nodes:
                    n.start()
                    # p1 first: the others join it.
                    if n.node_id == "p1":
                        wait_for(lambda: self.nodes[0].probe(), 30, "p1 to answer")
                wait_for(lambda: settled(self.nodes), 90, "5 nodes settled in one view")
                for u in self.users:
                    self.adduser(u)
                self.log(f"{self.count} nodes settled at {self.now():.1f} s")
                yield
            finally:
                self.stop.set()
                for n in self.nodes:
                    n.send(signal.SIGCONT)
                    n.kill(signal.SIGTERM)
                self.net.teardown()

    def adduser(self, u: User) -> None:
        cli = [sys.executable, "-m", "yimaporc.cli", "mail", "adduser", u.address,
               "--password", u.password, "--replicas", str(u.replicas),
               "--admin", self.nodes[0].admin_url, "--secret-file", str(self.secret)]  # fmt: skip
        subprocess.run(cli, check=True, capture_output=True, timeout=60)

    # -- clients --------------------------------------------------------------

    def sender(self, rng: random.Random, only: User | None = None) -> None:
        pace = threading.Event()
        while not self.stop.is_set():
            node = rng.randint(1, self.count)
            user = only or rng.choice(self.users)
            marker, phase = self.rec.next_marker(self.run_id)
            if smtp_send(node, user.address, marker):
                with self.rec.lock:
                    self.rec.acks.append(Ack(marker, user.address, node, self.now(), phase))
            pace.wait(0.05)

    def reader(self, rng: random.Random) -> None:
        pace = threading.Event()
        while not self.stop.is_set():
            node = rng.randint(1, self.count)
            user = rng.choice(self.users)
            t = self.now()
            status, listing = imap_session(node, user)
            with self.rec.lock:
                phase = self.rec.phase
                if status is not None:
                    self.rec.polls.append(Poll(t, user.address, node, *status, phase))
                if listing is not None:
                    self.rec.reads.append(Read(t, user.address, node, listing, phase))
            pace.wait(0.1)

    # -- nemesis --------------------------------------------------------------

    def node(self, i: int) -> ChaosNode:
        return self.nodes[i - 1]

    def wait_view(self, limit: float = 90.0) -> float | None:
        """Seconds until one view of all nodes (None if not within ``limit``)."""
        t = time.monotonic()
        try:
            wait_for(lambda: one_view(self.nodes), limit, "one view", interval=0.1)
        except AssertionError:
            return None
        return time.monotonic() - t

    def restart(self, i: int, skew: str | None = None, sig: int = signal.SIGKILL) -> None:
        n = self.node(i)
        n.send(signal.SIGCONT)
        n.kill(sig)
        n.skew = skew
        n.start()

    def begin(self, kind: str, detail: str) -> Phase:
        phase = Phase(kind, detail, self.now())
        with self.rec.lock:
            self.phases.append(phase)
            self.rec.phase = len(self.phases) - 1
        self.log(f"{phase.start:7.1f} s  {kind}: {detail}")
        return phase

    def hold(self, seconds: float) -> None:
        self.stop.wait(seconds)

    def inject(self, fault: Fault) -> Phase:
        """Apply ``fault``, hold it, heal it; measure the time to one view."""
        order = list(range(1, self.count + 1))
        self.rng.shuffle(order)
        if fault.kind == "partition":
            small, big = set(order[:2]), set(order[2:])
            phase = self.begin("partition", f"{sorted(small)} | {sorted(big)}")
            phase.minority = sorted(small)
            self.net.cut([small, big])
            self.hold(fault.hold)
            self.net.heal()
        elif fault.kind == "bridge":
            a, b, c, d, e = order[:5]
            phase = self.begin("bridge", f"{[a, b]} | {[d, e]}, p{c} sees both")
            self.net.cut([{a, b, c}, {c, d, e}])
            self.hold(fault.hold)
            self.net.heal()
        elif fault.kind == "kill":
            v = order[0]
            phase = self.begin("kill", f"SIGKILL p{v}, restart after {fault.hold:.0f} s")
            self.node(v).kill(signal.SIGKILL)
            self.hold(fault.hold)
            self.node(v).start()
        elif fault.kind == "pause":
            v = order[0]
            phase = self.begin("pause", f"SIGSTOP p{v} {fault.hold:.1f} s")
            self.node(v).send(signal.SIGSTOP)
            self.hold(fault.hold)
            self.node(v).send(signal.SIGCONT)
        elif fault.kind == "skew":
            v = order[0]
            offset = self.rng.choice(["+20s", "-15s", "+45s"])
            phase = self.begin("skew", f"restart p{v} with its clock {offset}")
            self.restart(v, skew=offset)
            phase.to_one_view.append(self.wait_view())
            self.hold(fault.hold)
            phase.detail += ", then restart it unskewed"
            self.restart(v)
        elif fault.kind == "rolling":
            phase = self.begin("rolling", "SIGTERM and restart p1..p5 in turn")
            for v in range(1, self.count + 1):
                self.restart(v, sig=signal.SIGTERM)
                if v < self.count:
                    phase.heal = self.now()
                    phase.to_one_view.append(self.wait_view())
                    self.hold(fault.hold / self.count)
        else:
            raise ValueError(f"unknown fault kind {fault.kind!r}")
        phase.heal = self.now()
        phase.to_one_view.append(self.wait_view())
        self.log(
            f"{self.now():7.1f} s  healed; one view after "
            + ", ".join("-" if x is None else f"{x:.1f} s" for x in phase.to_one_view)
        )
        return phase

    def visible_everywhere(self, acks: list[Ack], limit: float) -> float | None:
        """Seconds until every node lists all ``acks`` by IMAP (None: not within
        ``limit``)."""
        t = time.monotonic()
        want: dict[str, set[str]] = defaultdict(set)
        for a in acks:
            want[a.user].add(a.marker)
        users = {u.address: u for u in self.users}
        pending = {(i, u) for i in range(1, self.count + 1) for u in want}
        pace = threading.Event()
        while pending and not self.stop.is_set():
            for i, u in sorted(pending):
                _, listing = imap_session(i, users[u], status=False)
                if listing is not None:
                    seen = {m for ms in listing.values() for m in ms}
                    if want[u] <= seen:
                        pending.discard((i, u))
            if not pending:
                break
            if time.monotonic() - t > limit:
                return None
            pace.wait(0.3)
        return time.monotonic() - t

    # -- the run --------------------------------------------------------------

    def run(self, schedule: list[Fault], quiet: float = 4.0) -> dict[str, Any]:
        """Run ``schedule`` with clients going all the time; check; the report."""
        senders: list[User | None] = (
            list(self.users) if self.sender_per_user else [None] * self.senders
        )
        threads = [
            threading.Thread(target=self.sender, args=(random.Random(self.rng.random()), u))
            for u in senders
        ] + [
            threading.Thread(target=self.reader, args=(random.Random(self.rng.random()),))
            for _ in range(self.readers)
        ]
        for th in threads:
            th.start()
        try:
            self.hold(quiet)
            for fault in schedule:
                phase = self.inject(fault)
                during = [
                    a
                    for a in self.acks_of(self.phases.index(phase))
                    if a.t <= phase.heal and (not phase.minority or a.node in phase.minority)
                ]
                phase.visible_after = self.visible_everywhere(during, 90)
                self.log(
                    f"{self.now():7.1f} s  {len(during)} acknowledged during the fault "
                    f"visible everywhere after "
                    + ("-" if phase.visible_after is None else f"{phase.visible_after:.1f} s")
                )
                self.hold(quiet)
        finally:
            self.stop.set()
            for th in threads:
                th.join()
        self.stop.clear()
        wait_for(lambda: settled(self.nodes), 120, "one settled view after the schedule")
        everything = list(self.rec.acks)
        final_wait = self.visible_everywhere(everything, 60)
        self.log(
            f"{self.now():7.1f} s  clients stopped; all acknowledged visible everywhere: "
            + ("never (within 60 s)" if final_wait is None else f"after {final_wait:.1f} s")
        )
        return self.check()

    def acks_of(self, phase: int) -> list[Ack]:
        with self.rec.lock:
            return [a for a in self.rec.acks if a.phase == phase]

    # -- the checker ----------------------------------------------------------

    def check(self) -> dict[str, Any]:
        """Final reads at every node by IMAP and POP3, then ``evaluate``."""
        final_imap: dict[tuple[int, str], dict[int, tuple[str, ...]] | None] = {}
        final_pop: dict[tuple[int, str], list[tuple[str, str]] | None] = {}
        errors: list[str] = []
        for i in range(1, self.count + 1):
            for u in self.users:
                why: list[str] = []
                _, final_imap[i, u.address] = imap_session(i, u, status=False, why=why)
                final_pop[i, u.address] = pop3_listing(i, u, why=why)
                errors += [f"p{i} {u.address}: {w}" for w in why]
        report = evaluate(
            History(self.phases, self.rec.acks, dict(self.rec.attempts), self.rec.polls,
                    self.rec.reads),
            Final(self.now(), final_imap, final_pop),
            self.count, [u.address for u in self.users],
        )  # fmt: skip
        report["users"] = [attrs.asdict(u) for u in self.users]
        report["log_criticals"] = {n.node_id: log_criticals(n.log_path) for n in self.nodes}
        report["final_read_errors"] = errors
        report["acks"] = [attrs.astuple(a) for a in self.rec.acks]
        report["polls_seen"] = [attrs.astuple(p) for p in self.rec.polls]
        return report


def main(argv: list[str] | None = None) -> int:
    """``python -m yimaporc.testing.chaos``: run a schedule, write and print the report."""
    p = argparse.ArgumentParser(prog="python -m yimaporc.testing.chaos", description=__doc__)
    p.add_argument("--schedule", choices=["full", "short"], default="full")
    p.add_argument("--faults", help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--base-dir", type=Path, help="node data and logs (default: a temp dir)")
    p.add_argument("--json", type=Path, default=Path("chaos-report.json"))
    args = p.parse_args(argv)
    kinds = args.faults.split(",") if args.faults else None
    for k in kinds or []:
        if k not in KINDS:
            p.error(f"unknown fault kind {k!r} (one of {', '.join(KINDS)})")
    why = unavailable()
    if why is not None:
        print(f"chaos: {why}", file=sys.stderr)
        return 2
    base = args.base_dir or Path(tempfile.mkdtemp(prefix="yimaporc-chaos-"))
    chaos = Chaos(base, seed=args.seed)
    with chaos.cluster():
        report = chaos.run(schedule(args.schedule, args.seed, kinds))
    report["schedule"] = args.schedule
    report["seed"] = args.seed
    report["logs"] = str(base)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"report: {args.json}; node logs: {base}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
