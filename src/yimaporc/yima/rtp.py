"""Moved: RTP and RTCP are the :mod:`yimaporc.rtp` package.

This name re-exports it for the modules that still import it from here
(``yima/rtspservice.py``, ``yima/_workerproc.py``); import :mod:`yimaporc.rtp`.
"""

from __future__ import annotations

from ..rtp import *  # noqa: F403
from ..rtp import __all__  # noqa: F401
