"""RTSP 1.0 (RFC 2326) header values on the wire: pure parse/serialize.

``Transport`` (with the Yima fan-out opt-in), ``Range: npt=``, ``Session``,
``RTP-Info`` and ``rtsp://`` URLs.  The messages that carry them: :mod:`._messages`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs

from ._errors import LocalProtocolError, MalformedHeader
from ._messages import _TOKEN, DEFAULT_PORT

# --- header values ----------------------------------------------------------------------


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if quoted:
        raise MalformedHeader("unterminated quoted string")
    parts.append("".join(cur))
    return parts


def _port_pair(value: str, what: str) -> tuple[int, int]:
    lo, sep, hi = value.partition("-")
    try:
        a = int(lo)
        b = int(hi) if sep else a + 1
    except ValueError:
        raise MalformedHeader(f"bad {what} {value!r}") from None
    limit = 255 if what == "interleaved" else 65535
    if not (0 <= a <= limit and 0 <= b <= limit):
        raise MalformedHeader(f"{what} out of range: {value!r}")
    return (a, b)


@attrs.frozen
class YimaNode:
    """One node of a Yima fan-out: index, and the address it sends from / takes RTCP at."""

    index: int
    host: str
    rtp_port: int
    rtcp_port: int

    def serialize(self) -> str:
        """``index@host:rtp-rtcp`` (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.index}@{host}:{self.rtp_port}-{self.rtcp_port}"

    @classmethod
    def parse(cls, text: str) -> YimaNode:
        """Parse ``index@host:rtp-rtcp``."""
        m = re.match(r"^(\d{1,3})@(\[[0-9A-Fa-f:.]+\]|[^:\[\]\s]+):(\d{1,5})-(\d{1,5})$", text)
        if m is None:
            raise MalformedHeader(f"bad Yima node {text!r}")
        index, host, rtp, rtcp = (
            int(m.group(1)),
            m.group(2).strip("[]"),
            int(m.group(3)),
            int(m.group(4)),
        )
        if index > 255 or rtp > 65535 or rtcp > 65535:
            raise MalformedHeader(f"Yima node out of range: {text!r}")
        return cls(index, host, rtp, rtcp)


@attrs.frozen
class TransportSpec:
    """One alternative of a Transport header (RFC 2326 §12.39), plus the Yima opt-in.

    ``yima_fanout`` is the ``x-yima-fanout`` flag: in a request the client
    accepts RTP straight from every node; echoed in the reply it is granted and
    ``yima_nodes`` (``x-yima-nodes``) lists each node's index and addresses.
    ``params`` keeps parameters this module does not interpret, in order.
    """

    profile: str = "RTP/AVP"
    lower: str = "UDP"
    unicast: bool = True
    client_port: tuple[int, int] | None = None
    server_port: tuple[int, int] | None = None
    interleaved: tuple[int, int] | None = None
    destination: str | None = None
    source: str | None = None
    ssrc: int | None = None
    mode: str | None = None
    ttl: int | None = None
    yima_fanout: bool = False
    yima_nodes: tuple[YimaNode, ...] = ()
    params: tuple[tuple[str, str | None], ...] = ()

    @property
    def is_tcp(self) -> bool:
        """True for RTP over the RTSP connection (``RTP/AVP/TCP``)."""
        return self.lower == "TCP"


def _parse_transport_one(text: str) -> TransportSpec:
    items = [p.strip() for p in _split_outside_quotes(text.strip(), ";")]
    spec = items[0].upper()
    parts = spec.split("/")
    if len(parts) not in (2, 3) or not all(parts) or not _TOKEN.match(spec.replace("/", "")):
        raise MalformedHeader(f"bad transport spec {items[0]!r}")
    lower = parts[2] if len(parts) == 3 else "UDP"
    values: dict[str, object] = {"profile": "/".join(parts[:2]), "lower": lower}
    extra: list[tuple[str, str | None]] = []
    for item in items[1:]:
        if not item:
            continue
        name, sep, raw = item.partition("=")
        key = name.strip().lower()
        value = raw.strip()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = value[1:-1]
        if key in ("unicast", "multicast"):
            values["unicast"] = key == "unicast"
        elif key in ("client_port", "server_port", "interleaved"):
            values[key] = _port_pair(value, key)
        elif key in ("destination", "source"):
            values[key] = value or None
        elif key == "ssrc":
            if not re.match(r"^[0-9A-Fa-f]{1,8}$", value):
                raise MalformedHeader(f"bad ssrc {value!r}")
            values["ssrc"] = int(value, 16)
        elif key == "mode":
            values["mode"] = value.lower()
        elif key == "ttl":
            if not (value.isascii() and value.isdigit()):
                raise MalformedHeader(f"bad ttl {value!r}")
            values["ttl"] = int(value)
        elif key == "x-yima-fanout":
            values["yima_fanout"] = value in ("", "1")
        elif key == "x-yima-nodes":
            values["yima_nodes"] = tuple(YimaNode.parse(t) for t in value.split())
        else:
            if not _TOKEN.match(name.strip()):
                raise MalformedHeader(f"bad transport parameter {name!r}")
            extra.append((name.strip(), raw.strip() if sep else None))
    values["params"] = tuple(extra)
    return TransportSpec(**values)  # type: ignore[arg-type]


