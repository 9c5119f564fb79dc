"""Mail scenario: shipped Porcupine nodes on the kernel, ``python -m yimaporc.sim.mail``.

Every node is the whole production graph, built by
:meth:`PorcupineNode.from_config <yimaporc.porcupine.node.PorcupineNode.from_config>`
on its host's :class:`~yimaporc.sim.reactor.SimReactor`: the cluster node
(membership, authenticated AMP RPC), the user map, the mail service with its SMTP,
POP3 and IMAP listeners, replication and the cluster wiring.  Its data directory is
the host's disk (it survives a crash); its disk, SQLite and scrypt work runs on the
host's simulated thread pool, so it happens at seeded instants and a crash before a
job finishes loses the job.  Only the reactor, the thread pool, the random sources,
the wall clock and ``uuid4`` are the kernel's.

Clients are scripted line clients (:mod:`._mailclients`) on a client host that is
never cut off: SMTP deliveries to any node, IMAP reads (UIDs and subjects) fed to
:class:`~yimaporc.sim.uidcheck.UidChecker`, POP3 ``UIDL`` listings.
Faults come on a seeded schedule from the kernel's model: partitions (cut links
between the two sides), bridges (one node reaches both sides), pauses, crashes
with a restart on the same disk, and per-host clock skew.

After the faults the scenario heals, restarts every node that is down and reads
every user at every node until :meth:`MailKernelSim.final_problems` holds: every
acknowledged message readable exactly once from every node (IMAP, and as many
POP3 ids), no message shown that was never sent, every node showing the same
messages, and no UID violation seen on the way.  The run's identity is the kernel's
trace digest: the same seed replays the same run.

The run's shape (:class:`Scenario`), its outcome and the node records are in
:mod:`._mailmodel` (re-exported here).
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import maybeDeferred

from ..cluster.membership import TrmConfig
from ..cluster.node import NodeConfig
from ..porcupine.node import PorcupineConfig, PorcupineNode
from ._mailclients import (
    ConversationFactory,
    Step,
    imap_steps,
    parse_imap,
    parse_uidl,
    parse_uidvalidity,
    pop3_steps,
    smtp_steps,
)
from ._mailmodel import (
    CLIENT_IP,
    CLUSTER_PORT,
    DOMAIN,
    IMAP_PORT,
    PASSWORD,
    POP3_PORT,
    REPLICATION,
    SECRET,
    SMTP_PORT,
    Livelock,
    MailHost,
    Outcome,
    Scenario,
    close_files,
    refusal_reason,
    seeded_uuid4,
)
from .kernel import Faults, SimKernel
from .reactor import SimReactor
from .uidcheck import UidChecker

#: The steps of the "clockstep" fault (the real chaos run's faketime restarts).
CLOCK_STEPS = (20.0, -15.0, 45.0)

__all__ = [
    "CLOCK_STEPS",
    "IMAP_PORT",
    "Livelock",
    "MailHost",
    "MailKernelSim",
    "Outcome",
    "Scenario",
    "main",
    "run_seed",
]


class MailKernelSim:
    """``PorcupineNode`` s on one :class:`SimKernel`, driven by scripted mail clients."""

    def __init__(self, seed: int, scenario: Scenario | None = None) -> None:
        self.seed = seed
        self.scenario = sc = scenario or Scenario()
        self.kernel = SimKernel(seed, faults=Faults(latency=sc.latency))
        self.rng = self.kernel.rng
        self.trm = TrmConfig()
        self.hosts: dict[str, MailHost] = {}
        ips = [f"10.0.1.{i + 1}" for i in range(sc.nodes)]
        for i, ip in enumerate(ips):
            skew = self.rng.uniform(-sc.skew, sc.skew)
            node_id = f"p{i}"
            host = self.kernel.add_host(node_id, ip, skew=skew)
            seeds = tuple(f"{other}:{CLUSTER_PORT}" for other in ips if other != ip)[:2]
            self.hosts[node_id] = MailHost(node_id, host, seeds, skew=skew)
        self.client_host = self.kernel.add_host("client", CLIENT_IP)
        self.client: SimReactor = self.kernel.boot(self.client_host)
        self.users = [f"u{i}@{DOMAIN}" for i in range(sc.users)]
        self.checker = UidChecker()
        #: message subject -> user, for every SMTP session started / answered 250
        self.sent: dict[str, str] = {}
        self.acked: dict[str, str] = {}
        self.fault_log: list[str] = []
        #: user -> the INBOX's UIDVALIDITY once a client was shown messages in it
        self.validity: dict[str, int] = {}
        self._cut: list[tuple[str, str]] = []

    def close(self) -> None:
        """Remove the host disks."""
        self.kernel.close()

    def __enter__(self) -> MailKernelSim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def now(self) -> float:
        return self.kernel.now

    # --- nodes ---------------------------------------------------------------------

    def start(self, node_id: str) -> PorcupineNode:
        """Boot (or reboot) a node's process on its disk: the whole shipped graph."""
        m = self.hosts[node_id]
        reactor = self.kernel.boot(m.host)
        ip = m.ip
        config = PorcupineConfig(
            NodeConfig(
                node_id=node_id,
                kind="porcupine",
                data_dir=m.host.disk,
                cluster_host=ip,
                cluster_port=CLUSTER_PORT,
                join=m.seeds,
                trm=self.trm,
                cluster_name="sim",
            ),
            SECRET,
            domains=(DOMAIN,),
            smtp=f"tcp:{SMTP_PORT}:interface={ip}",
            pop3=f"tcp:{POP3_PORT}:interface={ip}",
            imap=f"tcp:{IMAP_PORT}:interface={ip}",
            replication=REPLICATION,
            allow_plaintext_auth=True,
            forward_deliveries=self.scenario.handover,
        )
        node = PorcupineNode.from_config(
            reactor,
            config,
            rng=random.Random(self.rng.getrandbits(64)),
            threadpool=reactor.getThreadPool(),  # type: ignore[arg-type]
            wall_clock=m.host.wall_time,
        )
        m.node = node
        m.boots += 1
        node.service.startService()
        return node

    def crash(self, node_id: str) -> None:
        """SIGKILL: the process vanishes; the OS closes its files (the disk stays)."""
        m = self.hosts[node_id]
        node, m.node = m.node, None
        self.kernel.crash(m.host)
        if node is not None:
            close_files(node)

    def up(self) -> list[str]:
        """The nodes running now."""
        return [n for n, m in self.hosts.items() if m.node is not None]

    # --- topology --------------------------------------------------------------------

    def split(self, left: list[str], right: list[str], bridge: str | None = None) -> None:
        """Cut every link between ``left`` and ``right`` (except the bridge's)."""
        for a in left:
            for b in right:
                if bridge not in (a, b):
                    self.kernel.cut(a, b)

    def heal(self) -> None:
        """Every link works again."""
        self.kernel.heal()

    # --- clients ----------------------------------------------------------------------

    def converse(self, node_id: str, port: int, steps: list[Step], done: Any) -> None:
        """Open a client connection to ``node_id:port`` and run ``steps``."""
        factory = ConversationFactory(steps, done, self.client, self.scenario.client_timeout)
        self.client.connectTCP(self.hosts[node_id].ip, port, factory, timeout=5.0)

    def deliver(self, node_id: str, user: str, subject: str) -> None:
        """An SMTP client sends one message for ``user`` through ``node_id``."""
        self.sent[subject] = user
        message = (
            f"From: sender@else.where\r\nTo: {user}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@sim>\r\n\r\nbody of {subject}\r\n"
        ).encode()

        def done(replies: list[bytes], ok: bool) -> None:
            self.kernel.record(None, f"smtp {subject} {ok}")
            if ok or (len(replies) >= 6 and replies[5][:3] == b"250"):
                self.acked[subject] = user

        self.converse(node_id, SMTP_PORT, smtp_steps("sender@else.where", user, message), done)

    def read(self, node_id: str, user: str, answer: Callable[[Any], None] | None = None) -> None:
        """An IMAP client lists ``user``'s INBOX at ``node_id`` (checked by the checker)."""

        def done(replies: list[bytes], ok: bool) -> None:
            parsed = parse_imap(replies) if ok or len(replies) >= 4 else None
            if parsed is None:
                self.checker.refusals += 1
                self.checker.refused_why[refusal_reason(replies)] += 1
                self.kernel.record(None, f"imap {node_id} {user} refused")
            else:
                listing, uidnext = parsed
                validity = parse_uidvalidity(replies)
                self.kernel.record(None, f"imap {node_id} {user} {listing} {uidnext} {validity}")
                self.checker.read(node_id, user, listing, uidnext)
                self._validity(node_id, user, validity, bool(listing))
            if answer is not None:
                answer(parsed)

        self.converse(node_id, IMAP_PORT, imap_steps(user, PASSWORD), done)

    def _validity(self, node_id: str, user: str, validity: int | None, shown: bool) -> None:
        """Once messages were shown in the INBOX under a UIDVALIDITY, every later SELECT
        anywhere gives the same one (nothing here deletes or recreates a mailbox, so a
        change tells a client to drop every UID it cached)."""
        before = self.validity.get(user)
        if before is not None and validity != before:
            self.checker.violations.append(
                f"{user} at {node_id}: UIDVALIDITY {validity}, messages were shown under {before}"
            )
        elif before is None and shown and validity is not None:
            self.validity[user] = validity

    def pop_ids(self, node_id: str, user: str, answer: Callable[[Any], None]) -> None:
        """A POP3 client lists ``user``'s message ids at ``node_id``."""

        def done(replies: list[bytes], ok: bool) -> None:
            answer(parse_uidl(replies) if ok or len(replies) >= 4 else None)

        self.converse(node_id, POP3_PORT, pop3_steps(user, PASSWORD), done)

    # --- the run ----------------------------------------------------------------------

    def run_for(self, seconds: float, stop: Callable[[], bool] | None = None) -> bool:
        """Advance the kernel by ``seconds``; with ``stop``, return early once it holds.
        Raises :class:`Livelock` past the scenario's event budget (events that keep time
        from moving on: a bug to replay with the seed, not a run to wait for)."""
        kernel, budget = self.kernel, self.scenario.max_events

        def check() -> bool:
            if kernel.events > budget:
                raise Livelock(f"seed {self.seed}: over {budget} events at t={kernel.now:.6f}")
            return stop() if stop is not None else False

        return kernel.run_for(seconds, check)

    def boot_all(self, limit: float = 60.0) -> None:
        """Start every node, wait until all listen and see each other, add the users."""
        for node_id in self.hosts:
            self.start(node_id)

        def formed() -> bool:
            for m in self.hosts.values():
                n = m.node
                if n is None or not n.mail.ports or len(n.node.view.members) != len(self.hosts):
                    return False
            return True

        if not self.run_for(limit, formed):
            raise RuntimeError(f"seed {self.seed}: the cluster did not form in {limit} s")
        added: list[object] = []
        first = self.hosts["p0"].node
        assert first is not None
        for i, user in enumerate(self.users):
            replicas = 1 + i % min(self.scenario.max_replicas, len(self.hosts))
            d = first.mail.add_user(user, PASSWORD, replicas)
            d.addBoth(added.append)
        if not self.run_for(limit, lambda: len(added) == len(self.users)):
            raise RuntimeError(f"seed {self.seed}: users not added in {limit} s: {added}")
        bad = [a for a in added if not hasattr(a, "address")]
        if bad:
            raise RuntimeError(f"seed {self.seed}: adding users failed: {bad}")
        # every node knows every profile before the workload starts
        self.run_for(2.0)

    def schedule(self) -> None:
        """Deliveries, reads and faults at seeded instants within the window."""
        sc, rng, t0 = self.scenario, self.rng, self.now
        nodes = sorted(self.hosts)
        for k in range(sc.messages):
            when = t0 + rng.uniform(0, sc.window)
            node, user = rng.choice(nodes), rng.choice(self.users)
            self.kernel.at(when, functools.partial(self._if_up, node, self.deliver, user, f"m{k}"))
        for _ in range(sc.reads):
            when = t0 + rng.uniform(0, sc.window)
            node, user = rng.choice(nodes), rng.choice(self.users)
            self.kernel.at(when, functools.partial(self._if_up, node, self.read, user))
        for _ in range(sc.faults):
            when = t0 + rng.uniform(0, sc.window)
            self.kernel.at(when, self._fault)

    def _if_up(self, node_id: str, fn: Callable[..., None], *args: Any) -> None:
        if self.hosts[node_id].node is not None:
            fn(node_id, *args)

    def _fault(self) -> None:
        rng, nodes = self.rng, sorted(self.hosts)
        kind = rng.choice(list(self.scenario.fault_kinds))
        duration = rng.uniform(1.0, 8.0)
        if kind in ("partition", "bridge") and len(nodes) >= 2:
            shuffled = rng.sample(nodes, len(nodes))
            cut = rng.randint(1, len(nodes) - 1)
            left, right = shuffled[:cut], shuffled[cut:]
            bridge = None
            if kind == "bridge" and len(nodes) >= 3:
                bridge = rng.choice(nodes)
                left = [n for n in left if n != bridge]
                right = [n for n in right if n != bridge]
            self.split(left, right, bridge)
            self._note(f"{kind} {left}|{right} via {bridge} for {duration:.1f}s")
            self.kernel.at(self.now + duration, self._heal_one)
        elif kind == "pause":
            node = rng.choice(nodes)
            self.kernel.pause(self.hosts[node].host, duration)
            self._note(f"pause {node} {duration:.1f}s")
        elif kind == "rolling":
            # Every node in turn: a graceful stop (SIGTERM), back 1.5 s later.
            for i, node in enumerate(self.up()):
                self.kernel.at(self.now + 5.0 * i, functools.partial(self._roll, node))
            self._note("rolling restart of every node, 5 s apart")
        else:
            alive = self.up()
            if not alive:
                return
            node = rng.choice(alive)
            step = rng.choice(CLOCK_STEPS) if kind == "clockstep" else 0.0
            self.crash(node)
            self._note(f"crash {node}, restart after {duration:.1f}s"
                       + (f" with its clock {step:+.0f}s" if step else ""))  # fmt: skip
            self.kernel.at(self.now + duration, lambda: self._restart(node, step))

    def _heal_one(self) -> None:
        self.heal()
        self._note("heal")

    def _restart(self, node_id: str, step: float = 0.0) -> None:
        m = self.hosts[node_id]
        if m.node is None:
            # A clock step lasts for that boot (faketime on one run of the process).
            m.host.skew = m.skew + step
            self.start(node_id)
            self._note(f"restart {node_id}")

    def _roll(self, node_id: str) -> None:
        """SIGTERM: the node's services stop (up to 5 s), then the process exits."""
        m = self.hosts[node_id]
        node = m.node
        if node is None:
            return

        def exit_(_: object = None) -> None:
            if m.node is node:  # not yet gone (the stop's end and the 5 s kill both call)
                self.crash(node_id)
                self._note(f"{node_id} stopped, restart after 1.5s")
                self.kernel.at(self.now + 1.5, lambda: self._restart(node_id))

        d = maybeDeferred(node.service.stopService)
        d.addBoth(exit_)
        self.kernel.at(self.now + 5.0, exit_)  # a stop that hangs is killed

    def _note(self, what: str) -> None:
        self.fault_log.append(f"{self.now:.2f} {what}")
        self.kernel.record(None, "fault " + what)

    def heal_all(self) -> None:
        """Heal every link, restart every node that is down."""
        self.heal()
        for node_id, m in self.hosts.items():
            if m.node is None:
                self.start(node_id)

    def final_problems(self) -> list[str]:
        """Read every user at every node, every 5 s until every invariant holds or the
        settle time is over; the problems of the last round plus every UID violation."""
        deadline = self.now + self.scenario.settle
        while True:
            problems = self._check_round()
            if not problems or self.now >= deadline:
                return list(self.checker.violations) + problems
            self.run_for(5.0)

    def _check_round(self) -> list[str]:
        results: dict[tuple[str, str, str], Any] = {}
        for user in self.users:
            for node_id in sorted(self.hosts):
                # one client at a time, as an operator's checker would
                for proto, fn in (("imap", self.read), ("pop3", self.pop_ids)):
                    key = (proto, node_id, user)
                    fn(node_id, user, functools.partial(results.__setitem__, key))
                    self.run_for(
                        self.scenario.client_timeout + 1.0,
                        functools.partial(results.__contains__, key),
                    )
        out: list[str] = []
        for user in self.users:
            want = sorted(s for s, u in self.acked.items() if u == user)
            shown: dict[str, list[str]] = {}
            for node_id in sorted(self.hosts):
                got = results.get(("imap", node_id, user))
                if got is None:
                    out.append(f"{user} at {node_id}: IMAP read refused or unanswered")
                    continue
                subjects = [s for s, _ in got[0]]
                shown[node_id] = sorted(subjects)
                for s in want:
                    if subjects.count(s) != 1:
                        out.append(
                            f"{user} at {node_id}: {s} acknowledged, shown {subjects.count(s)} times"
                        )
                for s in sorted(set(subjects)):
                    if self.sent.get(s) != user:
                        out.append(f"{user} at {node_id}: {s} shown, never sent to this user")
                    elif subjects.count(s) > 1:
                        out.append(f"{user} at {node_id}: {s} shown {subjects.count(s)} times")
                ids = results.get(("pop3", node_id, user))
                if ids is None:
                    out.append(f"{user} at {node_id}: POP3 read refused or unanswered")
                elif len(ids) != len(subjects) or len(set(ids)) != len(ids):
                    out.append(
                        f"{user} at {node_id}: POP3 lists {len(ids)} ids, IMAP {len(subjects)}"
                    )
            if len({tuple(v) for v in shown.values()}) > 1:
                out.append(f"{user}: nodes show different messages: {shown}")
        return out

    def run(self) -> Outcome:
        """Boot, run the schedule, heal, check; what happened and what broke."""
        cpu = time.process_time()
        with seeded_uuid4(random.Random(self.rng.getrandbits(64))):
            self.boot_all()
            self.schedule()
            self.run_for(self.scenario.window + 10.0)
            self.heal_all()
            self._note("heal all")
            problems = self.final_problems()
        return Outcome(
            seed=self.seed,
            digest=self.kernel.trace_digest(),
            problems=problems,
            acked=len(self.acked),
            sent=len(self.sent),
            reads=self.checker.reads,
            refusals=self.checker.refusals,
            faults=list(self.fault_log),
            events=self.kernel.events,
            sim_seconds=round(self.now, 3),
            cpu_seconds=round(time.process_time() - cpu, 3),
        )


