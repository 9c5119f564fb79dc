"""N ``twistd -n KIND-node`` processes on NET.1..NET.N and the CLI calls made on them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from parts.cgroup import CpuGroup
from parts.common import (
    DOMAIN,
    PASSWORD,
    PORC_NET,
    PORTS,
    PROCS,
    VENV_BIN,
    YIMA_NET,
    PartFailed,
    need_free,
    run,
    tail,
    wait_port,
)


# --------------------------------------------------------------------------- yimaporc nodes
def yimaporc_cli() -> str:
    return str(VENV_BIN / "yimaporc")


def admin_token(secret: Path) -> str:
    r = run([yimaporc_cli(), "token", "--secret-file", str(secret)], 60)
    if r.returncode != 0 or not r.stdout.strip():
        raise PartFailed(f"yimaporc token failed: {r.stderr.strip()}")
    return r.stdout.strip().splitlines()[-1]


def admin_status(url: str, token: str) -> dict[str, Any] | None:
    req = urllib.request.Request(url + "/api/status")
    req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=3) as f:
            doc: dict[str, Any] = json.load(f)
            return doc
    except (OSError, ValueError, urllib.error.URLError):
        return None


class Cluster:
    """N ``twistd -n KIND-node`` processes on NET.1..NET.N (local-cluster's layout)."""

    def __init__(
        self,
        kind: str,
        n: int,
        work: Path,
        extra: list[str] | None = None,
        quota: float | None = None,
    ) -> None:
        """``quota``: scaled-down nodes, each in its own CPU group of that many cores
        (bench/parts/cgroup.py); the quota is lifted while the cluster is set up and held
        from ``limit()`` on."""
        self.kind = kind
        self.quota = quota
        self.groups: list[CpuGroup] = []
        self.n = n
        self.net = PORC_NET if kind == "porcupine" else YIMA_NET
        self.work = work
        self.extra = extra or []
        self.hosts = [f"{self.net}.{i}" for i in range(1, n + 1)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.secret = work / "cluster.secret"
        self.token = ""

    def admin(self, i: int = 0) -> str:
        return f"http://{self.hosts[i]}:{PORTS['admin']}"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self, timeout: float = 60.0) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        (self.work / "logs").mkdir(parents=True)
        twistd = str(VENV_BIN / "twistd")
        services = ["smtp", "pop3", "imap"] if self.kind == "porcupine" else ["rtsp"]
        for i, host in enumerate(self.hosts, start=1):
            for port in [PORTS["admin"], PORTS["cluster"]] + [PORTS[x] for x in services]:
                need_free(host, port)
            node_id = f"{self.kind[0]}b{i}"

            def ep(port: int, host: str = host) -> str:
                return f"tcp:{port}:interface={host}"

            argv = [
                twistd,
                "-n",
                "--pidfile=",
                "--logfile",
                str(self.work / "logs" / f"{node_id}.log"),
                f"{self.kind}-node",
                "--node-id",
                node_id,
                "--data-dir",
                str(self.work / node_id),
                "--cluster",
                ep(PORTS["cluster"]),
                "--admin",
                ep(PORTS["admin"]),
                "--secret-file",
                str(self.secret),
            ]
            if i > 1:
                argv += ["--join", f"{self.hosts[0]}:{PORTS['cluster']}"]
            if self.kind == "porcupine":
                argv += ["--domain", DOMAIN]
            else:  # the load generators play every session from one address
                argv += ["--rtsp-max-sessions-per-client", "1024"]
            for svc in services:
                argv += [f"--{svc}", ep(PORTS[svc])]
            argv += self.extra
            if self.quota is not None:
                g = CpuGroup(node_id, self.quota).create()
                g.limit(False)
                PROCS.after_stop(g.name, g.remove)
                self.groups.append(g)
                argv = g.wrap(argv)
            log = self.work / "logs" / f"{node_id}.log"
            self.logs.append(log)
            self.procs.append(
                PROCS.start(node_id, argv, self.work / "logs" / f"{node_id}.out", cwd=self.work)
            )
            if i == 1:
                # the first node creates the shared secret; the others read it
                end = time.monotonic() + timeout
                while not self.secret.exists() and time.monotonic() < end:
                    self.check_alive()
                    time.sleep(0.1)
        self.token = admin_token(self.secret)
        self.wait_full_view(timeout)

    def wait_full_view(self, timeout: float = 60.0) -> float:
        """Wait until every node's view holds all N nodes at one epoch; the seconds it
        took. PartFailed (naming each node's view) if that does not happen in time: a
        ramp on a split cluster would measure the split, not the design."""
        t0 = time.monotonic()
        end = t0 + timeout
        want = self.n
        while True:
            self.check_alive()
            views = [admin_status(self.admin(i), self.token) for i in range(self.n)]
            if all(v is not None and len(v.get("members", [])) == want for v in views):
                epochs = {v["epoch"] for v in views if v is not None}
                if len(epochs) == 1:
                    self.status = views[0] or {}
                    return time.monotonic() - t0
            if time.monotonic() > end:
                seen = "; ".join(
                    f"{self.hosts[i]}: "
                    + (
                        "no answer"
                        if v is None
                        else f"epoch {v.get('epoch')} {len(v.get('members', []))} members"
                    )
                    for i, v in enumerate(views)
                )
                raise PartFailed(
                    f"{self.n} {self.kind} nodes did not agree on membership in {timeout:.0f} s "
                    f"({seen}; logs in {self.work / 'logs'})"
                )
            time.sleep(0.3)

    def limit(self) -> None:
        """Hold every node to its CPU quota from now on (checked by reading it back)."""
        for g in self.groups:
            g.limit(True)
            if g.read_quota() != (g.quota_us, g.period_us):
                raise PartFailed(f"{g.path}: the kernel did not take the quota {g.read_quota()}")
            pids = set(g.pids())
            if not pids:
                raise PartFailed(f"{g.path}: the node is not in its CPU group")

    def check_alive(self) -> None:
        for p, log in zip(self.procs, self.logs, strict=False):
            if p.poll() is not None:
                out = log.with_suffix(".out")
                raise PartFailed(
                    f"{self.kind}-node exited with {p.returncode}: {tail(log, 2)} {tail(out, 2)}"
                )

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, YIMAPORC_TOKEN=self.token)
        return run([yimaporc_cli(), *args], timeout, env=env)


