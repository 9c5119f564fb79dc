#!/usr/bin/env python3
# ruff: noqa
# Copied from /work/shared/peers/mail_load.py (peer benchmark kit); see bench/peers/NOTE.md.
"""Mail load generator (stdlib only, python3 >= 3.8): SMTP delivery and
POP3 / IMAP retrieval, loopback only, time-bounded.

  mail_load.py smtp --port 2525 [--conns 16] [--duration 20] [--users 50]
               [--domain bench.test] [--msgs-per-conn 1] [--maildir-root DIR]
               [--server-pid PID ...]
      C concurrent SMTP clients (smtplib; --procs processes x threads) send
      realistic 4-8 KB messages to random users user001..userU@DOMAIN for
      --duration seconds after a --warmup.  Reports accepted msgs/s; with
      --maildir-root, also waits (<= --drain-timeout s) for the messages to
      appear in DIR/<user>/new|cur and reports end-to-end delivered msgs/s.
  mail_load.py pop3 --port 1110 [--conns 16] [--fetch 5] [--users 50]
  mail_load.py imap --port 1143 [--conns 16] [--fetch 5] [--users 50]
      Sessions: log in as a random pop001..popU (password --password), list,
      fetch up to --fetch messages (RETR / FETCH BODY.PEEK[]), log out; no
      deletion, so the mailbox state stays the same.  Reports sessions/s and
      messages fetched/s.
  mail_load.py populate --maildir-root DIR --users 50 --per-user 20 [--uid U --gid G]
      Writes messages straight into DIR/pop001..popU/cur for retrieval tests.

CPU: generator (all its processes), server (--server-pid trees, from /proc),
machine (tick-sampled /proc/stat, approximate).  % of one core.
Last line:  RESULT mail proto=... label=... <rate>=... ...
"""

import argparse
import imaplib
import multiprocessing as mp
import os
import poplib
import random
import smtplib
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402

WORDS = (
    "stream server cluster media mail message delivery replica node "
    "partition retrieve protocol session packet buffer latency disk "
    "queue porcupine twisted python network request response"
).split()


def make_message(rng, size, sender, rcpt, n):
    hdr = (
        "From: Load Generator <%s>\r\nTo: <%s>\r\nSubject: bench message %d\r\n"
        "Message-ID: <%d.%d@bench.load>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        % (sender, rcpt, n, n, rng.randrange(1 << 30))
    )
    body = []
    left = size - len(hdr)
    while left > 0:
        line = []
        ln = 0
        while ln < 72:
            w = rng.choice(WORDS)
            line.append(w)
            ln += len(w) + 1
        s = " ".join(line)[: max(1, min(76, left - 2))]
        body.append(s)
        left -= len(s) + 2
    return (hdr + "\r\n".join(body) + "\r\n").encode()


def msg_pool(seed, count=64, lo=4096, hi=8192):
    rng = random.Random(seed)
    return [
        make_message(rng, rng.randint(lo, hi), "load@bench.load", "list@bench.test", i)
        for i in range(count)
    ]


# ---------------------------------------------------------------- workers
def smtp_worker(a, stop_at, win0, win1, out, wid):
    rng = random.Random(a.seed * 1000 + wid)
    pool = msg_pool(wid)
    ok = err = byt = 0
    w_ok = w_byt = 0
    lat = []
    last_err = ""
    while True:
        now = time.monotonic()
        if now >= stop_at:
            break
        try:
            t0 = time.monotonic()
            s = smtplib.SMTP(a.host, a.port, local_hostname="load.bench", timeout=a.timeout)
            s.ehlo_or_helo_if_needed()
            for _ in range(a.msgs_per_conn):
                rcpt = "%s%03d@%s" % (a.user_prefix, rng.randint(1, a.users), a.domain)
                msg = rng.choice(pool)
                s.sendmail("load@bench.load", [rcpt], msg)
                t1 = time.monotonic()
                ok += 1
                byt += len(msg)
                if win0 <= t1 < win1:
                    w_ok += 1
                    w_byt += len(msg)
                    lat.append(t1 - t0)
                t0 = t1
                if t1 >= stop_at:
                    break
                if a.msgs_per_conn > 1:
                    s.rset()
            s.quit()
        except Exception as e:  # noqa: BLE001
            err += 1
            last_err = repr(e)[:200]
            time.sleep(0.05)
    out.append((ok, err, byt, w_ok, w_byt, lat, last_err, 0))


