"""Throw-away TLS material for tests."""

from __future__ import annotations

import ssl

from ..certs import make_cert

__all__ = ["client_context", "make_cert"]


def client_context() -> ssl.SSLContext:
    """A client context that accepts any certificate (the tests' self-signed ones)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
