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

Run ``python -m yimaporc.testing.chaos --schedule full --json chaos-report.json``
(root only; ``make chaos``); docs/chaos.md says what is checked.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import imaplib
import json
import os
import poplib
import random
import re
import shutil
import signal
import smtplib
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

from yimaporc.testing.procs import NodeProc, wait_for

PREFIX = "ychaos"
BRIDGE = "ychbr0"
NET = "10.123.0"
CLIENT_IP = f"{NET}.254"
CLUSTER, ADMIN, SMTP, POP3, IMAP = 7946, 8080, 2525, 1110, 1143
LOCK = Path(tempfile.gettempdir()) / "yimaporc-chaos.lock"
MARKER = re.compile(rb"Subject: chaos (\S+)")
KINDS = ("partition", "bridge", "kill", "pause", "skew", "rolling")
#: Socket timeout of every IMAP/POP3 operation (a paused node holds a reader this long).
IO_TIMEOUT = 10.0
#: SMTP clients wait longer: a node whose peers are cut off answers after its RPC
#: timeouts (10 s), and a real MTA waits minutes for the reply to the final dot.
SMTP_TIMEOUT = 40.0
GREETING_TIMEOUT = 3.0


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def unavailable() -> str | None:
    """Why chaos runs cannot work here (not root, no ``ip``/``iptables``, no network
    namespaces, no libfaketime), or None."""
    if os.geteuid() != 0:
        return "chaos runs need root (network namespaces, veth, iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if faketime_lib() is None:
        return "libfaketime is not installed (apt-get install faketime)"
    probe = f"{PREFIX}-probe"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        rules = _run("ip", "netns", "exec", probe, "iptables", "-S", check=False)
        if rules.returncode != 0:
            return f"iptables does not work in a namespace: {rules.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


def faketime_lib() -> str | None:
    """The multi-threaded libfaketime (the ``faketime`` command forks, so its PID is
    not the node's: we preload the library ourselves)."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
    found += sorted(glob.glob("/usr/lib/faketime/libfaketimeMT.so.1"))
    return found[0] if found else None


def ip_of(i: int) -> str:
    """Node ``i``'s address on the bridge."""
    return f"{NET}.{i}"


