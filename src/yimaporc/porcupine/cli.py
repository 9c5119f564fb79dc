"""``yimaporc mail ...``: user administration over the admin API."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._cliutil import CliError, print_json
from ..admin.client import AdminClient


def _done(args: argparse.Namespace, doc: Any, text: str) -> int:
    """Print ``doc`` as JSON with ``--json``, else ``text``."""
    if getattr(args, "json", False):
        print_json(doc)
    else:
        print(text)
    return 0


def _password(args: argparse.Namespace) -> str:
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
    """Add ``mail adduser|deluser|passwd|users|queue`` to ``sub`` (an argparse subparsers object).

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
        doc = make_client(args).post("/api/mail/users", body)
        return _done(args, doc, f"created {args.address}")

    p.set_defaults(func=adduser)

    p = msub.add_parser("deluser", parents=parents, help="delete a user and their mail")
    p.add_argument("address")

    def deluser(args: argparse.Namespace) -> int:
        doc = make_client(args).post("/api/mail/users/delete", {"address": args.address})
        return _done(args, doc, f"deleted {args.address}")

    p.set_defaults(func=deluser)

    p = msub.add_parser("passwd", parents=parents, help="set a user's password")
    p.add_argument("address")
    with_password(p)

    def passwd(args: argparse.Namespace) -> int:
        body = {"address": args.address, "password": _password(args)}
        doc = make_client(args).post("/api/mail/users/passwd", body)
        return _done(args, doc, f"updated {args.address}")

    p.set_defaults(func=passwd)

    p = msub.add_parser("users", parents=parents, aliases=["list"], help="list users")

    def list_users(args: argparse.Namespace) -> int:
        doc = make_client(args).get("/api/mail/users")
        lines = [f"{u['address']} replicas={u['replicas']}" for u in doc["users"]]
        return _done(args, doc, "\n".join(lines) if lines else "no users")

    p.set_defaults(func=list_users)

    p = msub.add_parser("queue", parents=parents, help="the node's outbound queue")
    p.add_argument("action", nargs="?", default="list", choices=["list", "flush", "delete"])
    p.add_argument("id", nargs="?", help="message id (delete: required; flush: default all)")

    def queue(args: argparse.Namespace) -> int:
        client = make_client(args)
        if args.action == "delete":
            if not args.id:
                raise CliError("mail queue delete needs a message id")
            doc = client.post("/api/mail/queue/delete", {"id": args.id})
            return _done(args, doc, f"deleted {args.id}")
        if args.action == "flush":
            doc = client.post("/api/mail/queue/flush", {"id": args.id} if args.id else {})
            return _done(args, doc, f"flushed {doc['flushed']} messages")
        doc = client.get("/api/mail/queue")
        if args.json:
            return _done(args, doc, "")
        for m in doc["queue"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m["queued_at"]))
            error = f"  ({m['last_error']})" if m["last_error"] else ""
            print(f"{m['id']}  {when}  attempts={m['attempts']}  <{m['from']}> -> "
                  f"{', '.join(m['to'])}{error}")  # fmt: skip
        print(f"{doc['length']} queued, oldest {doc['oldest_age']:.0f} s")
        return 0

    p.set_defaults(func=queue)