def require_service(c: Cluster, svc: str, port: int) -> None:
    """Every node listens on svc, or the part fails saying the service is not there yet."""
    for i, host in enumerate(c.hosts):
        if not wait_port(host, port, 10, c.procs[i]):
            c.check_alive()
            listed = sorted((admin_status(c.admin(i), c.token) or {}).get("services", {}))
            raise PartFailed(
                f"{c.kind}-node has no {svc.upper()} service yet: nothing listens on "
                f"{host}:{port} although --{svc} was given (services in status: {listed or 'none'})"
            )


def cli_missing(r: subprocess.CompletedProcess[str]) -> bool:
    return "invalid choice" in r.stderr


def add_users(c: Cluster, names: list[str], replicas: int | None = None) -> None:
    """``yimaporc mail adduser ADDRESS --password pw [--replicas R] --admin URL`` for each."""
    more = ["--replicas", str(replicas)] if replicas else []

    def one(name: str) -> str | None:
        r = c.cli(
            "mail",
            "adduser",
            f"{name}@{DOMAIN}",
            "--password",
            PASSWORD,
            *more,
            "--admin",
            c.admin(0),
        )
        if r.returncode == 0:
            return None
        if cli_missing(r):
            return "yimaporc has no 'mail adduser' command yet"
        return f"yimaporc mail adduser {name}@{DOMAIN}: {r.stderr.strip()[-200:]}"

    first = one(names[0])
    if first:
        raise PartFailed(first)
    with ThreadPoolExecutor(max_workers=4) as ex:
        for err in ex.map(one, names[1:]):
            if err:
                raise PartFailed(err)
