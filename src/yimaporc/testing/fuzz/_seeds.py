"""Valid transcripts, the starting points of mutation, one list per front door.

Each stream door has a *preamble* (bytes a real client sends first: a greeting
answer or a login, kept valid most of the time so mutations reach the
post-login state) and *bodies*: the command sequences a real client (smtplib,
poplib, imaplib, ffmpeg, urllib) sends, as recorded from those clients or
written from the RFCs.  Datagram and AMP seeds are built with the real
encoders so they are well-formed before mutation.
"""

from __future__ import annotations

import base64

import attrs
from twisted.protocols import amp

from ...cluster import wire
from ...cluster.rpc import Echo, Hello, Prove

USER, PASSWORD = "demo@example.org", "demo-pw"
SINK = "sink@example.org"  # where SMTP fuzzing delivers, so the demo mailbox stays small
MEDIA = "clip"
SESSION_PLACEHOLDER = b"0000SESSION0000"  # replaced by a real id when the job SETUPs first


@attrs.frozen
class Transcripts:
    """The seeds of one door: ``preamble`` then any of ``bodies``; ``closing`` ends politely."""

    preamble: bytes
    bodies: tuple[bytes, ...]
    closing: bytes = b""


def _crlf(*lines: str) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode("utf-8")


def smtp() -> Transcripts:
    """What smtplib's ``sendmail``/``send_message`` and swaks send (RFC 5321 examples)."""
    message = _crlf(
        "From: Fuzz <fuzz@example.net>",
        f"To: <{SINK}>",
        "Subject: seed",
        "Message-ID: <seed@example.net>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
        "Hello.",
        "..leading dot",
        "",
    )
    return Transcripts(
        preamble=_crlf("EHLO fuzz.example.net"),
        bodies=(
            _crlf(f"MAIL FROM:<fuzz@example.net> SIZE={len(message)}", f"RCPT TO:<{SINK}>", "DATA")
            + message
            + b".\r\n",
            _crlf("MAIL FROM:<>", f"RCPT TO:<{SINK}>", "RCPT TO:<nobody@example.org>", "DATA")
            + b"Subject: bounce\r\n\r\nbody\r\n.\r\n",
            _crlf("RSET", "NOOP", "HELP", "VRFY postmaster", "EXPN list"),
            _crlf("HELO fuzz", "MAIL FROM:<a@b.org> BODY=8BITMIME", f"RCPT TO:<{SINK}>", "RSET"),
            _crlf("AUTH PLAIN " + base64.b64encode(b"\0demo@example.org\0wrong").decode()),
            _crlf("STARTTLS", "EHLO again"),
            _crlf(
                "MAIL FROM:<a@b.org>", "RCPT TO:<x@elsewhere.com>", "RCPT TO:<@route:u@example.org>"
            ),
            _crlf("BDAT 5 LAST") + b"hello",
        ),
        closing=_crlf("QUIT"),
    )


def pop3() -> Transcripts:
    """What poplib sends (RFC 1939 session, APOP, TOP, UIDL, CAPA)."""
    return Transcripts(
        preamble=_crlf(f"USER {USER}", f"PASS {PASSWORD}"),
        bodies=(
            _crlf("STAT", "LIST", "UIDL", "RETR 1", "TOP 1 0"),
            _crlf("LIST 1", "UIDL 1", "NOOP", "RSET"),
            _crlf("DELE 2", "RSET", "LIST 2"),
            _crlf("CAPA", "AUTH", "STLS"),
            _crlf(f"USER {USER}", "PASS wrong"),
            _crlf(f"APOP {USER} c4c9334bac560ecc979e58001b3e22fb"),
            _crlf("TOP 1 10", "RETR 99", "DELE 0"),
        ),
        closing=_crlf("QUIT"),
    )


