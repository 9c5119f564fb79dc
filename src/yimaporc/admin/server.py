"""The admin endpoint of every node: JSON API under /api, an HTML status page at /.

``GET /api/status`` is open; every route marked ``mutates`` needs
``Authorization: Bearer TOKEN`` (see :func:`yimaporc.secret.admin_token`).
"""

from __future__ import annotations

import hmac
import html
import json
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from ..secret import admin_token
from .routes import ApiError, Route

if TYPE_CHECKING:
    from ..cluster.node import ClusterNode

MAX_JSON_BODY = 1 << 20


class AdminResource(Resource):
    """Dispatches every path to the node's routes."""

    isLeaf = True
    log = Logger()

    def __init__(self, node: ClusterNode) -> None:
        super().__init__()
        self.node = node
        self.token = admin_token(node.secret)

    def render(self, request: Request) -> Any:
        """Route by method and path; answer JSON (or the HTML page at /)."""
        path = request.path.decode("utf-8", "replace").rstrip("/") or "/"
        method = request.method.decode("ascii", "replace")
        if path == "/" and method == "GET":
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return _status_page(self.node.status()).encode("utf-8")
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

    def _find(self, method: str, path: str) -> Route | None:
        for route in self.node.routes:
            if route.method == method and route.path == path:
                return route
        return None

    def _authorised(self, request: Request) -> bool:
        header = (request.getHeader("authorization") or "").strip()
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
        if route.raw:
            return {"content": request.content, "size": size}
        if size > MAX_JSON_BODY:
            raise ApiError("request body too large", 413)
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


def _status_page(doc: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(m['node_id'])}</td><td>{html.escape(m['address'])}</td></tr>"
        for m in doc.get("members", [])
    )
    detail = html.escape(json.dumps(doc, indent=1, sort_keys=True))
    title = f"yimaporc {html.escape(doc['kind'])} node {html.escape(doc['node_id'])}"
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{title}</title></head><body><h1>{title}</h1>"
        f"<p>epoch {doc['epoch']}, coordinator {html.escape(str(doc['coordinator']))}</p>"
        f"<h2>Members</h2><table><tr><th>node</th><th>address</th></tr>{rows}</table>"
        f"<h2>Status</h2><pre>{detail}</pre></body></html>"
    )


class AdminSite(Site):
    """A ``Site`` serving one node's admin API, without access logs on stdout."""

    def __init__(self, node: ClusterNode) -> None:
        super().__init__(AdminResource(node))

    def log(self, request: Any) -> None:
        """Access logs are not written (status is polled often)."""
