"""The ``yimaporc`` command (CONTRACT §3).

Every subcommand exits 0 on success and otherwise prints one ``error: ...``
line on stderr and exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ._cliutil import DEFAULT_SECRET, CliError, make_client, print_json, token_for
from .admin.client import AdminClient, AdminError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _admin_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--admin", metavar="URL", help="http://HOST:PORT of any node's admin API")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON (status --watch: one object per line)",
    )
    p.add_argument(
        "--secret-file",
        metavar="FILE",
        help=f"cluster secret for the bearer token (default: local-cluster's secret of "
        f"the node's kind, {DEFAULT_SECRET.parent}/KIND/{DEFAULT_SECRET.name}, else "
        f"{DEFAULT_SECRET}; or set YIMAPORC_TOKEN)",
    )
    return p


def _print_status(doc: dict[str, Any]) -> None:
    print(f"node {doc['node_id']} ({doc['kind']}) epoch {doc['epoch']}")
    print(f"coordinator {doc.get('coordinator', '?')}")
    for m in doc["members"]:
        print(f"member {m['node_id']} {m['address']}")
    lag = doc.get("reactor_lag")
    if isinstance(lag, dict):
        print(f"reactor_lag max {lag.get('max_ms')} ms p99 {lag.get('p99_ms')} ms")
    for key in ("users", "buckets", "disks", "media"):
        if key in doc:
            print(f"{key} {json.dumps(doc[key], sort_keys=True)}")


def _cmd_status(args: argparse.Namespace) -> int:
    client = make_client(args, mutating=False)
    if not args.watch:
        doc = client.get("/api/status")
        print_json(doc) if args.json else _print_status(doc)
        return 0
    if args.interval <= 0 or (args.count is not None and args.count <= 0):
        raise CliError("--interval and --count must be positive")
    client.timeout = 10.0
    return watch(client, args.interval, args.count, args.json)


def watch(client: AdminClient, interval: float, count: int | None, as_json: bool) -> int:
    """``status --watch``: the status every ``interval`` s, ``count`` times (None: until
    Ctrl-C). A node that does not answer is reported and asked again; the exit code is
    that of the last round."""
    pause = threading.Event()
    rounds, failed = 0, False
    try:
        while count is None or rounds < count:
            if rounds:
                pause.wait(interval)
            rounds += 1
            try:
                doc = client.get("/api/status")
            except AdminError as e:
                failed = True
                sys.stderr.write(f"error: {e}\n")
                sys.stderr.flush()
                continue
            failed = False
            if as_json:
                print_json(doc, compact=True)
            else:
                print(f"--- {time.strftime('%H:%M:%S')} ({client.base_url})")
                _print_status(doc)
                sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return 1 if failed else 0


def _cmd_token(args: argparse.Namespace) -> int:
    token = token_for(args, required=True)
    print_json({"token": token}) if args.json else print(token)
    return 0


def _cmd_local_cluster(args: argparse.Namespace) -> int:
    from .local_cluster import LocalCluster

    mail = ["--smarthost", args.smarthost] if args.smarthost else []
    for rule in args.transport:
        mail += ["--transport", rule]
    return LocalCluster(
        base_dir=Path(args.base_dir), porcupine=args.porcupine, yima=args.yima, mail_args=mail
    ).run()


Register = Callable[[Any, Callable[..., AdminClient], argparse.ArgumentParser], None]


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = _Parser(prog="yimaporc", description=__doc__)
    sub: Any = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    admin = _admin_parent()

    p = sub.add_parser("status", parents=[admin], help="show a node's view of the cluster")
    p.add_argument("--watch", action="store_true", help="print it again every --interval s")
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                   help="with --watch: seconds between rounds (default 2)")  # fmt: skip
    p.add_argument("--count", type=int, metavar="N",
                   help="with --watch: stop after N rounds (default: until Ctrl-C)")  # fmt: skip
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("token", parents=[admin], help="print the admin bearer token")
    p.set_defaults(func=_cmd_token)

    p = sub.add_parser("local-cluster", help="run a demo cluster on 127.0.x.y (Ctrl-C stops)")
    p.add_argument("--porcupine", type=int, default=3, metavar="N")
    p.add_argument("--yima", type=int, default=3, metavar="N")
    p.add_argument("--base-dir", default="var/local", metavar="DIR")
    p.add_argument(
        "--smarthost",
        metavar="HOST:PORT",
        help="send the mail nodes' outbound mail through this relay",
    )
    p.add_argument(
        "--transport",
        action="append",
        default=[],
        metavar="DOMAIN=HOST:PORT",
        help="send mail for DOMAIN to HOST:PORT (repeatable)",
    )
    p.set_defaults(func=_cmd_local_cluster)

    for module in ("yimaporc.porcupine.cli", "yimaporc.yima.cli", "yimaporc.yima.player.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                continue
            raise
        mod.register(sub, make_client, admin)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CliError, AdminError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
