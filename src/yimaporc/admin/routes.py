"""The admin route shape, re-exported: it lives with the node (:mod:`yimaporc.cluster.routes`)
that holds the routes; the admin site only serves them."""

from __future__ import annotations

from ..cluster.routes import MAX_JSON_BODY, MAX_RAW_BODY, ApiError, JsonHandler, Route

__all__ = ["MAX_JSON_BODY", "MAX_RAW_BODY", "ApiError", "JsonHandler", "Route"]
