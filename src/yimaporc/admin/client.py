"""A small synchronous client of the admin API, for the ``yimaporc`` command."""

from __future__ import annotations

import http.client
import json
import select
import ssl
import urllib.error
import urllib.request
from typing import Any


class AdminError(Exception):
    """The admin API could not be reached or refused the request (message is user-facing)."""


class AdminClient:
    """Calls ``http://HOST:PORT/api/...`` with an optional bearer token."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 600.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise AdminError(f"admin URL must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def get(self, path: str) -> Any:
        """GET ``path`` and return the decoded JSON."""
        return self._call("GET", path, None)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """POST ``body`` as JSON to ``path`` and return the decoded JSON."""
        return self._call("POST", path, body or {})

    def delete(self, path: str) -> Any:
        """DELETE ``path`` and return the decoded JSON."""
        return self._call("DELETE", path, None)

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", "Bearer " + self.token)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                message = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode("utf-8", "replace").strip() or e.reason
            raise AdminError(f"{message} (HTTP {e.code})") from e
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise AdminError(f"cannot reach {self.base_url}: {reason}") from e
        try:
            return json.loads(payload) if payload else None
        except ValueError as e:
            raise AdminError(f"{self.base_url} answered with something that is not JSON") from e


def await_continue(
    conn: http.client.HTTPConnection, timeout: float = 3.0
) -> tuple[int, bytes] | None:
    """After ``endheaders()`` of a request sent with ``Expect: 100-continue``, wait up
    to ``timeout`` s for the server. None: send the body (``100 Continue`` came, or
    nothing did); else ``(status, body)``: the server's final answer, given before the
    body (e.g. 401/413 for an upload the admin API refuses from its head).
    """
    sock = conn.sock
    if sock is None or isinstance(sock, ssl.SSLSocket):
        return None
    buf = b""
    while b"\r\n\r\n" not in buf:
        if not select.select([sock], [], [], timeout)[0]:
            return None
        data = sock.recv(4096)
        if not data:
            break
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return (0, buf)
    if status == 100:
        return None
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
    while (length is None or len(body) < length) and select.select([sock], [], [], timeout)[0]:
        try:
            data = sock.recv(65536)
        except OSError:
            break
        if not data:
            break
        body += data
    return status, body
