"""Uploads made streamable: WAV headers realigned to whole frames, MPEG-TS trimmed to packets."""

from __future__ import annotations

import io
import struct

from hypothesis import given
from hypothesis import strategies as st
from test_media import ts_packet

from yimaporc.yima.media import (
    KIND_TS,
    KIND_WAV,
    MAX_HEADER,
    PCR_HZ,
    TAIL,
    TS_PACKET,
    analyse_bytes,
    parse_wav,
    plan,
    unstreamable_reason,
)


def riff(chunks: list[tuple[bytes, bytes]], declared_data: int | None = None) -> bytes:
    """A RIFF/WAVE file of ``chunks`` (each padded to an even size)."""
    body = b"WAVE"
    for cid, data in chunks:
        size = len(data) if cid != b"data" or declared_data is None else declared_data
        body += cid + struct.pack("<I", size) + data + bytes(len(data) & 1)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def fmt_chunk(channels: int, rate: int, bits: int, extensible: bool) -> bytes:
    """A ``fmt `` chunk: plain PCM, or WAVE_FORMAT_EXTENSIBLE with the PCM sub-format."""
    align = channels * bits // 8
    tag = 0xFFFE if extensible else 1
    out = struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)
    if extensible:
        guid = struct.pack("<H", 1) + bytes.fromhex("000000001000800000aa00389b71")
        out += struct.pack("<HHI", 22, bits, 0) + guid
    return out


def store(data: bytes) -> tuple[bytes, tuple[str, ...]]:
    """The bytes the node would store for upload ``data``, and the warnings."""
    rewrite = plan(data[:MAX_HEADER], data[-TAIL:], len(data))
    if rewrite is None:
        return data, ()
    out = io.BytesIO()
    rewrite.copy(io.BytesIO(data), out)
    assert len(out.getvalue()) == rewrite.size
    return out.getvalue(), rewrite.warnings


EXTRA = st.lists(
    st.tuples(
        st.sampled_from([b"LIST", b"fact", b"bext", b"junk", b"cue "]), st.binary(max_size=99)
    ),
    max_size=3,
)


@given(
    extra=EXTRA,
    after=EXTRA,
    channels=st.integers(1, 8),
    bits=st.sampled_from([8, 16, 24, 32]),
    frames=st.integers(1, 400),
    partial=st.integers(0, 7),
    extensible=st.booleans(),
)
def test_any_wav_layout_is_stored_frame_aligned_with_its_samples(
    extra: list[tuple[bytes, bytes]],
    after: list[tuple[bytes, bytes]],
    channels: int,
    bits: int,
    frames: int,
    partial: int,
    extensible: bool,
) -> None:
    """Chunks before and after data, odd sizes, 8-32 bits, 1-8 channels: all stream, samples kept."""
    frame = channels * bits // 8
    samples = bytes(range(256)) * (frames * frame // 256 + 1)
    samples = samples[: frames * frame + partial % frame]
    upload = riff([(b"fmt ", fmt_chunk(channels, 8000, bits, extensible)), *extra,
                   (b"data", samples), *after])  # fmt: skip
    stored, warnings = store(upload)
    info = analyse_bytes("w", stored, seed=1, block_size=4096)
    assert info.kind == KIND_WAV and info.streamable, info.message
    assert info.wav is not None
    assert info.wav.data_offset % frame == 0 and info.block_size % frame == 0
    at, size = info.wav.data_offset, info.wav.data_size
    assert stored[at : at + size] == samples[: frames * frame]
    assert (bits != 16) == any("16-bit L16" in w for w in warnings)
    # The stored file is itself a well-formed WAV with the same format.
    again = parse_wav(stored, len(stored))
    assert (again.channels, again.bits, again.data_size) == (channels, bits, frames * frame)
    assert struct.unpack_from("<I", stored, 4)[0] == len(stored) - 8


def test_ffmpeg_style_list_chunk_moves_data_to_a_frame_boundary() -> None:
    """ffmpeg's LIST/INFO puts data at byte 78 (2 ch x 16 bit: misaligned); stored at a boundary."""
    info_list = b"INFO" + b"ISFT" + struct.pack("<I", 14) + b"Lavf60.16.100\0"
    upload = riff([(b"fmt ", fmt_chunk(2, 44_100, 16, False)), (b"LIST", info_list),
                   (b"data", bytes(4000))])  # fmt: skip
    assert parse_wav(upload, len(upload)).data_offset == 78
    before = analyse_bytes("w", upload, seed=1)
    assert not before.streamable and "aligned" in before.message
    stored, warnings = store(upload)
    after = analyse_bytes("w", stored, seed=1)
    assert after.streamable and after.wav is not None and after.wav.data_offset % 4 == 0
    assert warnings == ()


def test_aligned_wav_is_stored_as_uploaded() -> None:
    """A canonical 44-byte-header 16-bit WAV needs no rewrite at all."""
    upload = riff([(b"fmt ", fmt_chunk(2, 8000, 16, False)), (b"data", bytes(400))])
    assert plan(upload, upload, len(upload)) is None


def ts_stream(packets: int = 60) -> bytes:
    """A small timed transport stream: a PCR every 10 packets, 0.1 s apart."""
    return b"".join(
        ts_packet(PCR_HZ * (1 + k // 10) // 10) if k % 10 == 0 else ts_packet()
        for k in range(packets)
    )


@given(
    front=st.binary(max_size=600), cut=st.integers(1, TS_PACKET - 1), back=st.binary(max_size=600)
)
def test_ts_with_garbage_or_a_cut_is_trimmed_to_whole_packets(
    front: bytes, cut: int, back: bytes
) -> None:
    """Bytes before the first sync run and a partial last packet are dropped, with warnings."""
    clean = ts_stream()
    front = front.replace(b"\x47", b"\x46")
    back = back.replace(b"\x47", b"\x46")
    upload = front + clean + clean[:cut] + back
    stored, warnings = store(upload)
    # What follows the stream is kept only as whole packets that start with a sync byte.
    extra = stored[len(clean) :]
    assert stored[: len(clean)] == clean and len(extra) % TS_PACKET == 0
    assert all(extra[k] == 0x47 for k in range(0, len(extra), TS_PACKET))
    assert len(extra) <= cut + len(back) - (cut + len(back)) % TS_PACKET
    info = analyse_bytes("t", stored, seed=1)
    assert info.kind == KIND_TS and info.streamable
    dropped_tail = len(upload) - len(front) - len(stored)
    assert any("after the last whole packet" in w for w in warnings) == (dropped_tail > 0)
    assert bool(front) == any("before the first packet" in w for w in warnings)


def test_clean_ts_is_stored_as_uploaded_and_garbage_stays_opaque() -> None:
    """A whole-packet stream needs no trim; bytes with no sync run are left to the analyser."""
    clean = ts_stream()
    assert plan(clean, clean, len(clean)) is None
    noise = bytes(range(7, 250)) * 40
    assert plan(noise, noise, len(noise)) is None
    assert unstreamable_reason(analyse_bytes("n", noise, seed=1)) == "not MPEG-TS or WAV"
