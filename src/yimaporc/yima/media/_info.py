"""What every node knows about a stored file, and how files are cut into blocks (pure).

:class:`MediaInfo` is small (one time-index entry per block) and JSON-ready;
it travels with the file's seed to every node.  :class:`Analyser` is a sans-IO
scanner: feed it the file's bytes in any chunks, then ``finish()``.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from ._ts import (
    PCR_HZ,
    PCR_WRAP,
    RTP_PAYLOAD,
    TS_PACKET,
    MalformedMedia,
    TsScanner,
    interpolate,
    looks_like_ts,
    packet_pcr,
    unwrap_near,
)
from ._wav import MAX_HEADER, WavFormat, looks_like_wav, parse_wav

KIND_TS = "mpeg-ts"
KIND_WAV = "wav"
KIND_OPAQUE = "opaque"
KINDS = (KIND_TS, KIND_WAV, KIND_OPAQUE)
# 256 RTP payloads of 7 TS packets: 336,896 bytes.
DEFAULT_TS_BLOCK = 256 * RTP_PAYLOAD
DEFAULT_BLOCK = 256 * 1024
MAX_BLOCK = 64 << 20
OPAQUE_REASON = "not MPEG-TS or WAV"
OPAQUE_MESSAGE = f"{OPAQUE_REASON}: stored as opaque blocks, cannot be streamed"
_NOT_STREAMABLE = "; stored but cannot be streamed"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


def check_name(name: str) -> str:
    """``name`` if it is a valid media name (also a safe directory name)."""
    if not _NAME.match(name):
        raise ValueError(
            f"bad media name {name!r}: 1-128 of A-Z a-z 0-9 . _ -, not starting with . _ -"
        )
    return name


def block_size_for(kind: str, requested: int | None = None) -> int:
    """The block size used for ``kind``; MPEG-TS rounds to whole 1316-byte RTP payloads."""
    if kind == KIND_TS:
        if requested is None:
            return DEFAULT_TS_BLOCK
        size = max(1, round(requested / RTP_PAYLOAD)) * RTP_PAYLOAD
    else:
        size = DEFAULT_BLOCK if requested is None else requested
    if not 1 <= size <= MAX_BLOCK:
        raise ValueError(f"block size must be between 1 and {MAX_BLOCK} bytes")
    return size


def _int_tuple(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _wav_from_json(obj: Mapping[str, int | str] | None) -> WavFormat | None:
    return None if obj is None else WavFormat(**obj)  # type: ignore[arg-type]


@attrs.frozen
class MediaInfo:
    """A stored file: size, blocks, seed, timing, parity group size."""

    name: str = attrs.field(validator=lambda _i, _a, v: check_name(v))
    kind: str = attrs.field(validator=attrs.validators.in_(KINDS))
    size: int
    block_size: int
    seed: int
    parity_group: int = 0
    # Placement rule version (yima/parity.py): 2 = sticky; metadata without it is 1.
    placement: int = attrs.field(default=2, validator=attrs.validators.in_((1, 2)))
    streamable: bool = False
    message: str = ""
    duration: float | None = None
    bitrate: float | None = None
    # Media time (microseconds) of the first byte of each block.
    block_times: tuple[int, ...] = attrs.field(default=(), converter=_int_tuple)
    pcr_pid: int | None = None
    # Raw PCR value (27 MHz, modulo 2**33*300) of media time 0, i.e. byte 0.
    pcr_origin: int | None = None
    wav: WavFormat | None = None
    # Digest of the time index (:func:`index_digest`): the catalog record carries this,
    # the index itself is stored per file beside the data (yima/timeindex.py).
    index_digest: str = ""

    @property
    def blocks(self) -> int:
        """Number of data blocks."""
        return -(-self.size // self.block_size)

    def block_length(self, index: int) -> int:
        """Size of block ``index`` (the last one may be short)."""
        if not 0 <= index < self.blocks:
            raise IndexError(f"block {index} out of range 0..{self.blocks - 1}")
        return min(self.block_size, self.size - index * self.block_size)

    def block_end_time(self, index: int) -> float:
        """Media time (s) where block ``index`` ends."""
        if index + 1 < len(self.block_times):
            return self.block_times[index + 1] / 1e6
        return self.duration or 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (``blocks`` included for readers; ignored on input)."""
        out = attrs.asdict(self, recurse=True)
        out["block_times"] = list(self.block_times)
        out["blocks"] = self.blocks
        return out

    def to_record(self) -> dict[str, Any]:
        """The replicated catalog record: :meth:`to_json` without the time index, which
        is named by its digest instead."""
        out = self.to_json()
        del out["block_times"]
        if self.block_times and not self.index_digest:
            out["index_digest"] = index_digest(self.block_times)
        return out

    def bare(self) -> MediaInfo:
        """This entry as its catalog record holds it: no time index, its digest set."""
        if not self.block_times:
            return self
        return attrs.evolve(self, block_times=(), index_digest=self.digest())

    def digest(self) -> str:
        """The time index's digest (the stored one, or computed from the index)."""
        if self.block_times:
            return index_digest(self.block_times)
        return self.index_digest

    def with_index(self, times: tuple[int, ...]) -> MediaInfo:
        """This entry with its time index attached (``times`` must match the digest)."""
        if index_digest(times) != self.index_digest:
            raise ValueError(f"time index of {self.name} does not match its digest")
        return attrs.evolve(self, block_times=times)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> MediaInfo:
        """Inverse of :meth:`to_json`; raises ValueError on bad input."""
        fields = {f.name for f in attrs.fields(cls)}
        data = {k: v for k, v in obj.items() if k != "blocks"}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown media field(s): {', '.join(sorted(unknown))}")
        data.setdefault("placement", 1)
        try:
            data["wav"] = _wav_from_json(data.get("wav"))
            return cls(**data)
        except TypeError as e:
            raise ValueError(f"malformed media info: {e}") from e


