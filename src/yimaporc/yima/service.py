"""Where :class:`YimaStorageService` was before it was split: re-exports :mod:`.storage`."""

from __future__ import annotations

from .storage import Catalog, YimaStorageService, empty_document, join_catalog, split_catalog

__all__ = ["Catalog", "YimaStorageService", "empty_document", "join_catalog", "split_catalog"]
