"""A small synchronous client of the admin API, for the ``yimaporc`` command."""

from __future__ import annotations

import json
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
