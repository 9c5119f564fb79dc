"""A real porcupine node whose data disk is full at start exits with one line, not a
traceback (tap/common.py ``cannot_start``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from yimaporc.testing.procs import twistd

HOST = "127.0.187.1"


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a tmpfs needs root"
)
def test_a_real_node_on_a_full_disk_exits_with_one_line(tmp_path: Path) -> None:
    """twistd porcupine-node with its data dir on a full 1 MiB tmpfs (made and removed
    here) exits 1 at once with the reason on stderr, and prints no traceback."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        with open(mnt / "fill", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        r = subprocess.run(
            [twistd(), "-n", "--pidfile=", "--logfile", str(tmp_path / "node.log"),
             "porcupine-node", "--node-id", "n1", "--data-dir", str(mnt / "d"),
             "--domain", "example.org", "--cluster", f"{HOST}:17946",
             "--smtp", f"tcp:0:interface={HOST}"],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "porcupine-node cannot start:" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
