"""Outbound mail: deliveries/s from a porcupine node's queue to a local MX.

One node with submission on 127.0.120.1:1587, mail for remote.test routed with
--transport to a local MX on 127.0.120.9:2525 (aiosmtpd's Sink, which accepts
and drops; a private second Postfix instance would need the system Postfix's
alternate_config_directories changed, which a benchmark should not do).  N messages are submitted through 587 by C parallel
smtplib clients; the figure is N / (time from the first submission until the
node's outbound queue is empty).  Then the MX is stopped, one message is
submitted and the attempt times the queue records are printed (retry
schedule as configured with --queue-retry).

    .venv/bin/python bench/outbound.py [--messages 500] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from yimaporc.testing.certs import client_context, make_cert
from yimaporc.testing.procs import NodeProc, mail_node, wait_for

HOST, MX = "127.0.120.1", ("127.0.120.9", 2525)
USER, PW = "bench@example.org", "pw-bench"


def stop_mx(mx: Any) -> None:
    mx[1].stop()


def start_aiosmtpd() -> Any:
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Sink

    c = Controller(Sink(), hostname=MX[0], port=MX[1])
    c.start()
    return ("aiosmtpd", c)


def submit(n: int) -> None:
    with smtplib.SMTP(HOST, 1587, timeout=30) as s:
        s.starttls(context=client_context())
        s.login(USER, PW)
        for k in range(n):
            body = f"Subject: bench {k}\r\n\r\n" + ("x" * 78 + "\r\n") * 25
            s.sendmail(USER, [f"r{k % 50}@remote.test"], body)


def queue_length(node: NodeProc) -> int:
    return int((node.status() or {"outbound": {"length": -1}})["outbound"]["length"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=500)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="yp-outbound-"))
    mx = start_aiosmtpd()
    cert, key = make_cert(work)
    secret = work / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    ports = {"cluster": 17946, "admin": 18080, "smtp": 2525}
    extra = ["--tls-cert", str(cert), "--tls-key", str(key), "--submission",
             f"tcp:1587:interface={HOST}", "--transport", f"remote.test={MX[0]}:{MX[1]}",
             "--queue-retry", "2,4,8"]  # fmt: skip
    node = mail_node(work, "o1", HOST, ports, secret, [], extra)
    out: dict[str, Any] = {"mx": mx[0], "messages": args.messages, "clients": args.clients}
    try:
        node.start()
        wait_for(lambda: (node.status() or {}).get("mail", {}).get("submission"), 30, "node")
        subprocess.run([sys.executable, "-m", "yimaporc.cli", "mail", "adduser", USER,
                        "--password", PW, "--admin", node.admin_url, "--secret-file",
                        str(secret)], check=True, capture_output=True)  # fmt: skip
        per = [args.messages // args.clients] * args.clients
        started = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(submit, per))
        submitted = time.monotonic() - started
        wait_for(lambda: queue_length(node) == 0, 600, "the queue to drain")
        drained = time.monotonic() - started
        status = (node.status() or {})["outbound"]
        out.update(
            submitted_s=round(submitted, 2),
            drained_s=round(drained, 2),
            deliveries_per_s=round(sum(per) / drained, 1),
            outbound=status,
        )
        # The MX goes away: one message waits; its attempts follow --queue-retry.
        stop_mx(mx)
        last = int((node.status() or {})["outbound"]["attempts"])
        t0 = time.monotonic()
        submit(1)
        attempts: list[float] = []
        while time.monotonic() - t0 < 16:
            doc = (node.status() or {})["outbound"]
            if doc["attempts"] > last:
                last = doc["attempts"]
                attempts.append(round(time.monotonic() - t0, 1))
            time.sleep(0.05)
        out["attempt_times_s_with_retry_2_4_8"] = attempts
    finally:
        node.kill(signal.SIGTERM)
        log = node.log_path
        if log.exists():  # what a bounce said, if any
            lines = [x for x in log.read_text().splitlines() if "failed for good" in x]
            out["bounce_reasons"] = lines[:3]
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
