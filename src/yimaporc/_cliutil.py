"""What every ``yimaporc`` subcommand shares: the user-facing error, the admin client, JSON output.

Kept apart from :mod:`yimaporc.cli` so the per-service command modules
(``yima/cli.py``, ``porcupine/cli.py``) can use it without importing the
top-level command that imports them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from .admin.client import AdminClient, AdminError
from .secret import SecretError, admin_token, load_or_create_secret

DEFAULT_SECRET = Path("var/local/cluster.secret")


class CliError(Exception):
    """A user-facing failure: printed as ``error: ...``."""


def default_secret(admin: str | None) -> Path:
    """Without --secret-file: the secret of the node's cluster in local-cluster's layout.

    ``local-cluster`` gives each cluster its own secret, ``var/local/KIND/cluster.secret``;
    the node at ``admin`` says its kind in ``/api/status``.  Otherwise (or for
    an older layout) ``var/local/cluster.secret``.
    """
    if admin:
        try:
            kind = AdminClient(admin, None).get("/api/status").get("kind")
        except (AdminError, AttributeError):
            kind = None
        if isinstance(kind, str) and kind.isalpha():
            candidate = DEFAULT_SECRET.parent / kind / DEFAULT_SECRET.name
            if candidate.exists():
                return candidate
    return DEFAULT_SECRET


def token_for(args: argparse.Namespace, required: bool) -> str | None:
    """The admin bearer token: $YIMAPORC_TOKEN, else derived from --secret-file."""
    env = os.environ.get("YIMAPORC_TOKEN")
    if env:
        return env.strip()
    if args.secret_file:
        path = Path(args.secret_file)
    elif required:
        path = default_secret(getattr(args, "admin", None))
    else:
        path = DEFAULT_SECRET
    if not path.exists():
        if required:
            raise CliError(
                f"no admin token: set YIMAPORC_TOKEN or give --secret-file (tried {path})"
            )
        return None
    try:
        return admin_token(load_or_create_secret(path, create=False))
    except SecretError as e:
        raise CliError(str(e)) from e


def make_client(args: argparse.Namespace, *, mutating: bool = True) -> AdminClient:
    """An :class:`AdminClient` for ``--admin`` with the token when there is one."""
    if not args.admin:
        raise CliError("--admin URL is required (e.g. --admin http://127.0.1.1:8080)")
    try:
        return AdminClient(args.admin, token_for(args, required=mutating))
    except AdminError as e:
        raise CliError(str(e)) from e


def print_json(doc: Any, *, compact: bool = False) -> None:
    """Print ``doc`` as JSON on stdout (what every command's ``--json`` prints)."""
    if compact:
        print(json.dumps(doc, sort_keys=True, separators=(",", ":")), flush=True)
    else:
        print(json.dumps(doc, indent=2, sort_keys=True), flush=True)
