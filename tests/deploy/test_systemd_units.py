"""contrib/systemd: the unit templates and their example flags are usable as shipped."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.python import usage

from yimaporc.tap.porcupine import Options as PorcupineOptions
from yimaporc.tap.yima import Options as YimaOptions
from yimaporc.testing.certs import make_cert

CONTRIB = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
UNITS = {"porcupine-node@.service": "porcupine", "yima-node@.service": "yima"}


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((CONTRIB / name).read_text().replace("\\\n", " "))
    return parser


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_runs_the_node_unprivileged_from_an_env_file(name: str) -> None:
    """Each template runs twistd KIND-node as a non-root user with only the bind
    capability, one EnvironmentFile per instance, and restarts on failure."""
    kind = UNITS[name]
    svc = unit(name)["Service"]
    assert svc["User"] == "yimaporc" and svc["Group"] == "yimaporc"
    assert svc["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert svc["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert svc["NoNewPrivileges"] == "yes" and svc["UMask"] == "0077"
    assert svc["Restart"] == "on-failure"
    assert svc["EnvironmentFile"] == f"/etc/yimaporc/{kind}-%i.env"
    argv = svc["ExecStart"].split()
    assert argv[0].endswith("/twistd") and "--nodaemon" in argv and "--pidfile=" in argv
    assert argv[argv.index(f"{kind}-node") + 1 :][:4] == [
        "--node-id", "%i", "--data-dir", f"/var/lib/yimaporc/{kind}-%i",
    ]  # fmt: skip
    assert argv[-1] == "$NODE_FLAGS" and "--user" not in argv
    assert svc["StateDirectory"] == f"yimaporc/{kind}-%i"


@pytest.mark.parametrize(
    ("example", "options"),
    [("porcupine.env.example", PorcupineOptions), ("yima.env.example", YimaOptions)],
)
def test_example_flags_are_accepted_by_the_node(
    example: str, options: type[usage.Options], tmp_path: Path
) -> None:
    """The NODE_FLAGS of each example env file parse with the node's own options (files
    the example names are made up here)."""
    line = next(
        x for x in (CONTRIB / example).read_text().splitlines() if x.startswith("NODE_FLAGS=")
    )
    flags = line.removeprefix("NODE_FLAGS=").split()
    # Point the files the example names at real ones so only the flags are judged.
    cert, key = make_cert(tmp_path)
    fixed = [
        str(cert) if f.endswith(".pem") else str(key) if f.endswith(".key") else f for f in flags
    ]
    opts = options()
    opts.parseOptions(["--node-id", "n1", "--data-dir", str(tmp_path / "d"), *fixed])
    assert opts["cluster-name"] in ("mail", "media")
    assert len(opts["join"]) == 2


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    """systemd-analyze verify finds nothing wrong with an instance of each template."""
    twistd = Path(sys.executable).parent / "twistd"
    paths = []
    for name, kind in UNITS.items():
        text = (CONTRIB / name).read_text().replace("/opt/yimaporc/.venv/bin/twistd", str(twistd))
        path = tmp_path / name.replace("@.", f"@{kind[0]}1.")
        path.write_text(text)
        paths.append(str(path))
    done = subprocess.run(
        ["systemd-analyze", "verify", *paths], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
