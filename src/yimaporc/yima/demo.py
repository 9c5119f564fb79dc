"""The demo clip of ``yimaporc local-cluster``: made once, ingested as ``sample``."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from ..admin.client import AdminClient, AdminError
from .cli import upload
from .media.sample import SampleError, make_sample_ts

SAMPLE_NAME = "sample"
SAMPLE_SECONDS = 12.0


class DemoError(Exception):
    """The demo clip could not be made or ingested (message is user-facing)."""


def _error(message: str) -> Exception:
    return DemoError(message)


def _wait_disks(client: AdminClient, timeout: float) -> None:
    """Wait until every member has registered a disk (so the clip spreads over all)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        doc = client.get("/api/status")
        members = {m["node_id"] for m in doc["members"]}
        with_disks = {d["node_id"] for d in doc.get("disks", [])}
        reorganising = doc.get("storage", {}).get("reorganising", False)
        if members <= with_disks and not reorganising:
            return
        if time.monotonic() > deadline:
            return
        pause.wait(0.1)


def ensure_sample(client: AdminClient, base_dir: Path, timeout: float = 30.0) -> None:
    """Make ``base_dir/media/sample.ts`` (once) and ingest it as ``sample`` unless stored."""
    try:
        media = client.get("/api/yima/media")["media"]
        if any(m["name"] == SAMPLE_NAME for m in media):
            return
        clip = base_dir / "media" / "sample.ts"
        if not clip.exists() or clip.stat().st_size == 0:
            clip.parent.mkdir(parents=True, exist_ok=True)
            tmp = clip.with_suffix(".tmp.ts")
            make_sample_ts(tmp, SAMPLE_SECONDS)
            tmp.replace(clip)
        _wait_disks(client, timeout)
        # Small blocks (20 RTP payloads), so every node of the demo holds some.
        upload(client, "/api/yima/media", {"name": SAMPLE_NAME, "block_size": "26320"}, clip)
    except SampleError as e:
        raise _error(f"cannot make the sample clip: {e}") from e
    except AdminError as e:
        if "already exists" in str(e):
            return
        raise _error(f"cannot ingest the sample clip: {e}") from e