def pop3_worker(a, stop_at, win0, win1, out, wid):
    rng = random.Random(a.seed * 1000 + wid)
    sess = err = msgs = byt = 0
    w_sess = w_msgs = w_byt = 0
    lat = []
    last_err = ""
    while time.monotonic() < stop_at:
        t0 = time.monotonic()
        try:
            user = "%s%03d" % (a.login_prefix, a.login_first + rng.randint(1, a.users))
            p = poplib.POP3(a.host, a.port, timeout=a.timeout)
            p.user(user + a.user_suffix)
            p.pass_(a.password)
            n, _ = p.stat()
            resp, listing, _ = p.list()
            got = gotb = 0
            for i in range(1, min(n, a.fetch) + 1):
                resp, lines, octets = p.retr(i)
                got += 1
                gotb += octets
            p.quit()
            t1 = time.monotonic()
            sess += 1
            msgs += got
            byt += gotb
            if win0 <= t1 < win1:
                w_sess += 1
                w_msgs += got
                w_byt += gotb
                lat.append(t1 - t0)
        except Exception as e:  # noqa: BLE001
            err += 1
            last_err = repr(e)[:200]
            time.sleep(0.05)
    out.append((sess, err, byt, w_sess, w_byt, lat, last_err, w_msgs))


def imap_worker(a, stop_at, win0, win1, out, wid):
    rng = random.Random(a.seed * 1000 + wid)
    sess = err = msgs = byt = 0
    w_sess = w_msgs = w_byt = 0
    lat = []
    last_err = ""
    while time.monotonic() < stop_at:
        t0 = time.monotonic()
        try:
            user = "%s%03d" % (a.login_prefix, a.login_first + rng.randint(1, a.users))
            m = imaplib.IMAP4(a.host, a.port, timeout=a.timeout)
            m.login(user + a.user_suffix, a.password)
            typ, data = m.select("INBOX", readonly=True)
            n = int(data[0])
            got = gotb = 0
            if n:
                k = min(n, a.fetch)
                typ, data = m.fetch("1:%d" % k, "(UID RFC822.SIZE BODY.PEEK[])")
                for item in data:
                    if isinstance(item, tuple):
                        got += 1
                        gotb += len(item[1])
            m.logout()
            t1 = time.monotonic()
            sess += 1
            msgs += got
            byt += gotb
            if win0 <= t1 < win1:
                w_sess += 1
                w_msgs += got
                w_byt += gotb
                lat.append(t1 - t0)
        except Exception as e:  # noqa: BLE001
            err += 1
            last_err = repr(e)[:200]
            time.sleep(0.05)
    out.append((sess, err, byt, w_sess, w_byt, lat, last_err, w_msgs))


WORKERS = {"smtp": smtp_worker, "pop3": pop3_worker, "imap": imap_worker}


def proc_main(a, nthreads, base_id, t_start, q):
    stop_at = t_start + a.warmup + a.duration
    win0 = t_start + a.warmup
    win1 = stop_at
    out = []
    fn = WORKERS[a.proto]
    ths = [
        threading.Thread(target=fn, args=(a, stop_at, win0, win1, out, base_id + i))
        for i in range(nthreads)
    ]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    tm = os.times()
    q.put((out, tm.user + tm.system))


