"""SDP (RFC 4566) for Yima presentations: generation, and a tolerant parser for players.

A presentation is one session description with aggregate control
(``a=control:*`` and ``a=range:npt=0-D`` at session level) and one media
section per track, each with its own ``a=control:`` relative to the
Content-Base the RTSP server sends (which ends with ``/``)::

    m=video 0 RTP/AVP 33          MPEG-TS in RFC 2250 packets
    a=rtpmap:33 MP2T/90000
    m=audio 0 RTP/AVP 96          L16 (RFC 3551), static PT 10/11 at 44.1 kHz
    a=rtpmap:96 L16/48000/2

The parser keeps every line it understands, skips the rest, accepts LF or
CRLF, and raises :class:`MalformedSdp` only when there is nothing usable.
"""

from __future__ import annotations

import attrs

from ..rtp.payloads import MP2T_CLOCK, PT_MP2T, l16_payload_type

MAX_SDP_SIZE = 64 * 1024


class MalformedSdp(ValueError):
    """The text is not a usable session description."""


@attrs.frozen
class RtpMap:
    """An ``a=rtpmap`` entry: payload type, encoding name, clock rate, channels."""

    payload_type: int
    encoding: str
    clock_rate: int
    channels: int | None = None

    def serialize(self) -> str:
        """The attribute value, e.g. ``96 L16/48000/2``."""
        tail = f"/{self.channels}" if self.channels is not None else ""
        return f"{self.payload_type} {self.encoding}/{self.clock_rate}{tail}"


Attribute = tuple[str, str | None]


def _attr(attributes: tuple[Attribute, ...], name: str) -> str | None:
    for key, value in attributes:
        if key == name:
            return value if value is not None else ""
    return None


@attrs.frozen
class MediaDescription:
    """One ``m=`` section."""

    media: str
    port: int
    proto: str
    formats: tuple[str, ...]
    attributes: tuple[Attribute, ...] = ()
    connection: str | None = None
    bandwidth: tuple[str, ...] = ()
    information: str | None = None

    def attribute(self, name: str) -> str | None:
        """The first value of attribute ``name`` (``""`` for a flag), or None."""
        return _attr(self.attributes, name)

    @property
    def control(self) -> str | None:
        """The ``a=control:`` of this medium."""
        return self.attribute("control")

    @property
    def rtpmaps(self) -> dict[int, RtpMap]:
        """``a=rtpmap`` entries by payload type, with the static types of RFC 3551 filled in."""
        out: dict[int, RtpMap] = {}
        for fmt in self.formats:
            if fmt == str(PT_MP2T):
                out[PT_MP2T] = RtpMap(PT_MP2T, "MP2T", MP2T_CLOCK)
            elif fmt in ("10", "11"):
                out[int(fmt)] = RtpMap(int(fmt), "L16", 44_100, 2 if fmt == "10" else 1)
        for key, value in self.attributes:
            if key == "rtpmap" and value:
                parsed = parse_rtpmap(value)
                if parsed is not None:
                    out[parsed.payload_type] = parsed
        return out


@attrs.frozen
class Origin:
    """The ``o=`` line."""

    username: str = "-"
    session_id: str = "0"
    session_version: str = "0"
    nettype: str = "IN"
    addrtype: str = "IP4"
    address: str = "127.0.0.1"


@attrs.frozen
class SessionDescription:
    """A whole session description."""

    origin: Origin = Origin()
    name: str = "-"
    connection: str | None = None
    timing: str = "0 0"
    attributes: tuple[Attribute, ...] = ()
    media: tuple[MediaDescription, ...] = ()
    information: str | None = None
    bandwidth: tuple[str, ...] = ()
    version: int = 0

    def attribute(self, name: str) -> str | None:
        """The first session-level value of attribute ``name`` (``""`` for a flag), or None."""
        return _attr(self.attributes, name)

    @property
    def control(self) -> str | None:
        """The session-level (aggregate) ``a=control:``."""
        return self.attribute("control")

    @property
    def duration(self) -> float | None:
        """The end of the session-level ``a=range:npt=S-E``, if finite."""
        value = self.attribute("range")
        if not value or not value.startswith("npt="):
            return None
        _, _, end = value[4:].partition("-")
        try:
            return _npt_seconds(end) if end.strip() else None
        except ValueError:
            return None


