"""The shape every admin API route has, so node kinds can mount their own on their node.

A route handler takes the decoded JSON body (``{}`` for GET) plus the query
arguments and returns a Deferred (or a plain value) with a JSON-able result.
It raises :class:`ApiError` for anything the caller did wrong; the admin
server turns that into a JSON ``{"error": ...}`` with the given HTTP status.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred

JsonHandler = Callable[[dict[str, Any], dict[str, str]], "Deferred[Any] | Any"]

#: Largest body a JSON route accepts unless it says otherwise (its requests are small).
MAX_JSON_BODY = 64 << 10
#: Largest body a ``raw`` route (an upload, e.g. media ingest) accepts unless it says otherwise.
MAX_RAW_BODY = 64 << 30


class ApiError(Exception):
    """A request the API refuses: ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@attrs.frozen
class Route:
    """One admin endpoint: ``method`` and ``path`` (e.g. ``"/api/mail/users"``).

    With ``raw`` the handler's body argument is ``{"content": file, "size": n}``
    (the uploaded bytes, e.g. a media file) instead of decoded JSON.

    ``mutates`` (the default) means the route needs the bearer token: every route
    that changes state, reveals accounts or makes the node do work for others
    (RPC to every member, disk scans) keeps it; only cheap read-only views set it
    False. The token and ``max_body`` (bytes; default :data:`MAX_JSON_BODY`, or
    :data:`MAX_RAW_BODY` for ``raw`` routes) are checked from the request head,
    before a single body byte is read.
    """

    method: str
    path: str
    handler: JsonHandler
    mutates: bool = True
    raw: bool = False
    max_body: int | None = None

    @property
    def body_limit(self) -> int:
        """The largest request body this route accepts, in bytes."""
        if self.max_body is not None:
            return self.max_body
        return MAX_RAW_BODY if self.raw else MAX_JSON_BODY