def parse_transport(value: str) -> tuple[TransportSpec, ...]:
    """All alternatives of a Transport header, in the client's order of preference."""
    specs = tuple(_parse_transport_one(p) for p in _split_outside_quotes(value, ",") if p.strip())
    if not specs:
        raise MalformedHeader("empty Transport header")
    return specs


def serialize_transport(specs: TransportSpec | Iterable[TransportSpec]) -> str:
    """A Transport header value from one or more alternatives."""
    if isinstance(specs, TransportSpec):
        specs = (specs,)
    out = []
    for s in specs:
        head = s.profile if s.lower == "UDP" and s.interleaved is None else f"{s.profile}/{s.lower}"
        items = [head, "unicast" if s.unicast else "multicast"]
        if s.destination is not None:
            items.append(f"destination={s.destination}")
        if s.source is not None:
            items.append(f"source={s.source}")
        for key in ("interleaved", "client_port", "server_port"):
            pair = getattr(s, key)
            if pair is not None:
                items.append(f"{key}={pair[0]}-{pair[1]}")
        if s.ttl is not None:
            items.append(f"ttl={s.ttl}")
        if s.ssrc is not None:
            items.append(f"ssrc={s.ssrc:08X}")
        if s.mode is not None:
            items.append(f'mode="{s.mode.upper()}"')
        if s.yima_fanout:
            items.append("x-yima-fanout")
        if s.yima_nodes:
            items.append(f'x-yima-nodes="{" ".join(n.serialize() for n in s.yima_nodes)}"')
        for name, value in s.params:
            items.append(name if value is None else f"{name}={value}")
        text = ";".join(items)
        if any(ch in text for ch in "\r\n,"):
            raise LocalProtocolError(f"bad transport parameter in {text!r}")
        out.append(text)
    return ",".join(out)


@attrs.frozen
class NptRange:
    """A ``Range: npt=`` value; ``start`` None means ``now``, ``end`` None open-ended."""

    start: float | None = 0.0
    end: float | None = None


def _parse_npt_time(text: str) -> float:
    text = text.strip()
    if ":" in text:
        m = re.match(r"^(\d+):([0-5]?\d):([0-5]?\d(?:\.\d*)?)$", text)
        if m is None:
            raise MalformedHeader(f"bad npt time {text!r}")
        return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    if not re.match(r"^\d+(?:\.\d*)?$", text):
        raise MalformedHeader(f"bad npt time {text!r}")
    return float(text)


def format_npt_time(seconds: float) -> str:
    """An npt time with at most 3 decimals."""
    text = f"{seconds:.3f}".rstrip("0").rstrip(".")
    return text or "0"


def parse_range(value: str) -> NptRange:
    """A Range header in npt units (``npt=10-``, ``npt=now-``, ``npt=0-12.5``, ``npt=-5``)."""
    text = value.split(";", 1)[0].strip()
    unit, sep, spec = text.partition("=")
    if not sep or unit.strip().lower() != "npt":
        raise MalformedHeader(f"unsupported range {value!r}")
    first, dash, last = spec.partition("-")
    if not dash:
        raise MalformedHeader(f"bad npt range {value!r}")
    first, last = first.strip(), last.strip()
    if not first and not last:
        raise MalformedHeader(f"empty npt range {value!r}")
    start: float | None
    if first.lower() == "now":
        start = None
    elif first:
        start = _parse_npt_time(first)
    else:
        start = 0.0
    end = _parse_npt_time(last) if last else None
    if start is not None and end is not None and end < start:
        raise MalformedHeader(f"npt range ends before it starts: {value!r}")
    return NptRange(start, end)