def _npt_seconds(text: str) -> float:
    text = text.strip()
    if ":" in text:
        h, m, s = text.split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)
    return float(text)


def parse_rtpmap(value: str) -> RtpMap | None:
    """Parse an ``a=rtpmap`` value, or None if it is not understood."""
    try:
        pt_text, _, rest = value.strip().partition(" ")
        parts = rest.strip().split("/")
        channels = int(parts[2]) if len(parts) > 2 and parts[2] else None
        return RtpMap(int(pt_text), parts[0], int(parts[1]), channels)
    except (ValueError, IndexError):
        return None


def _split_attribute(value: str) -> Attribute:
    key, sep, rest = value.partition(":")
    return (key.strip(), rest.strip() if sep else None)


@attrs.define
class _Section:
    """A section being parsed (session level, or one m= section)."""

    attributes: list[Attribute] = attrs.field(factory=list)
    bandwidth: list[str] = attrs.field(factory=list)
    connection: str | None = None
    information: str | None = None
    media: tuple[str, int, str, tuple[str, ...]] = ("", 0, "", ())

    def finish(self) -> MediaDescription:
        """The media description built from this section."""
        kind, port, proto, formats = self.media
        return MediaDescription(
            kind,
            port,
            proto,
            formats,
            tuple(self.attributes),
            self.connection,
            tuple(self.bandwidth),
            self.information,
        )


def parse_sdp(data: bytes | str) -> SessionDescription:
    """Parse a session description tolerantly; raises :class:`MalformedSdp` if unusable."""
    if isinstance(data, bytes):
        if len(data) > MAX_SDP_SIZE:
            raise MalformedSdp("session description too large")
        text = data.decode("utf-8", "replace")
    else:
        if len(data) > MAX_SDP_SIZE:
            raise MalformedSdp("session description too large")
        text = data
    session = _Section()
    media: list[_Section] = []
    version: int | None = None
    origin = Origin()
    name = "-"
    timing = "0 0"
    for raw in text.splitlines():
        line = raw.strip()
        if len(line) < 2 or line[1] != "=":
            continue
        kind, value = line[0], line[2:]
        if kind == "v":
            version = int(value) if value.isdigit() else 0
        elif kind == "m":
            parts = value.split()
            if len(parts) >= 3:
                port_text = parts[1].split("/")[0]
                port = int(port_text) if port_text.isdigit() else 0
                media.append(_Section(media=(parts[0], port, parts[2], tuple(parts[3:]))))
            continue
        target = media[-1] if media else session
        if kind == "a":
            target.attributes.append(_split_attribute(value))
        elif kind == "c":
            target.connection = value.strip()
        elif kind == "b":
            target.bandwidth.append(value.strip())
        elif kind == "i":
            target.information = value
        elif not media and kind == "s":
            name = value
        elif not media and kind == "t":
            timing = value.strip()
        elif not media and kind == "o":
            parts = value.split()
            if len(parts) == 6:
                origin = Origin(*parts)
    if version is None and not media:
        raise MalformedSdp("no v= line and no media")
    return SessionDescription(
        origin=origin,
        name=name,
        connection=session.connection,
        timing=timing,
        attributes=tuple(session.attributes),
        media=tuple(m.finish() for m in media),
        information=session.information,
        bandwidth=tuple(session.bandwidth),
        version=version or 0,
    )


def _attr_lines(attributes: tuple[Attribute, ...]) -> list[str]:
    return [f"a={k}" if v is None else f"a={k}:{v}" for k, v in attributes]


