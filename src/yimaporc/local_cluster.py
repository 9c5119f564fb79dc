"""``yimaporc local-cluster``: the demo cluster as child ``twistd`` processes.

Porcupine node i listens on 127.0.1.i and Yima node i on 127.0.2.i (ports of
CONTRACT §2).  The two clusters are kept apart: each has its own secret
(``BASE/KIND/cluster.secret``) and its own name (``--cluster-name local-KIND``).  Lines are printed as they become true (``admin ...``, then the
services each node reports, then ``ready``); Ctrl-C or SIGTERM stops every
child by PID.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs

from .admin.client import AdminClient, AdminError
from .secret import admin_token, load_or_create_secret
from .yima.demo import DemoError, ensure_sample

PORTS = {"smtp": 2525, "pop3": 1110, "imap": 1143, "rtsp": 8554, "admin": 8080, "cluster": 7946}
#: Mail submission (587 and 465 style) on unprivileged ports, with the demo certificate.
SUBMISSION_PORTS = {"submission": 1587, "submissions": 1465}
DEMO_USER = "demo@example.org"
DEMO_PASSWORD = "demo"
DOMAIN = "example.org"


class LocalClusterError(Exception):
    """The demo cluster could not start (message is user-facing)."""


@attrs.define
class Child:
    """One node process."""

    node_id: str
    kind: str
    host: str
    argv: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def admin_url(self) -> str:
        """Its admin API."""
        return f"http://{self.host}:{PORTS['admin']}"


def twistd_path() -> str:
    """The twistd next to this Python (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / "twistd"
    if local.exists():
        return str(local)
    found = shutil.which("twistd")
    if found is None:
        raise LocalClusterError("twistd not found; run 'make install'")
    return found


def secret_path(base: Path, kind: str) -> Path:
    """The secret of the local cluster of ``kind`` (one per cluster)."""
    return base / kind / "cluster.secret"


def demo_certificate(base: Path) -> tuple[Path, Path]:
    """BASE/tls/cert.pem and key.pem, made once (self-signed, valid 10 years)."""
    directory = base / "tls"
    cert, key = directory / "cert.pem", directory / "key.pem"
    if not (cert.exists() and key.exists()):
        from .certs import make_cert

        directory.mkdir(parents=True, exist_ok=True)
        make_cert(directory, days=3650)
    return cert, key


def node_argv(kind: str, i: int, base: Path, secret: Path) -> tuple[str, str, list[str]]:
    """(node_id, host, twistd argv) for node ``i`` (1-based) of ``kind``."""
    net = 1 if kind == "porcupine" else 2
    host = f"127.0.{net}.{i}"
    node_id = f"{kind[0]}{i}"
    data = base / kind / node_id

    def ep(port: int) -> str:
        return f"tcp:{port}:interface={host}"

    argv = [
        twistd_path(),
        "-n",
        "--pidfile=",
        "--logfile",
        str(base / "logs" / f"{node_id}.log"),
        f"{kind}-node",
        "--node-id",
        node_id,
        "--data-dir",
        str(data),
        "--cluster",
        ep(PORTS["cluster"]),
        "--admin",
        ep(PORTS["admin"]),
        "--secret-file",
        str(secret),
        "--cluster-name",
        f"local-{kind}",
    ]
    if i > 1:
        argv += ["--join", f"127.0.{net}.1:{PORTS['cluster']}"]
    if kind == "porcupine":
        argv += ["--domain", DOMAIN]
        for svc in ("smtp", "pop3", "imap"):
            argv += [f"--{svc}", ep(PORTS[svc])]
        # A self-signed certificate so that users can submit mail (AUTH is TLS-only);
        # IMAP and POP3 logins stay allowed in clear, as the demo is on loopback.
        cert, key = demo_certificate(base)
        argv += ["--tls-cert", str(cert), "--tls-key", str(key), "--allow-plaintext-auth"]
        for svc, port in SUBMISSION_PORTS.items():
            argv += [f"--{svc}", ep(port)]
    else:
        argv += ["--rtsp", ep(PORTS["rtsp"])]
    return node_id, host, argv


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _connectable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


class LocalCluster:
    """Starts, watches and stops the demo nodes."""

    def __init__(
        self,
        base_dir: Path,
        porcupine: int = 3,
        yima: int = 3,
        timeout: float = 60.0,
        mail_args: list[str] | None = None,
    ) -> None:
        if not 0 <= porcupine <= 250 or not 0 <= yima <= 250 or porcupine + yima == 0:
            raise LocalClusterError("--porcupine and --yima must be 0..250, not both 0")
        self.base = base_dir.absolute()
        self.timeout = timeout
        self.children: list[Child] = []
        (self.base / "logs").mkdir(parents=True, exist_ok=True)
        self.tokens: dict[str, str] = {}
        for kind, n in (("porcupine", porcupine), ("yima", yima)):
            if n == 0:
                continue
            secret = secret_path(self.base, kind)
            self.tokens[kind] = admin_token(load_or_create_secret(secret))
            for i in range(1, n + 1):
                node_id, host, argv = node_argv(kind, i, self.base, secret)
                if kind == "porcupine":
                    argv += mail_args or []
                log = self.base / "logs" / f"{node_id}.log"
                self.children.append(Child(node_id, kind, host, argv, log))
        self._stopping = False

    def say(self, line: str) -> None:
        """Print one progress line at once."""
        print(line, flush=True)

    def run(self) -> int:
        """Start everything, print the lines, wait for a signal, stop everything."""
        signal.signal(signal.SIGTERM, self._on_signal)
        try:
            self.start()
            self.say("ready")
            self.watch()
        except LocalClusterError as e:
            sys.stderr.write(f"error: {e}\n")
            return 1
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
        return 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def start(self) -> None:
        """Launch the nodes and wait until they serve and agree on membership."""
        for child in self.children:
            for port in (PORTS["cluster"], PORTS["admin"]):
                if not _port_free(child.host, port):
                    raise LocalClusterError(
                        f"{child.host}:{port} is in use (another local-cluster running?)"
                    )
        for child in self.children:
            child.process = subprocess.Popen(
                child.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.timeout
        statuses = {c.node_id: self._wait_status(c, deadline) for c in self.children}
        firsts = {}
        for child in self.children:
            if child.kind not in firsts:
                firsts[child.kind] = child
                self.say(f"admin {child.admin_url}")
        for kind in firsts:
            group = [c for c in self.children if c.kind == kind]
            self._wait_converged(group, deadline)
        self._setup(firsts, statuses, deadline)

    def _client(self, child: Child) -> AdminClient:
        return AdminClient(child.admin_url, self.tokens[child.kind], timeout=120.0)

    def _wait_status(self, child: Child, deadline: float) -> dict[str, Any]:
        while True:
            self._check_alive(child)
            try:
                doc: dict[str, Any] = self._client(child).get("/api/status")
                return doc
            except AdminError:
                pass
            if time.monotonic() > deadline:
                raise LocalClusterError(f"{child.node_id} did not answer (see {child.log})")
            time.sleep(0.1)

    def _wait_converged(self, group: list[Child], deadline: float) -> None:
        want = {c.node_id for c in group}
        while True:
            views: list[tuple[int, frozenset[str]] | None] = []
            for child in group:
                self._check_alive(child)
                try:
                    doc = self._client(child).get("/api/status")
                except AdminError:
                    views.append(None)
                    continue
                views.append((doc["epoch"], frozenset(m["node_id"] for m in doc["members"])))
            if all(v is not None and v[1] == want for v in views) and len(set(views)) == 1:
                return
            if time.monotonic() > deadline:
                raise LocalClusterError(
                    f"nodes {sorted(want)} did not agree on membership in time: {views}"
                )
            time.sleep(0.2)

    def _setup(
        self, firsts: dict[str, Child], statuses: dict[str, dict[str, Any]], deadline: float
    ) -> None:
        """Demo data (user, sample clip) where the services exist; print service lines."""
        for kind, child in firsts.items():
            services: dict[str, str] = statuses[child.node_id].get("services", {})
            if kind == "porcupine" and "users" in statuses[child.node_id]:
                self._ensure_demo_user(child)
            if kind == "yima" and "media" in statuses[child.node_id]:
                self._ensure_sample(child)
            for name in ("smtp", "imap", "pop3", "rtsp"):
                address = services.get(name)
                if address is None:
                    continue
                hostport = address.removeprefix("rtsp://").split("/")[0]
                while not _connectable(hostport):
                    if time.monotonic() > deadline:
                        raise LocalClusterError(f"{name} on {address} does not accept connections")
                    time.sleep(0.1)
                self.say(f"{name} {address}")

    def _ensure_demo_user(self, child: Child) -> None:
        client = self._client(child)
        try:
            client.post(
                "/api/mail/users",
                {"address": DEMO_USER, "password": DEMO_PASSWORD, "replicas": 2},
            )
        except AdminError as e:
            if "409" not in str(e):
                raise LocalClusterError(f"cannot create {DEMO_USER}: {e}") from e

    def _ensure_sample(self, child: Child) -> None:
        try:
            ensure_sample(self._client(child), self.base)
        except DemoError as e:
            raise LocalClusterError(str(e)) from e

    def _check_alive(self, child: Child) -> None:
        if child.process is not None and child.process.poll() is not None:
            tail = ""
            try:
                tail = child.log.read_text(errors="replace").strip().splitlines()[-1]
            except (OSError, IndexError):
                pass
            raise LocalClusterError(
                f"{child.node_id} exited with {child.process.returncode} ({child.log}): {tail}"
            )

    def watch(self) -> None:
        """Sleep until a signal; report a child that dies."""
        while True:
            for child in self.children:
                self._check_alive(child)
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM every child, SIGKILL what is left after 10 s."""
        procs = [c.process for c in self.children if c.process is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