def count_maildir(root):
    n = 0
    try:
        users = os.listdir(root)
    except OSError:
        return 0
    for u in users:
        for sub in ("new", "cur"):
            try:
                n += sum(
                    1
                    for e in os.scandir(os.path.join(root, u, sub))
                    if not e.name.startswith("dovecot") and e.is_file()
                )
            except OSError:
                pass
    return n


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def run_load(a):
    procs = max(1, min(a.procs, a.conns))
    per = [a.conns // procs + (1 if i < a.conns % procs else 0) for i in range(procs)]
    before = count_maildir(a.maildir_root) if a.maildir_root and a.proto == "smtp" else 0
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    t_start = time.monotonic() + 0.2
    ps = []
    base = 0
    for n in per:
        p = ctx.Process(target=proc_main, args=(a, n, base, t_start, q))
        base += n
        p.start()
        ps.append(p)
    # CPU meter over the measurement window
    time.sleep(max(0.0, t_start + a.warmup - time.monotonic()))
    meter = benchutil.CpuMeter(a.server_pid)
    gen0 = sum(benchutil.proc_cpu_seconds(p.pid, False) or 0.0 for p in ps)
    time.sleep(max(0.0, t_start + a.warmup + a.duration - time.monotonic()))
    gen1 = sum(benchutil.proc_cpu_seconds(p.pid, False) or 0.0 for p in ps)
    cpu = meter.stop(extra_self_cpu=gen1 - gen0)
    t_send_end = time.monotonic()
    results = []
    for _ in ps:
        results.append(q.get())
    for p in ps:
        p.join()
    rows = [r for out, _ in results for r in out]
    tot_ok = sum(r[0] for r in rows)
    tot_err = sum(r[1] for r in rows)
    w_ok = sum(r[3] for r in rows)
    w_byt = sum(r[4] for r in rows)
    w_msgs = sum(r[7] for r in rows)
    lat = [x for r in rows for x in r[5]]
    errs = [r[6] for r in rows if r[6]]
    res = {
        "proto": a.proto,
        "label": a.label,
        "conns": a.conns,
        "duration": a.duration,
        "total_ok": tot_ok,
        "errors": tot_err,
        "rate": w_ok / a.duration,
        "mb_s": w_byt / a.duration / 1e6,
        "p50_ms": pct(lat, 0.5) * 1000,
        "p99_ms": pct(lat, 0.99) * 1000,
        "msgs_rate": w_msgs / a.duration,
        **cpu,
    }
    if errs:
        print("  last error: %s" % errs[0], flush=True)
    if a.proto == "smtp" and a.maildir_root:
        # wait for the queue to drain into the Maildirs
        deadline = time.monotonic() + a.drain_timeout
        last = -1
        last_change = time.monotonic()
        while True:
            n = count_maildir(a.maildir_root) - before
            now = time.monotonic()
            if n != last:
                last, last_change = n, now
            if n >= tot_ok or now > deadline or now - last_change > 5.0:
                break
            time.sleep(0.1)
        res["delivered"] = last
        res["drain_s"] = last_change - t_send_end if last >= tot_ok else float("nan")
        # end-to-end: everything accepted, from the first send to the last delivery
        span = (last_change if last >= tot_ok else time.monotonic()) - t_start
        res["e2e_rate"] = last / span if span > 0 else float("nan")
    return res


def populate(a):
    uid = a.uid if a.uid is not None else -1
    gid = a.gid if a.gid is not None else -1
    rng = random.Random(1)
    host = socket.gethostname()
    n = 0
    for u in range(1, a.users + 1):
        user = "%s%03d" % (a.login_prefix, a.login_first + u)
        d = os.path.join(a.maildir_root, user)
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        have = len(os.listdir(os.path.join(d, "cur")))
        for i in range(have, a.per_user):
            msg = make_message(
                rng, rng.randint(4096, 8192), "load@bench.load", "%s@%s" % (user, a.domain), i
            )
            name = "%d.M%dP%d.%s,S=%d:2,S" % (1700000000 + i, i, u, host, len(msg))
            p = os.path.join(d, "cur", name)
            with open(p, "wb") as f:
                f.write(msg)
            n += 1
        if uid >= 0 or gid >= 0:
            for root, dirs, files in os.walk(d):
                os.chown(root, uid, gid)
                for f in files:
                    os.chown(os.path.join(root, f), uid, gid)
    print(
        "populated %d new messages under %s (%d users x %d)"
        % (n, a.maildir_root, a.users, a.per_user)
    )


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("proto", choices=("smtp", "pop3", "imap", "populate"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int)
    ap.add_argument("--conns", type=int, default=16, help="concurrent connections")
    ap.add_argument("--procs", type=int, default=2, help="generator processes")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--domain", default="bench.test")
    ap.add_argument("--password", default="pw")
    ap.add_argument("--user-suffix", default="", help="appended to login names, e.g. @bench.test")
    ap.add_argument(
        "--user-prefix", default="user", help="(added) SMTP recipients are PREFIX001..PREFIXU"
    )
    ap.add_argument(
        "--login-prefix", default="pop", help="(added) POP3/IMAP logins are PREFIX001..PREFIXU"
    )
    ap.add_argument(
        "--login-first", type=int, default=0, help="(added) logins are PREFIX(F+1)..PREFIX(F+U)"
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="(added) seed of the users' draw: generators run side by side each take "
        "their own, as independent clients would (the same seed: the same users at once)",
    )
    ap.add_argument("--msgs-per-conn", type=int, default=1)
    ap.add_argument("--fetch", type=int, default=5, help="messages fetched per session")
    ap.add_argument("--maildir-root")
    ap.add_argument("--drain-timeout", type=float, default=60.0)
    ap.add_argument(
        "--timeout", type=float, default=30.0, help="socket timeout of each session (added)"
    )
    ap.add_argument("--server-pid", type=int, action="append", default=[])
    ap.add_argument("--label", default="server")
    ap.add_argument("--per-user", type=int, default=20)
    ap.add_argument("--uid", type=int)
    ap.add_argument("--gid", type=int)
    a = ap.parse_args()
    if a.proto == "populate":
        populate(a)
        return 0
    if a.port is None:
        a.port = {"smtp": 25, "pop3": 110, "imap": 143}[a.proto]
    r = run_load(a)
    srv = ("%.0f" % r["server_cpu_pct"]) if "server_cpu_pct" in r else "na"
    if a.proto == "smtp":
        extra = ""
        if "delivered" in r:
            extra = " delivered=%d/%d e2e_msgs_per_s=%.1f drain_s=%.1f" % (
                r["delivered"],
                r["total_ok"],
                r["e2e_rate"],
                r["drain_s"],
            )
        print(
            "RESULT mail proto=smtp label=%s conns=%d msgs_per_s=%.1f mb_per_s=%.2f "
            "p50_ms=%.1f p99_ms=%.1f errors=%d%s server_cpu_pct=%s gen_cpu_pct=%.0f "
            "sys_cpu_tick_pct=%.0f"
            % (
                a.label,
                a.conns,
                r["rate"],
                r["mb_s"],
                r["p50_ms"],
                r["p99_ms"],
                r["errors"],
                extra,
                srv,
                r["gen_cpu_pct"],
                r["sys_cpu_pct"],
            ),
            flush=True,
        )
    else:
        print(
            "RESULT mail proto=%s label=%s conns=%d sessions_per_s=%.1f msgs_per_s=%.1f "
            "mb_per_s=%.2f p50_ms=%.1f p99_ms=%.1f errors=%d server_cpu_pct=%s "
            "gen_cpu_pct=%.0f sys_cpu_tick_pct=%.0f"
            % (
                a.proto,
                a.label,
                a.conns,
                r["rate"],
                r["msgs_rate"],
                r["mb_s"],
                r["p50_ms"],
                r["p99_ms"],
                r["errors"],
                srv,
                r["gen_cpu_pct"],
                r["sys_cpu_pct"],
            ),
            flush=True,
        )
    return 0 if r["errors"] == 0 or r["total_ok"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