def serialize_sdp(desc: SessionDescription) -> bytes:
    """The CRLF-terminated text of ``desc`` (RFC 4566 line order)."""
    o = desc.origin
    lines = [
        f"v={desc.version}",
        f"o={o.username} {o.session_id} {o.session_version} {o.nettype} {o.addrtype} {o.address}",
        f"s={desc.name or '-'}",
    ]
    if desc.information is not None:
        lines.append(f"i={desc.information}")
    if desc.connection is not None:
        lines.append(f"c={desc.connection}")
    lines += [f"b={b}" for b in desc.bandwidth]
    lines.append(f"t={desc.timing}")
    lines += _attr_lines(desc.attributes)
    for m in desc.media:
        lines.append(f"m={m.media} {m.port} {m.proto} {' '.join(m.formats)}".rstrip())
        if m.information is not None:
            lines.append(f"i={m.information}")
        if m.connection is not None:
            lines.append(f"c={m.connection}")
        lines += [f"b={b}" for b in m.bandwidth]
        lines += _attr_lines(m.attributes)
    for line in lines:
        if "\r" in line or "\n" in line:
            raise ValueError(f"SDP line contains a line break: {line!r}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


# --- Yima presentations ------------------------------------------------------------------


def format_npt(seconds: float) -> str:
    """An npt time as RTSP and SDP write it: seconds with up to 3 decimals."""
    text = f"{seconds:.3f}".rstrip("0").rstrip(".")
    return text or "0"


def mp2t_track(control: str, *, bitrate_kbps: int | None = None) -> MediaDescription:
    """A media section for MPEG-TS (RFC 2250, PT 33, 90 kHz)."""
    return MediaDescription(
        media="video",
        port=0,
        proto="RTP/AVP",
        formats=(str(PT_MP2T),),
        attributes=(
            ("rtpmap", RtpMap(PT_MP2T, "MP2T", MP2T_CLOCK).serialize()),
            ("control", control),
        ),
        bandwidth=(f"AS:{bitrate_kbps}",) if bitrate_kbps else (),
    )


def l16_track(control: str, rate: int, channels: int, *, dynamic: int = 96) -> MediaDescription:
    """A media section for L16 audio; static PT 10/11 at 44.1 kHz, else ``dynamic``."""
    pt = l16_payload_type(rate, channels, dynamic)
    return MediaDescription(
        media="audio",
        port=0,
        proto="RTP/AVP",
        formats=(str(pt),),
        attributes=(
            ("rtpmap", RtpMap(pt, "L16", rate, channels).serialize()),
            ("control", control),
        ),
    )


def presentation_sdp(
    name: str,
    tracks: tuple[MediaDescription, ...] | list[MediaDescription],
    duration: float | None,
    *,
    origin_address: str = "127.0.0.1",
    session_id: int = 0,
    session_version: int = 1,
    extra_attributes: tuple[Attribute, ...] = (),
) -> SessionDescription:
    """The description of a presentation: aggregate control, its range and its tracks."""
    addrtype = "IP6" if ":" in origin_address else "IP4"
    rng = f"npt=0-{format_npt(duration)}" if duration is not None else "npt=0-"
    return SessionDescription(
        origin=Origin("-", str(session_id), str(session_version), "IN", addrtype, origin_address),
        name=name,
        connection=f"IN {addrtype} {'::' if addrtype == 'IP6' else '0.0.0.0'}",
        timing="0 0",
        attributes=(("tool", "yimaporc"), ("control", "*"), ("range", rng), *extra_attributes),
        media=tuple(tracks),
    )


def resolve_control(base: str, control: str | None) -> str:
    """The URL a control attribute names, relative to ``base`` (the Content-Base).

    ``*`` or no control is the base itself; an absolute ``rtsp://`` URL stays;
    a relative one is appended after a ``/`` (as ffmpeg and GStreamer do).
    """
    if control is None or control == "*":
        return base
    if "://" in control:
        return control
    if base.endswith("/"):
        return base + control
    return f"{base}/{control}"