def run_seed(seed: int, scenario: Scenario | None = None) -> Outcome:
    """One seed, start to finish (the disks removed afterwards)."""
    with MailKernelSim(seed, scenario) as sim:
        return sim.run()


def main(argv: list[str] | None = None) -> int:
    """``python -m yimaporc.sim.mail [--seeds N] [--first S] [--nodes N] ...``"""
    p = argparse.ArgumentParser(prog="python -m yimaporc.sim.mail", description=__doc__)
    p.add_argument("--seeds", type=int, default=10, help="how many seeds (default 10)")
    p.add_argument("--first", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--seed", type=int, action="append", default=[], help="run only this seed")
    default = Scenario()
    p.add_argument("--nodes", type=int, default=default.nodes)
    p.add_argument("--users", type=int, default=default.users)
    p.add_argument("--messages", type=int, default=default.messages)
    p.add_argument("--faults", type=int, default=default.faults)
    p.add_argument("--reads", type=int, default=default.reads)
    p.add_argument("--window", type=float, default=default.window, help="seconds (simulated)")
    p.add_argument("--max-replicas", type=int, default=default.max_replicas,
                   help="users get 1..this many replicas in turn")  # fmt: skip
    p.add_argument("--json", action="store_true", help="one JSON object per seed")
    args = p.parse_args(argv)
    for name in ("seeds", "nodes", "users", "messages", "max_replicas"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.faults < 0 or args.reads < 0 or args.window <= 0:
        p.error("--faults and --reads must not be negative, --window must be positive")
    scenario = Scenario(
        nodes=args.nodes,
        users=args.users,
        messages=args.messages,
        faults=args.faults,
        reads=args.reads,
        window=args.window,
        max_replicas=args.max_replicas,
    )
    seeds = args.seed or list(range(args.first, args.first + args.seeds))
    failed = 0
    started, cpu_started = time.monotonic(), time.process_time()
    for seed in seeds:
        try:
            out = run_seed(seed, scenario)
        except Livelock as e:
            failed += 1
            print(f"seed {seed}: LIVELOCK {e}", flush=True)
            continue
        failed += bool(out.problems)
        if args.json:
            print(json.dumps(out.as_json()), flush=True)
        else:
            verdict = "ok" if not out.problems else f"{len(out.problems)} PROBLEMS"
            print(
                f"seed {seed}: {verdict}  acked {out.acked}/{out.sent} reads {out.reads} "
                f"refused {out.refusals} faults {len(out.faults)} cpu {out.cpu_seconds}s "
                f"trace {out.digest[:16]}",
                flush=True,
            )
            for problem in out.problems[:20]:
                print(f"    {problem}", flush=True)
    elapsed = time.monotonic() - started
    cpu = time.process_time() - cpu_started
    print(
        f"{len(seeds)} seeds, {failed} failing, {60 * len(seeds) / max(elapsed, 1e-9):.1f} "
        f"seeds/min ({60 * len(seeds) / max(cpu, 1e-9):.1f} per CPU minute)",
        file=sys.stderr,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
