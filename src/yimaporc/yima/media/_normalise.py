"""What to store of an upload so that it streams (pure).

Files people have are rarely in the exact shape the block cutter needs:

- ffmpeg and sox write WAV chunks (``LIST``, ``fact``, ``bext``, extensible
  ``fmt``) before ``data``, so the samples start at an offset that is not a
  whole number of sample frames.  Blocks are cut at fixed byte offsets and each
  node packetises its own blocks, so frames must never straddle a block: the
  header is rewritten (the same chunks, then a ``JUNK`` pad chunk) so that
  ``data`` starts on a frame boundary.  The samples are kept byte for byte;
  chunks after ``data`` and a trailing partial frame are dropped.
- An interrupted MPEG-TS recording ends mid-packet, and a capture may start
  with bytes before the first sync: both ends are trimmed to whole packets.

:func:`plan` looks at the file's first and last bytes and returns a
:class:`Rewrite` (or ``None`` when the file is fine as it is);
:meth:`Rewrite.copy` writes the stored file.
"""

from __future__ import annotations

import struct
from typing import IO

import attrs

from ._ts import SYNC, TS_PACKET, looks_like_ts
from ._wav import MAX_HEADER, MalformedMedia, looks_like_wav, parse_wav

# Bytes of the file's end :func:`plan` needs (TS garbage searched back this far).
TAIL = 1 << 20
# Consecutive sync bytes that mark where a transport stream really starts.
SYNC_RUN = 5
_COPY_CHUNK = 1 << 20


@attrs.frozen
class Rewrite:
    """The stored file is ``prefix``, the upload's bytes ``[start, end)``, then ``suffix``."""

    prefix: bytes
    start: int
    end: int
    suffix: bytes = b""
    warnings: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """Bytes of the stored file."""
        return len(self.prefix) + self.end - self.start + len(self.suffix)

    def is_identity(self, size: int) -> bool:
        """True if the stored file is the ``size``-byte upload itself."""
        return not self.prefix and not self.suffix and self.start == 0 and self.end == size

    def copy(self, src: IO[bytes], dst: IO[bytes]) -> None:
        """Write the stored file to ``dst`` (blocking: run it in a thread)."""
        dst.write(self.prefix)
        src.seek(self.start)
        left = self.end - self.start
        while left > 0:
            data = src.read(min(_COPY_CHUNK, left))
            if not data:
                raise MalformedMedia("upload shorter than when it was examined")
            dst.write(data)
            left -= len(data)
        dst.write(self.suffix)


def plan(head: bytes, tail: bytes, size: int) -> Rewrite | None:
    """How to store a ``size``-byte upload that starts with ``head`` and ends with ``tail``.

    ``head`` should be the first :data:`MAX_HEADER` bytes (or the whole file) and
    ``tail`` the last :data:`TAIL`.  ``None``: store the upload as it is (also
    for files this cannot help; the analyser then says why they do not stream).
    A rewrite may be the identity, carrying only warnings.
    """
    if looks_like_wav(head):
        return _plan_wav(head, size)
    return _plan_ts(head, tail, size)


def _plan_wav(head: bytes, size: int) -> Rewrite | None:
    try:
        fmt = parse_wav(head, size)
    except MalformedMedia:
        return None
    warnings = []
    if fmt.encoding == "float":
        warnings.append(f"{fmt.bits}-bit float PCM is served as 16-bit L16 (RFC 3551)")
    elif fmt.bits != 16:
        warnings.append(f"{fmt.bits}-bit PCM is served as 16-bit L16 (RFC 3551)")
    whole = fmt.data_size - fmt.data_size % fmt.frame_size
    if whole != fmt.data_size:
        warnings.append(f"dropped a partial sample frame of {fmt.data_size - whole} bytes")
    if fmt.data_offset % fmt.frame_size == 0 and whole == fmt.data_size:
        # Chunks after ``data`` do no harm: the packetiser stops at its end.
        return Rewrite(b"", 0, size, warnings=tuple(warnings)) if warnings else None
    # The chunks before ``data`` as they are, then a JUNK pad, then ``data``.
    chunks = bytes(head[12 : fmt.data_offset - 8])
    base = 12 + len(chunks) + 8 + 8  # RIFF header, chunks, JUNK header, data header
    pad = 0
    while (base + pad) % fmt.frame_size:
        pad += 2  # RIFF chunks are word-aligned
    riff_size = base + pad + whole + (whole & 1) - 8
    prefix = b"".join(
        (
            b"RIFF",
            struct.pack("<I", riff_size),
            b"WAVE",
            chunks,
            b"JUNK",
            struct.pack("<I", pad),
            bytes(pad),
            b"data",
            struct.pack("<I", whole),
        )
    )
    end = fmt.data_offset + whole
    # An odd-sized chunk is followed by a pad byte (RIFF chunks are word-aligned).
    return Rewrite(prefix, fmt.data_offset, end, bytes(whole & 1), tuple(warnings))


def _sync_run(data: bytes, at: int) -> bool:
    """True if ``SYNC_RUN`` packets (or as many as ``data`` holds, at least 2) start at ``at``."""
    runs = min(SYNC_RUN, (len(data) - at) // TS_PACKET)
    return runs >= 2 and all(data[at + k * TS_PACKET] == SYNC for k in range(runs))


def _plan_ts(head: bytes, tail: bytes, size: int) -> Rewrite | None:
    if looks_like_ts(head):
        start = 0
    else:
        # Garbage in front: the first offset where a run of packets starts.
        start = next(
            (
                at
                for at in range(min(len(head), MAX_HEADER) - 2 * TS_PACKET)
                if head[at] == SYNC and _sync_run(head, at)
            ),
            -1,
        )
        if start < 0:
            return None
    end = start + (size - start) // TS_PACKET * TS_PACKET
    # Garbage at the end: walk back over whole packets without a sync byte.
    tail_at = size - len(tail)
    while end - TS_PACKET >= max(start, tail_at) and tail[end - TS_PACKET - tail_at] != SYNC:
        end -= TS_PACKET
    if end - start < 2 * TS_PACKET:
        return None
    if start == 0 and end == size:
        return None
    warnings = []
    if start:
        warnings.append(f"MPEG-TS: dropped {start} bytes before the first packet")
    if end != size:
        warnings.append(f"MPEG-TS: dropped {size - end} bytes after the last whole packet")
    return Rewrite(b"", start, end, warnings=tuple(warnings))


__all__ = ["TAIL", "Rewrite", "plan"]
