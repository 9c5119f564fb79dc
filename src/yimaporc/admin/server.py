"""The admin endpoint of every node: JSON API under /api, the cluster dashboard at /.

``GET /api/status``, ``GET /api/cluster`` (the dashboard's data), ``GET /metrics``
(Prometheus) and ``GET /`` are open; every route marked ``mutates`` needs
``Authorization: Bearer TOKEN`` (see :func:`yimaporc.secret.admin_token`).

The token and the body size are judged from the request head alone
(:meth:`AdminResource.admission`, called by :class:`AdminChannel` once the headers
are in): a request without the token, or announcing a body larger than its route
accepts, is answered 401/413 and the connection closed before one body byte is
buffered; a chunked body is counted as it streams and cut off at the same limit.
Connections are capped in total and per peer address, and idle ones time out.
"""

from __future__ import annotations

import hmac
import json
import re
from collections import Counter
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from ..secret import admin_token
from .dashboard import ClusterView, page
from .metrics import CONTENT_TYPE, NodeMetrics
from .routes import MAX_JSON_BODY, ApiError, Route

if TYPE_CHECKING:
    from ..cluster.node import ClusterNode

__all__ = ["MAX_JSON_BODY", "AdminChannel", "AdminRequest", "AdminResource", "AdminSite"]

#: Body limit for requests that match no route (``/``, ``/api/status``, 404s): they are GETs.
MAX_OTHER_BODY = 4 << 10
#: Open admin connections at once, in total and from one peer address.
MAX_CONNECTIONS = 64
MAX_CONNECTIONS_PER_PEER = 16
#: Seconds an admin connection may sit idle (no request in progress) before it is closed.
IDLE_TIMEOUT = 60.0
#: After a refusal: how long, and how many bytes, the rest of the body is read and dropped
#: (so that a client still sending sees the answer) before the connection is aborted.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20

#: Bytes a request URI may not hold (RFC 3986: printable ASCII) and header bytes that
#: RFC 9110 forbids (controls other than tab).
_BAD_URI = re.compile(rb"[^\x21-\x7e]")
_BAD_HEADER = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