_INDEX_ENTRY = struct.Struct("<q")


def pack_index(times: Iterable[int]) -> bytes:
    """A time index as stored on disk and sent between nodes: little-endian int64s."""
    values = tuple(times)
    return struct.pack(f"<{len(values)}q", *values)


def unpack_index(data: bytes) -> tuple[int, ...]:
    """Inverse of :func:`pack_index` (ValueError on a length that is not whole entries)."""
    if len(data) % _INDEX_ENTRY.size:
        raise ValueError(f"time index of {len(data)} bytes is not whole entries")
    return struct.unpack(f"<{len(data) // _INDEX_ENTRY.size}q", data)


def index_digest(times: Iterable[int]) -> str:
    """SHA-256 (hex) of the packed time index; empty for no index."""
    data = pack_index(times)
    return hashlib.sha256(data).hexdigest() if data else ""


class Analyser:
    """Sans-IO ingest scanner: ``feed()`` the file in order, then ``finish()``."""

    def __init__(
        self, name: str, seed: int, block_size: int | None = None, parity_group: int = 0
    ) -> None:
        self.name = check_name(name)
        self.seed = seed
        self.requested = block_size
        self.parity_group = parity_group
        self.size = 0
        self._head = bytearray()
        self._kind: str | None = None
        self._ts = TsScanner()
        self._problem = ""

    def feed(self, data: bytes) -> None:
        """Scan the next bytes of the file."""
        self.size += len(data)
        if self._kind is None:
            self._head += data
            if len(self._head) >= 3 * TS_PACKET:
                self._decide(bytes(self._head))
            return
        self._route(data)

    def _decide(self, head: bytes) -> None:
        if looks_like_ts(head):
            self._kind = KIND_TS
        elif looks_like_wav(head):
            self._kind = KIND_WAV
        else:
            self._kind = KIND_OPAQUE
        self._head = bytearray()
        self._route(head)

    def _route(self, data: bytes) -> None:
        if self._kind == KIND_TS and not self._problem:
            try:
                self._ts.feed(data)
            except MalformedMedia as e:
                self._problem = str(e)
        elif self._kind == KIND_WAV and len(self._head) < MAX_HEADER:
            self._head += data[: MAX_HEADER - len(self._head)]

    def finish(self) -> MediaInfo:
        """The file's :class:`MediaInfo`."""
        if self._kind is None:
            self._decide(bytes(self._head))
        kind = self._kind or KIND_OPAQUE
        base = MediaInfo(
            self.name,
            kind,
            self.size,
            block_size_for(kind, self.requested),
            self.seed,
            self.parity_group,
        )
        if kind == KIND_TS:
            return self._finish_ts(base)
        if kind == KIND_WAV:
            return self._finish_wav(base)
        return attrs.evolve(base, message=OPAQUE_MESSAGE)

    def _not_streamable(self, base: MediaInfo, why: str) -> MediaInfo:
        return attrs.evolve(base, message=f"{why}{_NOT_STREAMABLE}")

    def _finish_ts(self, base: MediaInfo) -> MediaInfo:
        if self._problem:
            return self._not_streamable(base, self._problem)
        try:
            tmap = self._ts.finish()
        except MalformedMedia as e:
            return self._not_streamable(base, str(e))
        duration = tmap.duration
        if duration <= 0:
            return self._not_streamable(base, "MPEG-TS PCRs do not advance")
        origin = round(tmap.ticks_at(0)) % PCR_WRAP
        bs = base.block_size
        times = tuple(round(tmap.time_at(i * bs) * 1e6) for i in range(base.blocks))
        return attrs.evolve(
            base,
            streamable=True,
            duration=duration,
            bitrate=self.size * 8 / duration,
            block_times=times,
            pcr_pid=self._ts.pcr_pid,
            pcr_origin=origin,
        )

    def _finish_wav(self, base: MediaInfo) -> MediaInfo:
        try:
            fmt = parse_wav(bytes(self._head), self.size)
        except MalformedMedia as e:
            return self._not_streamable(base, str(e))
        if fmt.data_size == 0:
            return self._not_streamable(base, "WAV has no samples")
        if fmt.data_offset % fmt.frame_size:
            return self._not_streamable(base, "WAV samples are not aligned to whole frames")
        # Blocks hold whole sample frames, so every RTP packet does too.
        bs = max(fmt.frame_size, base.block_size - base.block_size % fmt.frame_size)
        base = attrs.evolve(base, block_size=bs)
        times = tuple(
            round(max(0, i * bs - fmt.data_offset) / fmt.byte_rate * 1e6)
            for i in range(base.blocks)
        )
        return attrs.evolve(
            base,
            streamable=True,
            duration=fmt.duration,
            bitrate=fmt.byte_rate * 8.0,
            block_times=times,
            wav=fmt,
        )


