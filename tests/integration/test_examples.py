"""The examples in examples/ run as documented (real processes, real players)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from yimaporc.testing.procs import framemd5, wait_for
from yimaporc.yima.media.sample import make_sample_ts

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_rtsp_file_server_example_plays_in_ffmpeg(tmp_path: Path, transport: str) -> None:
    """examples/rtsp_file_server.py serves a clip that ffmpeg records frame-exact."""
    make_sample_ts(tmp_path / "clip.ts", 3)
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "rtsp_file_server.py"), str(tmp_path), "127.0.71.1",
             "18554"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(lambda: "serving" in log.read_text(), 15, "the example to listen")
        got = tmp_path / "out.ts"
        subprocess.run(
            ["ffmpeg", "-hide_banner", "-loglevel", "error", "-rtsp_transport", transport, "-i",
             "rtsp://127.0.71.1:18554/clip", "-c", "copy", "-f", "mpegts", "-y", str(got)],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        missing = subprocess.run(
            ["ffprobe", "-v", "error", "rtsp://127.0.71.1:18554/nothing"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert missing.returncode != 0 and "404" in missing.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)
    want, have = framemd5(tmp_path / "clip.ts"), framemd5(got)
    assert len(have) >= len(want) - 1 and have == want[: len(have)]


def test_embedded_yima_node_example_streams_what_it_ingested(tmp_path: Path) -> None:
    """examples/embed_yima_node.py: YimaNode.from_config in an app; ffmpeg records the clip."""
    make_sample_ts(tmp_path / "clip.ts", 3)
    log = tmp_path / "yima.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "embed_yima_node.py"), str(tmp_path / "data"),
             str(tmp_path / "clip.ts"), "127.0.139.2", "18554"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(lambda: "serving rtsp://" in log.read_text(), 60, "the example to serve")
        got = tmp_path / "out.ts"
        subprocess.run(
            ["ffmpeg", "-hide_banner", "-loglevel", "error", "-rtsp_transport", "tcp", "-i",
             "rtsp://127.0.139.2:18554/clip", "-c", "copy", "-f", "mpegts", "-y", str(got)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=15)
    want, have = framemd5(tmp_path / "clip.ts"), framemd5(got)
    assert len(have) >= len(want) - 1 and have == want[: len(have)]


def test_embedded_mail_service_example_takes_and_serves_mail(tmp_path: Path) -> None:
    """examples/embed_mail_service.py: smtplib delivers, imaplib and poplib read it back."""
    import imaplib
    import poplib
    import smtplib

    log = tmp_path / "mail.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "embed_mail_service.py"), str(tmp_path / "data"),
             "127.0.71.2", "2525"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(lambda: "mail for ann@example.org" in log.read_text(), 30, "the example")
        with smtplib.SMTP("127.0.71.2", 2525, timeout=10) as smtp:
            smtp.sendmail("bob@example.net", ["ann@example.org"], b"Subject: hi\r\n\r\nhello\r\n")
        imap = imaplib.IMAP4("127.0.71.2", 1143, timeout=10)
        imap.login("ann@example.org", "secret")
        imap.select("INBOX")
        typ, data = imap.uid("FETCH", "1:*", "(BODY[])")
        imap.logout()
        assert typ == "OK" and b"hello" in data[0][1]  # type: ignore[index]
        pop = poplib.POP3("127.0.71.2", 1110, timeout=10)
        pop.user("ann@example.org")
        pop.pass_("secret")
        assert pop.stat()[0] == 1
        pop.quit()
    finally:
        server.terminate()
        server.wait(timeout=15)


def _listeners(log: Path) -> dict[str, tuple[str, int]]:
    """The ``NAME HOST:PORT`` lines embed_porcupine_node.py printed."""
    out = {}
    for line in log.read_text().splitlines():
        name, _, where = line.partition(" ")
        if name in ("smtp", "pop3", "imap") and ":" in where:
            host, _, port = where.rpartition(":")
            out[name] = (host, int(port))
    return out


def test_embedded_porcupine_node_example_takes_and_serves_mail(tmp_path: Path) -> None:
    """examples/embed_porcupine_node.py: PorcupineNode.from_config in an app, mail ports
    0 read back from the node; smtplib delivers, imaplib and poplib read it back."""
    import imaplib
    import poplib
    import smtplib

    log = tmp_path / "out.log"
    with log.open("w") as out, (tmp_path / "err.log").open("w") as err:
        server = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "embed_porcupine_node.py"), str(tmp_path / "data"),
             "127.0.145.2", "17946"],
            stdout=out, stderr=err,
        )  # fmt: skip
    try:
        wait_for(lambda: "ready" in log.read_text().split(), 60, "the example to be ready")
        ports = _listeners(log)
        assert set(ports) == {"smtp", "pop3", "imap"} and all(p > 0 for _, p in ports.values())
        with smtplib.SMTP(*ports["smtp"], timeout=10) as smtp:
            smtp.sendmail("bob@example.net", ["ann@example.org"], b"Subject: hi\r\n\r\nhello\r\n")
        imap = imaplib.IMAP4(*ports["imap"], timeout=10)
        imap.login("ann@example.org", "secret")
        imap.select("INBOX")
        typ, data = imap.uid("FETCH", "1:*", "(BODY[])")
        imap.logout()
        assert typ == "OK" and b"hello" in data[0][1]  # type: ignore[index]
        pop = poplib.POP3(*ports["pop3"], timeout=10)
        pop.user("ann@example.org")
        pop.pass_("secret")
        assert pop.stat()[0] == 1
        pop.quit()
    finally:
        server.terminate()
        server.wait(timeout=15)


def test_embedded_porcupine_node_reports_a_port_it_cannot_bind(tmp_path: Path) -> None:
    """A taken SMTP port: the node's when_ready() fails with CannotStart naming --smtp
    (the node never stops the reactor; the example application stops it and exits)."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.145.3", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        done = subprocess.run(
            [sys.executable, str(EXAMPLES / "embed_porcupine_node.py"), str(tmp_path / "data"),
             "127.0.145.3", "17946", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        taken.close()
    assert f"cannot serve: cannot listen on --smtp tcp:{port}:interface=127.0.145.3" in done.stdout
    assert "ready" not in done.stdout.split()
    assert "Traceback" not in done.stderr