_REASONS = {400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found", 413: b"Content Too Large"}


@attrs.frozen
class Refusal:
    """A request answered from its head alone: ``status`` and a JSON ``{"error": message}``."""

    status: int
    message: str

    def response(self) -> bytes:
        """The whole HTTP/1.1 response, closing the connection."""
        body = json.dumps({"error": self.message}).encode("utf-8") + b"\n"
        head = [
            b"HTTP/1.1 %d %s" % (self.status, _REASONS.get(self.status, b"Refused")),
            b"Content-Type: application/json",
            b"Content-Length: %d" % len(body),
            b"Connection: close",
        ]
        if self.status == 401:
            head.append(b'WWW-Authenticate: Bearer realm="yimaporc"')
        return b"\r\n".join(head) + b"\r\n\r\n" + body


class AdminResource(Resource):
    """Dispatches every path to the node's routes."""

    isLeaf = True
    log = Logger()

    def __init__(self, node: ClusterNode) -> None:
        super().__init__()
        self.node = node
        self.token = admin_token(node.secret)
        self.metrics = NodeMetrics(node)
        self.cluster_view = ClusterView(node)
        if not any(r.path == "/api/cluster" for r in node.routes):
            node.routes.append(
                Route("GET", "/api/cluster", self.cluster_view.handle, mutates=False)
            )

    def render(self, request: Request) -> Any:
        """Route by method and path; answer JSON (or the dashboard at /, metrics at /metrics)."""
        path = request.path.decode("utf-8", "replace").rstrip("/") or "/"
        method = request.method.decode("ascii", "replace")
        if path == "/" and method == "GET":
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            request.setHeader(b"cache-control", b"no-cache")
            return page()
        if path == "/metrics" and method == "GET":
            request.setHeader(b"content-type", CONTENT_TYPE.encode("ascii"))
            return self.metrics.render()
        if path == "/api/status" and method == "GET":
            return self._json(request, 200, self.node.status())
        route = self._find(method, path)
        if route is None:
            known = any(r.path == path for r in self.node.routes)
            status = 405 if known else 404
            return self._json(request, status, {"error": f"no {method} {path}"})
        if route.mutates and not self._authorised(request):
            request.setHeader(b"www-authenticate", b'Bearer realm="yimaporc"')
            return self._json(request, 401, {"error": "missing or wrong bearer token"})
        try:
            body = self._body(request, route)
        except ApiError as e:
            return self._json(request, e.status, {"error": e.message})
        query = {
            k.decode("utf-8", "replace"): v[-1].decode("utf-8", "replace")
            for k, v in (request.args or {}).items()
        }
        d = maybeDeferred(route.handler, body, query)
        d.addCallback(lambda result: self._finish(request, 200, result))
        d.addErrback(self._failed, request, method, path)
        return NOT_DONE_YET

    def admission(
        self, method: bytes, uri: bytes, headers: Headers, length: int | None
    ) -> Refusal | int:
        """Judge a request from its head: a :class:`Refusal`, or the body limit in bytes.

        ``length`` is the declared Content-Length (None for a chunked body).
        A request URI that is not printable ASCII, or a header with a control
        character (other than tab) in its name or value, is refused 400: twisted.web
        would raise formatting or parsing it (RFC 9110 5.5: such a request is invalid).
        """
        if _BAD_URI.search(uri):
            return Refusal(400, "the request URI must be printable ASCII")
        for name, values in headers.getAllRawHeaders():
            if _BAD_HEADER.search(name) or any(_BAD_HEADER.search(v) for v in values):
                return Refusal(400, "control character in a header")
        path = uri.split(b"?", 1)[0].decode("utf-8", "replace").rstrip("/") or "/"
        route = self._find(method.decode("ascii", "replace"), path)
        if route is None:
            limit = MAX_OTHER_BODY
        else:
            if route.mutates and not self._token_ok(headers):
                return Refusal(401, "missing or wrong bearer token")
            limit = route.body_limit
        if length is not None and length > limit:
            return Refusal(413, f"request body too large: {length} bytes, at most {limit}")
        return limit

    def _find(self, method: str, path: str) -> Route | None:
        for route in self.node.routes:
            if route.method == method and route.path == path:
                return route
        return None

    def _authorised(self, request: Request) -> bool:
        return self._token_ok(request.requestHeaders)

    def _token_ok(self, headers: Headers) -> bool:
        raw = headers.getRawHeaders(b"authorization") or [b""]
        header = raw[-1].decode("latin-1").strip()
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), self.token.encode()
        )

    def _body(self, request: Request, route: Route) -> dict[str, Any]:
        if request.method == b"GET" or request.content is None:
            return {}
        request.content.seek(0, 2)
        size = request.content.tell()
        request.content.seek(0)
        if size > route.body_limit:
            raise ApiError("request body too large", 413)
        if route.raw:
            return {"content": request.content, "size": size}
        raw = request.content.read()
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise ApiError(f"request body is not JSON: {e}") from e
        if not isinstance(body, dict):
            raise ApiError("request body must be a JSON object")
        return body

    def _failed(self, failure: Failure, request: Request, method: str, path: str) -> None:
        if failure.check(ApiError):
            err: ApiError = failure.value  # type: ignore[assignment]
            self._finish(request, err.status, {"error": err.message})
            return
        self.log.failure("admin: {method} {path} failed", failure, method=method, path=path)
        self._finish(request, 500, {"error": f"internal error: {failure.getErrorMessage()}"})

    def _finish(self, request: Request, status: int, doc: Any) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        request.write(self._json(request, status, doc))
        request.finish()

    @staticmethod
    def _json(request: Request, status: int, doc: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(doc, indent=1, sort_keys=True).encode("utf-8") + b"\n"


class AdminRequest(Request):
    """A request whose body is cut off at ``body_limit`` bytes as it streams (chunked)."""

    body_limit: int | None = None
    body_seen = 0

    def handleContentChunk(self, data: bytes) -> None:
        """Count the body; past the limit the channel answers 413 and stops reading."""
        channel = self.channel
        if isinstance(channel, AdminChannel) and channel.refused:
            return
        self.body_seen += len(data)
        if self.body_limit is not None and self.body_seen > self.body_limit:
            if isinstance(channel, AdminChannel):
                channel.refuse(
                    Refusal(413, f"request body too large: more than {self.body_limit} bytes")
                )
            return
        super().handleContentChunk(data)


class AdminChannel(HTTPChannel):
    """HTTP/1.1 that asks :meth:`AdminResource.admission` before any body is read.

    A refused request gets its answer at once; the rest of what the client sends is
    dropped unread (for at most :data:`LINGER_SECONDS` / :data:`LINGER_BYTES`) and the
    connection is closed. No request object ever sees a body byte of a refused request.
    """

    site: AdminSite
    log = Logger()
    refused = False
    peer_host = ""
    _discarded = 0

    def allHeadersReceived(self) -> None:
        """Admit or refuse the request whose head just ended."""
        req = self.requests[-1]
        verdict = self.site.resource.admission(
            self._command, self._path, req.requestHeaders, self.length
        )
        if isinstance(verdict, Refusal):
            self.refuse(verdict)
            return
        if isinstance(req, AdminRequest):
            req.body_limit = verdict
        super().allHeadersReceived()

    def refuse(self, refusal: Refusal) -> None:
        """Answer ``refusal``, stop parsing, and close once the answer is out."""
        if self.refused:
            return
        self.refused = True
        self.site.stats[f"refused_{refusal.status}"] += 1
        self.log.info(
            "admin: {status} for {method} {path!r} from {peer}: {why}",
            status=refusal.status,
            method=self._command.decode("ascii", "replace")[:16],
            path=self._path.decode("utf-8", "replace")[:100],
            peer=self.peer_host,
            why=refusal.message,
            log_source_key=self.peer_host,
        )
        self.setTimeout(None)
        transport: Any = self.transport
        transport.write(refusal.response())
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is None:
            transport.loseConnection()
            return
        half_close()
        self._linger = self.callLater(LINGER_SECONDS, transport.abortConnection)

    def lineReceived(self, line: bytes) -> None:
        """Parse request heads until a refusal."""
        if self.refused:
            return
        super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        """Pass body bytes on, or drop them (and abort past the linger budget) once refused."""
        if self.refused:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                transport: Any = self.transport
                transport.abortConnection()
            return
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        """Dispatch a complete request, unless it was refused."""
        if self.refused:
            return
        super().allContentReceived()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        """Release this connection's slot."""
        linger = getattr(self, "_linger", None)
        if linger is not None and linger.active():
            linger.cancel()
        self.site.connection_closed(self)
        super().connectionLost(reason)


class AdminSite(Site):
    """A ``Site`` serving one node's admin API, without access logs on stdout.

    At most ``max_connections`` connections are open at once (``max_per_peer`` from
    one address); more are closed as they arrive and counted in ``stats``.
    """

    protocol = AdminChannel  # type: ignore[assignment]
    requestFactory = AdminRequest
    resource: AdminResource

    def __init__(
        self,
        node: ClusterNode,
        max_connections: int = MAX_CONNECTIONS,
        max_per_peer: int = MAX_CONNECTIONS_PER_PEER,
        timeout: float = IDLE_TIMEOUT,
    ) -> None:
        super().__init__(
            AdminResource(node), requestFactory=AdminRequest, timeout=timeout, reactor=node.reactor
        )
        self.max_connections = max_connections
        self.max_per_peer = max_per_peer
        self.open: Counter[str] = Counter()
        self.stats: Counter[str] = Counter(
            {"refused_400": 0, "refused_401": 0, "refused_413": 0, "refused_connections": 0}
        )
        node.add_status(self._status)

    def _status(self) -> dict[str, Any]:
        return {"admin": {"connections": sum(self.open.values()), **self.stats}}

    def buildProtocol(self, addr: IAddress | None) -> AdminChannel | None:  # type: ignore[override]
        """A channel, or None (the connection is closed) past the caps."""
        host = str(getattr(addr, "host", ""))
        if sum(self.open.values()) >= self.max_connections or self.open[host] >= self.max_per_peer:
            self.stats["refused_connections"] += 1
            return None
        channel: AdminChannel = super().buildProtocol(addr)  # type: ignore[assignment]
        channel.peer_host = host
        self.open[host] += 1
        return channel

    def connection_closed(self, channel: AdminChannel) -> None:
        """Forget ``channel``'s slot."""
        self.open[channel.peer_host] -= 1
        if self.open[channel.peer_host] <= 0:
            del self.open[channel.peer_host]

    def log(self, request: Any) -> None:
        """Access logs are not written (status is polled often)."""
