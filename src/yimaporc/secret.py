"""The cluster secret and the keys derived from it.

Every node of a cluster reads the same secret (``--secret-file``, default
``DATA_DIR/cluster.secret``, created on first start).  Nothing uses the secret
directly: each purpose gets its own HMAC-derived key, so a leaked admin token
does not let anyone forge membership datagrams.  The membership and RPC keys
are also bound to the cluster's name and node kind (:func:`cluster_key`), so two
clusters that share a secret file still cannot hear each other.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

SECRET_BYTES = 32


class SecretError(Exception):
    """The secret file is missing, unreadable or too short."""


def load_or_create_secret(path: str | os.PathLike[str], create: bool = True) -> bytes:
    """Read the secret at ``path``; create it (mode 0600) if absent and ``create``."""
    p = Path(path)
    if not p.exists():
        if not create:
            raise SecretError(f"secret file {p} does not exist")
        p.parent.mkdir(parents=True, exist_ok=True)
        value = secrets.token_hex(SECRET_BYTES).encode("ascii")
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, value + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        value = p.read_bytes().strip()
    except OSError as e:
        raise SecretError(f"cannot read secret file {p}: {e.strerror}") from e
    if len(value) < 16:
        raise SecretError(f"secret file {p} holds fewer than 16 bytes")
    return value


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A 32-byte key for one ``purpose`` (``"membership"``, ``"rpc"``, ...)."""
    return hmac.new(secret, b"yimaporc/v1/" + purpose.encode("ascii"), hashlib.sha256).digest()


def cluster_key(secret: bytes, purpose: str, cluster: str, kind: str) -> bytes:
    """A 32-byte key for ``purpose`` inside one cluster (by name) of one node kind.

    ``cluster`` and ``kind`` are ASCII names without NUL (see
    :class:`yimaporc.cluster.wire.Scope`), so the NUL-separated input is unambiguous.
    """
    label = b"\0".join(x.encode("ascii") for x in (purpose, kind, cluster))
    return hmac.new(secret, b"yimaporc/v2/" + label, hashlib.sha256).digest()


def admin_token(secret: bytes) -> str:
    """The bearer token that admin API mutations require."""
    return derive_key(secret, "admin-token").hex()
