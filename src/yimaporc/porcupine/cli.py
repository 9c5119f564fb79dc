"""``yimaporc mail ...``: user administration over the admin API."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..admin.client import AdminClient


def _password(args: argparse.Namespace) -> str:
    from ..cli import CliError

    if args.password is not None:
        return str(args.password)
    try:
        return Path(args.password_file).read_text().rstrip("\r\n")
    except OSError as e:
        raise CliError(f"cannot read --password-file {args.password_file}: {e.strerror}") from e


def register(
    sub: Any,
    make_client: Callable[..., AdminClient],
    admin: argparse.ArgumentParser | None = None,
) -> None:
    """Add ``mail adduser|deluser|passwd|list`` to ``sub`` (an argparse subparsers object).

    ``admin`` is the parent parser with ``--admin``/``--secret-file``;
    ``make_client(args)`` turns those into an :class:`AdminClient`.
    """
    parents = [admin] if admin is not None else []
    mail = sub.add_parser("mail", help="mail users")
    msub = mail.add_subparsers(dest="mail_command", metavar="COMMAND", parser_class=type(mail))
    msub.required = True

    def with_password(p: argparse.ArgumentParser) -> None:
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--password", metavar="P")
        g.add_argument("--password-file", metavar="F")

    p = msub.add_parser("adduser", parents=parents, help="create a user")
    p.add_argument("address")
    with_password(p)
    p.add_argument("--replicas", type=int, default=1, metavar="R")

    def adduser(args: argparse.Namespace) -> int:
        body = {"address": args.address, "password": _password(args), "replicas": args.replicas}
        make_client(args).post("/api/mail/users", body)
        print(f"created {args.address}")
        return 0

    p.set_defaults(func=adduser)

    p = msub.add_parser("deluser", parents=parents, help="delete a user and their mail")
    p.add_argument("address")

    def deluser(args: argparse.Namespace) -> int:
        make_client(args).post("/api/mail/users/delete", {"address": args.address})
        print(f"deleted {args.address}")
        return 0

    p.set_defaults(func=deluser)

    p = msub.add_parser("passwd", parents=parents, help="set a user's password")
    p.add_argument("address")
    with_password(p)

    def passwd(args: argparse.Namespace) -> int:
        body = {"address": args.address, "password": _password(args)}
        make_client(args).post("/api/mail/users/passwd", body)
        print(f"updated {args.address}")
        return 0

    p.set_defaults(func=passwd)

    p = msub.add_parser("list", parents=parents, help="list users")

    def list_users(args: argparse.Namespace) -> int:
        for u in make_client(args).get("/api/mail/users")["users"]:
            print(f"{u['address']} replicas={u['replicas']}")
        return 0

    p.set_defaults(func=list_users)

    p = msub.add_parser("queue", parents=parents, help="the node's outbound queue")
    p.add_argument("action", nargs="?", default="list", choices=["list", "flush", "delete"])
    p.add_argument("id", nargs="?", help="message id (delete: required; flush: default all)")
    p.add_argument("--json", action="store_true", help="print the queue as JSON")

    def queue(args: argparse.Namespace) -> int:
        from ..cli import CliError

        client = make_client(args)
        if args.action == "delete":
            if not args.id:
                raise CliError("mail queue delete needs a message id")
            client.post("/api/mail/queue/delete", {"id": args.id})
            print(f"deleted {args.id}")
            return 0
        if args.action == "flush":
            doc = client.post("/api/mail/queue/flush", {"id": args.id} if args.id else {})
            print(f"flushed {doc['flushed']} messages")
            return 0
        doc = client.get("/api/mail/queue")
        if args.json:
            print(json.dumps(doc, indent=1, sort_keys=True))
            return 0
        for m in doc["queue"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m["queued_at"]))
            error = f"  ({m['last_error']})" if m["last_error"] else ""
            print(f"{m['id']}  {when}  attempts={m['attempts']}  <{m['from']}> -> "
                  f"{', '.join(m['to'])}{error}")  # fmt: skip
        print(f"{doc['length']} queued, oldest {doc['oldest_age']:.0f} s")
        return 0

    p.set_defaults(func=queue)
