"""Part ``mail-peers``: Postfix + Dovecot on Maildirs, and a minimal twisted.mail."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from parts.common import (
    DOMAIN,
    PASSWORD,
    PEER_HOST,
    PEERS,
    PORTS,
    PROCS,
    PY,
    WORK,
    PartFailed,
    Settings,
    need_free,
    pid_alive,
    run,
    run_daemon,
    scoped,
    tail,
    users_list,
    wait_port,
)
from parts.loads import mail_load

# --------------------------------------------------------------------------- mail peers


def populate_maildirs(s: Settings, root: Path, uid: int = -1, gid: int = -1) -> None:
    argv = [
        PY,
        str(PEERS / "mail_load.py"),
        "populate",
        "--maildir-root",
        str(root),
        "--users",
        str(s.mail_users),
        "--per-user",
        str(s.mail_per_user),
        "--domain",
        DOMAIN,
    ]
    if uid >= 0:
        argv += ["--uid", str(uid), "--gid", str(gid)]
    r = run(argv, 120)
    if r.returncode != 0:
        raise PartFailed(f"populate {root}: {r.stderr.strip()[-300:]}")


def setup_postfix(s: Settings, w: Path) -> None:
    pb = pwd.getpwnam("pbmail")
    shutil.rmtree(w, ignore_errors=True)
    for d in ("etc", "spool", "data", "mail"):
        (w / d).mkdir(parents=True)
    shutil.chown(w / "data", "postfix")
    os.chown(w / "mail", pb.pw_uid, pb.pw_gid)
    # Ported from /work/shared/peers/bench_mail.sh (setup_postfix), on PEER_HOST.
    (w / "etc" / "main.cf").write_text(
        f"""# private benchmark instance: postfix -c {w}/etc start|stop
compatibility_level = 3.6
queue_directory = {w}/spool
data_directory = {w}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.localdomain
mydomain = localdomain
myorigin = $myhostname
mydestination =
relay_domains =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = reject_unauth_destination
default_transport = error:outbound mail disabled (benchmark)
relay_transport = error:outbound mail disabled (benchmark)
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtpd_banner = $myhostname ESMTP
alias_maps =
alias_database =
local_recipient_maps =
biff = no
append_dot_mydomain = no
readme_directory = no
smtputf8_enable = no
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {w}/mail
virtual_mailbox_maps = texthash:{w}/etc/vmailbox
virtual_minimum_uid = 100
virtual_uid_maps = static:{pb.pw_uid}
virtual_gid_maps = static:{pb.pw_gid}
default_process_limit = 200
maillog_file_prefixes = {w}
maillog_file = {w}/maillog
"""
    )
    (w / "etc" / "master.cf").write_text(
        f"{PEER_HOST}:{PORTS['smtp']} inet n - n - - smtpd\n"
        + """pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""
    )
    (w / "etc" / "vmailbox").write_text(
        "".join(f"{u}@{DOMAIN} {u}/\n" for u in users_list(s)),
    )


def start_postfix(w: Path) -> int:
    need_free(PEER_HOST, PORTS["smtp"])
    # postfix(1) reports start-up errors only to syslog/maillog; a pseudo-tty shows them
    PROCS.on_stop(
        "postfix",
        lambda: run_daemon(["postfix", "-c", str(w / "etc"), "stop"], w / "stop.log") and None,
    )
    r = run(["script", "-qc", f"postfix -c {w / 'etc'} start", "/dev/null"], 60)
    if not wait_port(PEER_HOST, PORTS["smtp"], 15, None):
        raise PartFailed(
            f"postfix did not start ({(r.stdout + r.stderr).strip()[-200:]}; "
            f"maillog: {tail(w / 'maillog')})"
        )
    return int((w / "spool" / "pid" / "master.pid").read_text().strip())


def setup_dovecot(s: Settings, d: Path, maildirs: Path) -> None:
    pb = pwd.getpwnam("pbmail")
    u, g = pb.pw_uid, pb.pw_gid
    shutil.rmtree(d, ignore_errors=True)
    (d / "run").mkdir(parents=True)
    (d / "state").mkdir()
    (d / "passwd").write_text(
        "".join(f"{n}:{{PLAIN}}{PASSWORD}:{u}:{g}::{maildirs}/{n}::\n" for n in users_list(s))
    )
    shutil.chown(d / "passwd", group="dovecot")
    os.chmod(d / "passwd", 0o640)
    # Ported from bench_mail.sh (setup_dovecot, "tuned": processes reused).
    (d / "dovecot.conf").write_text(
        f"""base_dir = {d}/run
state_dir = {d}/state
instance_name = yimaporc-bench
protocols = imap pop3
listen = {PEER_HOST}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_username_format = %Ln
log_path = {d}/dovecot.log
mail_location = maildir:~/
mail_uid = {u}
mail_gid = {g}
first_valid_uid = {u}
last_valid_uid = {u}
first_valid_gid = {g}
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {d}/passwd
}}
userdb {{
  driver = passwd-file
  args = {d}/passwd
}}
service imap-login {{
  inet_listener imap {{
    address = {PEER_HOST}
    port = {PORTS["imap"]}
  }}
  inet_listener imaps {{
    port = 0
  }}
  service_count = 0
  process_min_avail = 2
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {PEER_HOST}
    port = {PORTS["pop3"]}
  }}
  inet_listener pop3s {{
    port = 0
  }}
  service_count = 0
  process_min_avail = 2
}}
service auth {{
  client_limit = 4096
}}
service imap {{
  service_count = 0
  process_min_avail = 16
}}
service pop3 {{
  service_count = 0
  process_min_avail = 16
}}
"""
    )