def serialize_range(rng: NptRange) -> str:
    """A Range header value in npt units."""
    start = "now" if rng.start is None else format_npt_time(rng.start)
    end = "" if rng.end is None else format_npt_time(rng.end)
    return f"npt={start}-{end}"


_SESSION_ID = re.compile(r"^[A-Za-z0-9$\-_.+]{1,64}$")


@attrs.frozen
class SessionHeader:
    """A Session header: identifier and optional timeout in seconds."""

    session_id: str
    timeout: int | None = None


def parse_session(value: str) -> SessionHeader:
    """Parse ``id[;timeout=N]``."""
    first, *rest = value.split(";")
    sid = first.strip()
    if not _SESSION_ID.match(sid):
        raise MalformedHeader(f"bad session id {sid!r}")
    timeout = None
    for item in rest:
        name, _, val = item.partition("=")
        if name.strip().lower() == "timeout":
            if not (val.strip().isascii() and val.strip().isdigit()):
                raise MalformedHeader(f"bad session timeout {val!r}")
            timeout = int(val.strip())
    return SessionHeader(sid, timeout)


def serialize_session(header: SessionHeader) -> str:
    """``id`` or ``id;timeout=N``."""
    if not _SESSION_ID.match(header.session_id):
        raise LocalProtocolError(f"bad session id {header.session_id!r}")
    if header.timeout is None:
        return header.session_id
    return f"{header.session_id};timeout={header.timeout}"


@attrs.frozen
class RtpInfo:
    """One stream of an RTP-Info header (RFC 2326 §12.33)."""

    url: str
    seq: int | None = None
    rtptime: int | None = None


def serialize_rtp_info(infos: Iterable[RtpInfo]) -> str:
    """An RTP-Info header value."""
    out = []
    for info in infos:
        if any(ch in info.url for ch in ",; \r\n"):
            raise LocalProtocolError(f"RTP-Info URL cannot hold {info.url!r}")
        item = f"url={info.url}"
        if info.seq is not None:
            item += f";seq={info.seq}"
        if info.rtptime is not None:
            item += f";rtptime={info.rtptime}"
        out.append(item)
    return ",".join(out)


def parse_rtp_info(value: str) -> tuple[RtpInfo, ...]:
    """Parse an RTP-Info header value (a comma inside a URL is tolerated)."""
    groups: list[str] = []
    for part in value.split(","):
        if part.strip().lower().startswith("url=") or not groups:
            groups.append(part.strip())
        else:
            groups[-1] += "," + part
    out: list[RtpInfo] = []
    for group in groups:
        fields: dict[str, str] = {}
        for item in group.split(";"):
            name, _, val = item.partition("=")
            fields[name.strip().lower()] = val.strip()
        if not fields.get("url"):
            raise MalformedHeader(f"RTP-Info entry without url: {group!r}")
        try:
            seq = int(fields["seq"]) if fields.get("seq") else None
            rtptime = int(fields["rtptime"]) if fields.get("rtptime") else None
        except ValueError:
            raise MalformedHeader(f"bad RTP-Info entry {group!r}") from None
        out.append(RtpInfo(fields["url"], seq, rtptime))
    return tuple(out)


@attrs.frozen
class RtspUrl:
    """The parts of an ``rtsp://host[:port]/path`` URL."""

    host: str
    port: int
    path: str


def parse_url(url: str) -> RtspUrl:
    """Split an rtsp:// URL; raises :class:`MalformedHeader`."""
    m = re.match(
        r"^rtsp://(\[[0-9A-Fa-f:.]+\]|[^/:\[\]?#\s]+)(?::(\d{1,5}))?(/[^\s]*)?$", url, re.I
    )
    if m is None:
        raise MalformedHeader(f"not an rtsp:// URL: {url!r}")
    port = int(m.group(2)) if m.group(2) else DEFAULT_PORT
    if port > 65535:
        raise MalformedHeader(f"port out of range in {url!r}")
    return RtspUrl(m.group(1).strip("[]"), port, m.group(3) or "/")
