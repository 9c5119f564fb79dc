"""`yimaporc play` refuses bad input with one `error:` line and a non-zero status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from yimaporc.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["rtsp://127.0.61.1:18554/x", "--drop", "1.5"], "--drop must be in [0, 1)"),
        (["rtsp://127.0.61.1:18554/x", "--duration", "0"], "--duration must be positive"),
        (["http://127.0.61.1/x"], "not an rtsp:// URL"),
        (["rtsp://127.0.61.1:18554/x", "--stats", "/nonexistent/dir/s.json"], "cannot write"),
        (["rtsp://127.0.61.1:18554/x", "--out", "/nonexistent/dir/o.ts"], "cannot write"),
    ],
)
def test_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad flags are refused before any network traffic."""
    assert main(["play", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_plot_without_matplotlib_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--plot needs the optional matplotlib; without it the player says so."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["play", "rtsp://127.0.61.1:18554/x", "--plot", "p.png"]) == 1
    assert "needs matplotlib" in capsys.readouterr().err


def test_unreachable_server(tmp_path: Path) -> None:
    """Nothing listening: one error line, exit status 1 (a real process, it runs the reactor)."""
    r = subprocess.run(
        [sys.executable, "-m", "yimaporc.cli", "play", "rtsp://127.0.61.7:18554/clip",
         "--stats", str(tmp_path / "s.json")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.startswith("error: cannot connect to 127.0.61.7:18554")
    assert r.stderr.count("\n") == 1 and not (tmp_path / "s.json").exists()
