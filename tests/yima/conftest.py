"""Fixtures for the Yima storage tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from yimaporc.yima.media.sample import make_sample_ts


@pytest.fixture(scope="session")
def sample_ts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-second MPEG-TS clip (video+audio) made by ffmpeg, shared by the session."""
    if shutil.which("ffmpeg") is None:
        if os.environ.get("CI"):
            pytest.fail("ffmpeg is required under CI")
        pytest.skip("ffmpeg not installed")
    return make_sample_ts(tmp_path_factory.mktemp("media") / "sample.ts", seconds=4)