def unstreamable_reason(info: MediaInfo) -> str:
    """Why ``info``'s file cannot be streamed, without the "stored" part."""
    if info.kind == KIND_OPAQUE:
        return OPAQUE_REASON
    return info.message.removesuffix(_NOT_STREAMABLE)


def analyse_bytes(
    name: str, data: bytes, seed: int, block_size: int | None = None, parity_group: int = 0
) -> MediaInfo:
    """:class:`MediaInfo` of a file held in memory."""
    a = Analyser(name, seed, block_size, parity_group)
    a.feed(data)
    return a.finish()


def analyse_file(
    path: str | Path,
    name: str,
    seed: int,
    block_size: int | None = None,
    parity_group: int = 0,
    chunk: int = 1 << 20,
) -> MediaInfo:
    """:class:`MediaInfo` of a file on disk (blocking: run it in a thread)."""
    a = Analyser(name, seed, block_size, parity_group)
    with open(path, "rb") as f:
        while data := f.read(chunk):
            a.feed(data)
    return a.finish()


def cut_blocks(data: bytes, block_size: int) -> list[bytes]:
    """``data`` cut into blocks of ``block_size`` (the last may be short)."""
    return [data[i : i + block_size] for i in range(0, len(data), block_size)]


def read_blocks(path: str | Path, block_size: int) -> Iterator[bytes]:
    """The blocks of a file on disk, in order (blocking)."""
    with open(path, "rb") as f:
        while data := f.read(block_size):
            yield data


def reassemble(blocks: Iterable[bytes]) -> bytes:
    """The file whose blocks these are."""
    return b"".join(blocks)


def payload_times(info: MediaInfo, index: int, block: bytes) -> list[float]:
    """Media time (s) to send each 1316-byte RTP payload of MPEG-TS block ``index``.

    Uses only the block's own PCRs plus the block start/end times from the
    time index, so a node paces its blocks VBR-correctly without the others.
    """
    if info.kind != KIND_TS or not info.streamable or info.pcr_origin is None:
        raise MalformedMedia(f"{info.name} is not a streamable MPEG-TS file")
    if len(block) != info.block_length(index):
        raise MalformedMedia(
            f"block {index} has {len(block)} bytes, expected {info.block_length(index)}"
        )
    t0 = info.block_times[index] / 1e6
    t1 = info.block_end_time(index)
    points: list[tuple[float, float]] = [(0.0, t0)]
    near = t0 * PCR_HZ
    for at in range(0, len(block) - TS_PACKET + 1, TS_PACKET):
        found = packet_pcr(block, at)
        if found is None or found[0] != info.pcr_pid:
            continue
        t = unwrap_near(found[1], info.pcr_origin, near) / PCR_HZ
        if points[-1][1] <= t <= t1:
            points.append((at + 10.0, t))
    points.append((float(len(block)), t1))
    return [interpolate(points, float(j)) for j in range(0, len(block), RTP_PAYLOAD)]