def start_dovecot(d: Path) -> int:
    need_free(PEER_HOST, PORTS["imap"])
    need_free(PEER_HOST, PORTS["pop3"])
    pidfile = d / "run" / "master.pid"

    def stop() -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not pid_alive(pid):
                    return
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)

    PROCS.on_stop("dovecot", stop)
    rc = run_daemon(["dovecot", "-c", str(d / "dovecot.conf")], d / "start.log")
    if rc != 0 or not (
        wait_port(PEER_HOST, PORTS["imap"], 15, None)
        and wait_port(PEER_HOST, PORTS["pop3"], 15, None)
    ):
        raise PartFailed(
            f"dovecot did not start (rc={rc}: {tail(d / 'start.log')}; "
            f"log: {tail(d / 'dovecot.log')})"
        )
    time.sleep(1.0)  # process_min_avail workers
    return int(pidfile.read_text().strip())


def part_mail_peers(s: Settings, res: dict[str, Any], errors: list[str]) -> None:
    peers = res.setdefault("mail", {})
    work = WORK / "mail"
    log = work / "load.log"
    work.mkdir(parents=True, exist_ok=True)
    # Postfix (SMTP -> virtual(8) Maildir) + Dovecot (POP3/IMAP on the same Maildirs)
    try:
        with scoped():
            w = work / "postfix"
            setup_postfix(s, w)
            pb = pwd.getpwnam("pbmail")
            populate_maildirs(s, w / "mail", pb.pw_uid, pb.pw_gid)
            ppid = start_postfix(w)
            r: dict[str, Any] = {}
            r["smtp"] = mail_load(
                s,
                "smtp",
                PEER_HOST,
                PORTS["smtp"],
                "postfix",
                [ppid],
                ["--maildir-root", str(w / "mail")],
                log=log,
            )
            d = work / "dovecot"
            setup_dovecot(s, d, w / "mail")
            dpid = start_dovecot(d)
            for proto in ("pop3", "imap"):
                r[proto] = mail_load(
                    s,
                    proto,
                    PEER_HOST,
                    PORTS[proto],
                    "dovecot",
                    [dpid],
                    ["--user-suffix", "@" + DOMAIN],
                    log=log,
                )
            peers["postfix+dovecot"] = r
    except PartFailed as e:
        errors.append(f"peer postfix+dovecot: {e}")
        peers["postfix+dovecot"] = {"error": str(e)}
    # twisted.mail: ESMTP + POP3 on Maildir (the floor of the same stack; no IMAP)
    try:
        with scoped():
            w = work / "twisted"
            shutil.rmtree(w, ignore_errors=True)
            w.mkdir(parents=True)
            need_free(PEER_HOST, PORTS["smtp"])
            need_free(PEER_HOST, PORTS["pop3"])
            p = PROCS.start(
                "twisted.mail",
                [
                    PY,
                    str(PEERS / "tw_mail_server.py"),
                    "--maildir-root",
                    str(w / "mail"),
                    "--users",
                    ",".join(users_list(s)),
                    "--domain",
                    DOMAIN,
                    "--password",
                    PASSWORD,
                    "--host",
                    PEER_HOST,
                    "--smtp-port",
                    str(PORTS["smtp"]),
                    "--pop3-port",
                    str(PORTS["pop3"]),
                ],
                w / "server.log",
            )
            if not (
                wait_port(PEER_HOST, PORTS["smtp"], 20, p)
                and wait_port(PEER_HOST, PORTS["pop3"], 20, p)
            ):
                raise PartFailed(f"twisted.mail did not start: {tail(w / 'server.log')}")
            populate_maildirs(s, w / "mail")
            r = {}
            r["smtp"] = mail_load(
                s,
                "smtp",
                PEER_HOST,
                PORTS["smtp"],
                "twisted.mail",
                [p.pid],
                ["--maildir-root", str(w / "mail")],
                log=log,
            )
            r["pop3"] = mail_load(
                s,
                "pop3",
                PEER_HOST,
                PORTS["pop3"],
                "twisted.mail",
                [p.pid],
                ["--user-suffix", "@" + DOMAIN],
                log=log,
            )
            peers["twisted.mail"] = r
    except PartFailed as e:
        errors.append(f"peer twisted.mail: {e}")
        peers["twisted.mail"] = {"error": str(e)}