class Network:
    """The bridge, one namespace per node, and the iptables cuts between them."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.cuts: set[tuple[int, int]] = set()

    @staticmethod
    def ns(i: int) -> str:
        """Node ``i``'s namespace."""
        return f"{PREFIX}-p{i}"

    @staticmethod
    def cleanup_leftovers() -> list[str]:
        """Remove namespaces, bridge and veths a previous run left behind (killing, by
        PID, the processes still inside those namespaces); return what was removed."""
        gone = []
        listing = _run("ip", "netns", "list", check=False).stdout.split("\n")
        for line in listing:
            name = line.split(" ")[0]
            if not name.startswith(PREFIX + "-"):
                continue
            for pid in _run("ip", "netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _run("ip", "netns", "del", name, check=False)
            gone.append(name)
        links = _run("ip", "-o", "link", "show", check=False).stdout
        for name in re.findall(r"^\d+: (ych[a-z]*\d+)[@:]", links, re.M):
            _run("ip", "link", "del", name, check=False)
            gone.append(name)
        return gone

    def setup(self) -> None:
        """The bridge with the clients' address, and a namespace per node."""
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{CLIENT_IP}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for i in range(1, self.count + 1):
            ns, outer, inner = self.ns(i), f"ychv{i}", f"ychn{i}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            _run("ip", "link", "set", inner, "netns", ns)
            _run("ip", "link", "set", outer, "master", BRIDGE)
            _run("ip", "link", "set", outer, "up")
            inside = ("ip", "netns", "exec", ns)
            _run(*inside, "ip", "link", "set", "lo", "up")
            _run(*inside, "ip", "addr", "add", f"{ip_of(i)}/24", "dev", inner)
            _run(*inside, "ip", "link", "set", inner, "up")

    def teardown(self) -> None:
        """Remove everything ``setup`` made."""
        self.cleanup_leftovers()

    def cut(self, groups: list[set[int]]) -> None:
        """Drop traffic between every two nodes that share no group (both directions,
        in both namespaces)."""
        for i in range(1, self.count + 1):
            for j in range(i + 1, self.count + 1):
                if not any(i in g and j in g for g in groups):
                    for a, b in ((i, j), (j, i)):
                        inside = ("ip", "netns", "exec", self.ns(a), "iptables")
                        _run(*inside, "-A", "INPUT", "-s", ip_of(b), "-j", "DROP")
                        _run(*inside, "-A", "OUTPUT", "-d", ip_of(b), "-j", "DROP")
                    self.cuts.add((i, j))

    def heal(self) -> None:
        """Remove every cut."""
        for i in range(1, self.count + 1):
            for chain in ("INPUT", "OUTPUT"):
                _run("ip", "netns", "exec", self.ns(i), "iptables", "-F", chain)
        self.cuts.clear()


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


def message(user: str, marker: str) -> bytes:
    """The test message for ``marker``."""
    return (
        f"From: chaos@client.example\r\nTo: {user}\r\nSubject: chaos {marker}\r\n"
        f"Message-ID: <{marker}@chaos>\r\n\r\nbody of {marker}\r\n"
    ).encode()


def smtp_send(node: int, user: str, marker: str) -> bool:
    """One delivery through ``node``; True on a 250 for the recipient."""
    try:
        # A paused node completes the TCP handshake (the kernel does) but sends no
        # greeting: give up on it quickly, then wait long for the answers.
        with smtplib.SMTP(ip_of(node), SMTP, timeout=GREETING_TIMEOUT) as s:
            if s.sock is not None:
                s.sock.settimeout(SMTP_TIMEOUT)
            refused = s.sendmail("chaos@client.example", [user], message(user, marker))
        return not refused
    except (smtplib.SMTPException, OSError):
        return False


def _markers_of(data: list[Any]) -> dict[int, tuple[str, ...]]:
    out: dict[int, list[str]] = defaultdict(list)
    for item in data:
        if not isinstance(item, tuple):
            continue
        uid = re.search(rb"UID (\d+)", item[0])
        found = MARKER.search(item[1])
        if uid is not None:
            out[int(uid.group(1))].append(found.group(1).decode() if found else "?")
    return {k: tuple(v) for k, v in out.items()}


def imap_session(
    node: int,
    user: User,
    status: bool = True,
    listing: bool = True,
    why: list[str] | None = None,
) -> tuple[tuple[int, int, int] | None, dict[int, tuple[str, ...]] | None]:
    """STATUS (UIDNEXT, UIDVALIDITY, MESSAGES) and the UID listing of INBOX at
    ``node``; either is None when refused (``NO [UNAVAILABLE]``) or out of reach
    (the reason appended to ``why``)."""
    why = [] if why is None else why
    got_status: tuple[int, int, int] | None = None
    got_list: dict[int, tuple[str, ...]] | None = None
    try:
        m = imaplib.IMAP4(ip_of(node), IMAP, timeout=IO_TIMEOUT)
    except OSError as e:
        why.append(f"connect: {e}")
        return None, None
    try:
        m.login(user.address, user.password)
        if status:
            typ, data = m.status("INBOX", "(UIDNEXT UIDVALIDITY MESSAGES)")
            if typ == "OK" and data and isinstance(data[0], bytes):
                fields = dict(re.findall(rb"(UIDNEXT|UIDVALIDITY|MESSAGES) (\d+)", data[0]))
                got_status = (
                    int(fields[b"UIDNEXT"]),
                    int(fields[b"UIDVALIDITY"]),
                    int(fields[b"MESSAGES"]),
                )
        if listing:
            typ, data = m.select("INBOX", readonly=True)
            if typ == "OK":
                typ, data = m.uid("FETCH", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
                if typ == "OK":
                    got_list = _markers_of(data)
                else:
                    why.append(f"UID FETCH: {typ} {data!r:.200}")
            else:
                why.append(f"SELECT: {typ} {data!r:.200}")
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            m.logout()
    except (imaplib.IMAP4.error, OSError, KeyError, ValueError) as e:
        why.append(f"{type(e).__name__}: {e}")
        with contextlib.suppress(OSError):
            m.shutdown()
    return got_status, got_list


def pop3_listing(
    node: int, user: User, why: list[str] | None = None
) -> list[tuple[str, str]] | None:
    """(UIDL, marker from TOP n 0) for every message POP3 lists at ``node``; None
    when refused or out of reach (the reason appended to ``why``)."""
    why = [] if why is None else why
    try:
        p = poplib.POP3(ip_of(node), POP3, timeout=IO_TIMEOUT)
    except OSError as e:
        why.append(f"connect: {e}")
        return None
    try:
        p.user(user.address)
        p.pass_(user.password)
        _, lines, _ = p.uidl()
        out = []
        for line in lines:
            k, uidl = line.split()
            try:
                _, head, _ = p.top(int(k), 0)
            except poplib.error_proto as e:  # one message unreadable: say which
                why.append(f"TOP {int(k)} (UIDL {uidl.decode()}): {e}")
                out.append((uidl.decode(), "?"))
                continue
            found = MARKER.search(b"\r\n".join(head))
            out.append((uidl.decode(), found.group(1).decode() if found else "?"))
        p.quit()
        return out
    except (poplib.error_proto, OSError, ValueError) as e:
        why.append(f"{type(e).__name__}: {e}")
        with contextlib.suppress(OSError):
            p.close()
        return None


class Recorder:
    """Everything the clients saw, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acks: list[Ack] = []
        self.attempts: dict[int, int] = defaultdict(int)
        self.polls: list[Poll] = []
        self.reads: list[Read] = []
        self.phase = 0
        self.seq = 0

    def next_marker(self, run: str) -> tuple[str, int]:
        with self.lock:
            self.seq += 1
            self.attempts[self.phase] += 1
            return f"{run}-{self.seq}", self.phase


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
                        bad(kind_of(m), "below_seen",
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
                "uid_shared", "uid_changed", "below_seen", "uidnext_decreased",
                "uidvalidity_changed", "uidl_shared", "unreadable")  # fmt: skip
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
        "ok": all(total[c] == 0 for c in counters[2:]),
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
            "below_seen", "uidnext_decreased", "uidvalidity_changed", "uidl_shared",
            "unreadable")  # fmt: skip
    short = ("acked", "missing", "dup", "hidden", "uid2x", "uidchg", "below", "uidnext-",
             "uidval", "uidl2x", "unread")  # fmt: skip
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