def imap() -> Transcripts:
    """What imaplib sends (RFC 3501 commands), with synchronising literals."""
    msg = b"From: a@b.org\r\nSubject: appended\r\n\r\nbody\r\n"
    return Transcripts(
        preamble=_crlf(f"a0 LOGIN {USER} {PASSWORD}"),
        bodies=(
            _crlf("a1 SELECT INBOX", "a2 FETCH 1:* (FLAGS UID RFC822.SIZE)", "a3 CLOSE"),
            _crlf("b1 EXAMINE INBOX", "b2 UID FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT)])"),
            _crlf("c1 SELECT INBOX", "c2 SEARCH UNSEEN SUBJECT test", "c3 SEARCH OR 1 2"),
            _crlf('d1 LIST "" "*"', 'd2 LSUB "" "%"', "d3 STATUS INBOX (MESSAGES UIDNEXT)"),
            b"e1 APPEND INBOX (\\Seen) {%d}\r\n" % len(msg) + msg + b"\r\n",
            _crlf("f1 CREATE fuzzbox", "f2 RENAME fuzzbox fuzzbox2", "f3 DELETE fuzzbox2"),
            _crlf("g1 SELECT INBOX", "g2 STORE 1 +FLAGS (\\Deleted)", "g3 EXPUNGE", "g4 CHECK"),
            _crlf("h1 SELECT INBOX", "h2 FETCH 1 (BODY[1.2.MIME] BODY[]<0.10> ENVELOPE)"),
            _crlf("i1 CAPABILITY", "i2 NOOP", "i3 NAMESPACE", "i4 SUBSCRIBE INBOX"),
            b"j1 LOGIN {16}\r\n" + USER.encode() + b" {7}\r\n" + PASSWORD.encode() + b"\r\n",
            _crlf("k1 SELECT INBOX", "k2 COPY 1:2 INBOX", "k3 UID SEARCH NOT DELETED"),
            _crlf("l1 AUTHENTICATE PLAIN", base64.b64encode(b"\0demo\0x").decode()),
            _crlf("m1 SELECT INBOX", "m2 IDLE", "DONE"),
        ),
        closing=_crlf("z9 LOGOUT"),
    )


def rtsp(host: str, port: int) -> Transcripts:
    """What ffmpeg/GStreamer send to play ``rtsp://host:port/clip`` (RFC 2326)."""
    url = f"rtsp://{host}:{port}/{MEDIA}"
    ua = "User-Agent: Lavf60.16.100"

    def req(method: str, target: str, cseq: int, *headers: str, body: bytes = b"") -> bytes:
        lines = [f"{method} {target} RTSP/1.0", f"CSeq: {cseq}", ua, *headers]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        return _crlf(*lines, "") + body

    return Transcripts(
        preamble=b"",
        bodies=(
            req("OPTIONS", url, 1),
            req("DESCRIBE", url, 2, "Accept: application/sdp"),
            req(
                "SETUP",
                url + "/track1",
                3,
                "Transport: RTP/AVP/UDP;unicast;client_port=40000-40001",
            )
            + req("PLAY", url, 4, "Session: 0000SESSION0000", "Range: npt=0.000-")
            + req("TEARDOWN", url, 5, "Session: 0000SESSION0000"),
            req("SETUP", url, 3, "Transport: RTP/AVP/TCP;unicast;interleaved=0-1")
            + req("PLAY", url, 4, "Session: 0000SESSION0000", "Range: npt=2.5-4")
            + b"$\x01\x00\x08\x81\xc9\x00\x01\x00\x00\x00\x01"[:12]
            + req("PAUSE", url, 5, "Session: 0000SESSION0000"),
            req("GET_PARAMETER", url, 6, "Session: 0000SESSION0000"),
            req("PLAY", url, 2, "Session: 0000SESSION0000", "Range: npt=1-", "Scale: 1.0")
            + req("PAUSE", url, 3, "Session: 0000SESSION0000")
            + req("PLAY", url, 4, "Session: 0000SESSION0000")
            + req("TEARDOWN", url, 5, "Session: 0000SESSION0000"),
            req("SET_PARAMETER", url, 7, "Content-Type: text/parameters", body=b"speed: 2\r\n"),
            req(
                "ANNOUNCE",
                url,
                8,
                "Content-Type: application/sdp",
                body=b"v=0\r\no=- 0 0 IN IP4 0\r\n",
            ),
            req("DESCRIBE", f"rtsp://{host}:{port}/../../etc/passwd", 9),
            req("OPTIONS", "*", 10, "Require: implicit-play"),
        ),
    )


