"""The shape every admin API route has, so node kinds can mount their own.

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
    """

    method: str
    path: str
    handler: JsonHandler
    mutates: bool = True
    raw: bool = False
