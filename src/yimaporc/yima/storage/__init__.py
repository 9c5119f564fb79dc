"""Yima's storage service: the public face of the storage parts (see :mod:`._service`)."""

from __future__ import annotations

from ._catalog import DOCUMENT, Catalog, empty_document, join_catalog, split_catalog
from ._reorganise import TRANSITIONS, Phase, PhaseError
from ._service import YimaStorageService

__all__ = [
    "DOCUMENT",
    "TRANSITIONS",
    "Catalog",
    "Phase",
    "PhaseError",
    "YimaStorageService",
    "empty_document",
    "join_catalog",
    "split_catalog",
]