def admin(host: str, port: int) -> Transcripts:
    """What urllib and curl send to the admin API (no token: the fuzzer is an outsider)."""
    h = f"Host: {host}:{port}"
    body = b'{"address": "x@example.org", "password": "p", "replicas": 2}'
    return Transcripts(
        preamble=b"",
        bodies=(
            _crlf(
                "GET /api/status HTTP/1.1",
                h,
                "Accept: application/json",
                "Connection: keep-alive",
                "",
            ),
            _crlf("GET /api/mail/users HTTP/1.1", h, ""),
            _crlf(
                "POST /api/mail/users HTTP/1.1",
                h,
                "Content-Type: application/json",
                f"Content-Length: {len(body)}",
                "",
            )
            + body,
            _crlf(
                "POST /api/mail/users/delete HTTP/1.1",
                h,
                "Authorization: Bearer 00ff",
                "Transfer-Encoding: chunked",
                "",
            )
            + b"%x\r\n" % len(body)
            + body
            + b"\r\n0\r\n\r\n",
            _crlf("HEAD / HTTP/1.0", ""),
            _crlf("GET /api/status?x=1&x=2 HTTP/1.1", h, "Expect: 100-continue", ""),
            _crlf("DELETE /api/yima/media/x HTTP/1.1", h, "Content-Length: 0", ""),
            _crlf("GET http://evil/api/status HTTP/1.1", "Host: evil", "Cookie: a=b", ""),
        ),
    )


FOREIGN_KEY = b"\x5a" * 32  # a cluster the target does not belong to
#: The mail nodes' cluster: the default name (their kind) and kind.
SCOPE = wire.Scope("porcupine", "porcupine")
SCOPE_ARGS = {"cluster": b"porcupine", "kind": b"porcupine"}


def _member(i: int) -> wire.Member:
    return wire.Member(f"fuzz{i}", f"127.0.107.{200 + i}:9", i)


def datagram_bodies() -> list[wire.Body]:
    """One body of each membership datagram type."""
    members = (_member(1), _member(2))
    return [
        wire.Probe(7, members),
        wire.NewGroup(8),
        wire.Reply(9, "fuzz1", 7, members),
        wire.Commit(10, members, b"attachment"),
        wire.Ping(7, 42),
        wire.Ack(7, 42, True),
        wire.TimeReq(1.5),
        wire.TimeResp(1.5, 2.5, 3.5),
    ]


def datagrams(key: bytes = FOREIGN_KEY) -> tuple[bytes, ...]:
    """Well-formed membership datagrams MACed with ``key``."""
    out = []
    for i, body in enumerate(datagram_bodies()):
        header = wire.Header("fuzz1", "127.0.107.201:9", 1, i + 1, i)
        out.append(wire.serialize(key, SCOPE, header, body))
    return tuple(out)


def amp_box(command: bytes, ask: int, **values: bytes) -> bytes:
    """One AMP box: ``_command``, ``_ask`` and ``values``."""
    box = amp.AmpBox(
        {
            b"_command": command,
            b"_ask": str(ask).encode(),
            **{k.encode(): v for k, v in values.items()},
        }
    )
    return bytes(box.serialize())


def amp_boxes() -> Transcripts:
    """AMP boxes a cluster peer sends: the handshake, Echo (with BigBytes chunks), others."""
    nonce = bytes(range(32))  # fixed, so a seed reproduces a run's inputs exactly
    return Transcripts(
        preamble=b"",
        bodies=(
            amp_box(Hello.commandName, 1, node_id=b"m9", nonce=nonce, **SCOPE_ARGS),
            amp_box(Hello.commandName, 1, node_id=b"m9", nonce=nonce, **SCOPE_ARGS)
            + amp_box(Prove.commandName, 2, proof=b"\0" * 32),
            amp_box(Echo.commandName, 3, payload=b"x" * 100),
            amp_box(
                Echo.commandName,
                4,
                **{"payload": b"a" * 64, "payload.n": b"3", "payload.1": b"b", "payload.2": b"c"},
            ),
            amp_box(b"yimaporc.unknown", 5, arg=b"1"),
            bytes(amp.AmpBox({b"_answer": b"1", b"node_id": b"x"}).serialize()),
            bytes(
                amp.AmpBox(
                    {b"_error": b"1", b"_error_code": b"AUTH_FAILED", b"_error_description": b"no"}
                ).serialize()
            ),
        ),
    )


def stream_transcripts(door: str, host: str, port: int) -> Transcripts:
    """The seeds of stream door ``door`` served at ``host:port``."""
    if door == "smtp":
        return smtp()
    if door == "pop3":
        return pop3()
    if door == "imap":
        return imap()
    if door == "rtsp":
        return rtsp(host, port)
    if door == "admin":
        return admin(host, port)
    if door == "cluster-amp":
        return amp_boxes()
    raise ValueError(f"no stream transcripts for {door!r}")
