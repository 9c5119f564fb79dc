"""Ingest-side media parsing: MPEG-TS time index, WAV, opaque files, block cutting."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from yimaporc.yima.media import (
    DEFAULT_BLOCK,
    DEFAULT_TS_BLOCK,
    KIND_OPAQUE,
    KIND_TS,
    KIND_WAV,
    PCR_HZ,
    RTP_PAYLOAD,
    TS_PACKET,
    Analyser,
    MalformedMedia,
    MediaInfo,
    TsScanner,
    analyse_bytes,
    analyse_file,
    block_size_for,
    check_name,
    cut_blocks,
    parse_wav,
    payload_times,
    read_blocks,
    reassemble,
    to_l16,
)
from yimaporc.yima.media.sample import SampleError, make_sample_ts, make_sample_wav

PCR_PID = 0x100


def ts_packet(pcr: int | None = None, pid: int = PCR_PID, fill: int = 0xAB) -> bytes:
    """One 188-byte TS packet, with an adaptation field carrying ``pcr`` (27 MHz) if given."""
    header = bytes([0x47, (pid >> 8) & 0x1F, pid & 0xFF])
    if pcr is None:
        return header + b"\x10" + bytes([fill]) * 184
    base, ext = divmod(pcr, 300)
    pcr_bytes = struct.pack(">Q", (base << 15) | (0x3F << 9) | ext)[2:]
    af = bytes([7, 0x10]) + pcr_bytes
    return header + b"\x30" + af + bytes([fill]) * (184 - len(af))


def vbr_stream() -> bytes:
    """A stream whose byte rate changes: 10 packets in 1 s, then 40 packets in 1 s."""
    packets = [ts_packet(PCR_HZ * 5)] + [ts_packet() for _ in range(9)]
    packets += [ts_packet(PCR_HZ * 6)] + [ts_packet() for _ in range(39)]
    packets += [ts_packet(PCR_HZ * 7)]
    return b"".join(packets)


def test_pcr_time_map_is_piecewise_linear_for_vbr() -> None:
    """Media time follows the PCRs: byte rate may differ between PCR pairs (VBR)."""
    s = TsScanner()
    s.feed(vbr_stream())
    tmap = s.finish()
    assert tmap.points[0] == (10, PCR_HZ * 5)
    # Byte 0 is time 0; the first PCR's byte comes 10 bytes later at 1880 bytes/s.
    first = tmap.time_at(10)
    assert abs(first - 10 / 1880) < 1e-12
    assert abs(tmap.time_at(10 + 10 * TS_PACKET) - first - 1.0) < 1e-9
    assert abs(tmap.time_at(10 + 50 * TS_PACKET) - first - 2.0) < 1e-9
    # Halfway through the fast segment is 0.5 s after its PCR.
    assert abs(tmap.time_at(10 + 30 * TS_PACKET) - first - 1.5) < 1e-9


def test_scanner_accepts_any_chunking() -> None:
    """Feeding whole, byte by byte-ish, or in odd chunks gives the same time map."""
    data = vbr_stream()
    whole = TsScanner()
    whole.feed(data)
    pieces = TsScanner()
    for i in range(0, len(data), 97):
        pieces.feed(data[i : i + 97])
    assert pieces.finish() == whole.finish()


def test_pcr_wraparound_is_unwrapped() -> None:
    """A PCR that wraps past 2**33*300 keeps counting forward."""
    wrap = (1 << 33) * 300
    packets = [ts_packet(wrap - PCR_HZ // 2), ts_packet(), ts_packet(PCR_HZ // 2), ts_packet()]
    info = analyse_bytes("w", b"".join(packets), seed=1, block_size=RTP_PAYLOAD)
    assert info.streamable
    assert info.duration is not None and abs(info.duration - 2.0) < 1e-6


def test_broken_streams_are_stored_but_not_streamable() -> None:
    """Lost sync, truncation or missing PCRs give a clear message instead of a stream."""
    good = vbr_stream()
    cases = {
        "sync byte lost": good[: 5 * 188] + b"\x00" + good[5 * 188 + 1 :],
        "truncated": good + b"\x47\x00",
        "fewer than two PCRs": b"".join(ts_packet() for _ in range(5)),
    }
    for why, data in cases.items():
        info = analyse_bytes("bad", data, seed=1)
        assert info.kind == KIND_TS
        assert not info.streamable
        assert why in info.message
        assert "cannot be streamed" in info.message


def test_sample_clip_time_index_and_payload_pacing(sample_ts: Path) -> None:
    """An ffmpeg clip gets a duration, a bit rate, one time per block, and per-payload send times matching the whole-file PCR map."""
    data = sample_ts.read_bytes()
    info = analyse_file(sample_ts, "sample", seed=7, block_size=20 * RTP_PAYLOAD)
    assert info.kind == KIND_TS and info.streamable, info.message
    assert info.duration is not None and 3.6 < info.duration < 4.4
    assert info.bitrate is not None and abs(info.bitrate - len(data) * 8 / info.duration) < 1
    assert info.blocks == len(info.block_times) > 3
    assert list(info.block_times) == sorted(info.block_times) and info.block_times[0] == 0
    scanner = TsScanner()
    scanner.feed(data)
    tmap = scanner.finish()
    for k, block in enumerate(cut_blocks(data, info.block_size)):
        times = payload_times(info, k, block)
        assert len(times) == -(-len(block) // RTP_PAYLOAD)
        assert times == sorted(times)
        for j in (0, len(times) // 2, len(times) - 1):
            expected = tmap.time_at(k * info.block_size + j * RTP_PAYLOAD)
            assert abs(times[j] - expected) < 2e-6


def test_cut_and_reassemble_is_byte_identical(sample_ts: Path) -> None:
    """Blocks cut from a file (in memory or from disk) reassemble to the same bytes."""
    data = sample_ts.read_bytes()
    info = analyse_bytes("sample", data, seed=1)
    assert info.block_size == DEFAULT_TS_BLOCK
    blocks = list(read_blocks(sample_ts, 5 * RTP_PAYLOAD))
    assert reassemble(blocks) == data
    assert all(len(b) == 5 * RTP_PAYLOAD for b in blocks[:-1])
    assert reassemble(cut_blocks(data, 1000)) == data


def test_wav_header_duration_and_block_times(tmp_path: Path) -> None:
    """A WAV file is parsed from its RIFF header: format, data offset, duration, per-block times."""
    path = make_sample_wav(tmp_path / "a.wav", seconds=1.0, sample_rate=8000, channels=1)
    data = path.read_bytes()
    info = analyse_bytes("a.wav", data, seed=3, block_size=4000)
    assert info.kind == KIND_WAV and info.streamable
    assert info.wav is not None
    assert (info.wav.channels, info.wav.sample_rate, info.wav.bits) == (1, 8000, 16)
    assert info.wav.data_offset == 44 and info.wav.data_size == 16000
    assert info.duration == 1.0 and info.bitrate == 128_000
    assert info.block_times[:3] == (
        0,
        round((4000 - 44) / 16000 * 1e6),
        round((8000 - 44) / 16000 * 1e6),
    )


def test_wav_rejects_compressed_and_broken_headers() -> None:
    """Non-PCM formats and missing chunks are not streamable, with the reason given."""
    fmt = struct.pack("<HHIIHH", 0x55, 2, 44100, 0, 4, 16)
    mp3_in_wav = (
        b"RIFF\x00\x00\x00\x00WAVEfmt " + struct.pack("<I", 16) + fmt + b"data\x04\x00\x00\x00abcd"
    )
    info = analyse_bytes("x", mp3_in_wav + bytes(600), seed=1)
    assert not info.streamable and "not uncompressed PCM" in info.message
    with pytest.raises(MalformedMedia, match="data chunk not found"):
        parse_wav(b"RIFF\x00\x00\x00\x00WAVE", 12)
    with pytest.raises(MalformedMedia, match="before fmt"):
        parse_wav(b"RIFF\x00\x00\x00\x00WAVEdata\x00\x00\x00\x00", 20)


def test_l16_conversion() -> None:
    """WAV PCM becomes RTP L16: 16-bit big-endian, from 8-, 16-, 24- and 32-bit input."""
    assert to_l16(struct.pack("<hh", 1, -2)) == struct.pack(">hh", 1, -2)
    assert to_l16(bytes([128, 255, 0]), 8) == struct.pack(">hhh", 0, 127 << 8, -128 << 8)
    assert to_l16(b"\x11\x22\x33", 24) == b"\x33\x22"
    assert to_l16(b"\x00\x11\x22\x33", 32) == b"\x33\x22"
    with pytest.raises(MalformedMedia):
        to_l16(b"\x00", 16)
    with pytest.raises(MalformedMedia):
        to_l16(b"\x00\x00", 12)


def test_float_wav_is_parsed_and_converted_as_ffmpeg_does() -> None:
    """IEEE float WAV (format tag 3, as ``sox -e floating-point`` and ffmpeg pcm_f32le/f64le
    write it; plain or WAVE_FORMAT_EXTENSIBLE) is streamable: 32/64-bit samples become L16
    as round(x * 32768), half to even, clipped; NaN is silence; other widths are refused."""
    fmt = struct.pack("<HHIIHH", 3, 2, 48000, 48000 * 8, 8, 32)
    wav = b"RIFF\x00\x00\x00\x00WAVEfmt " + struct.pack("<I", 16) + fmt + b"data"
    wav += struct.pack("<I", 16) + struct.pack("<4f", 0.5, -1.0, 2.0, 1.5 / 32768)
    got = parse_wav(wav, len(wav))
    assert (got.bits, got.channels, got.encoding, got.frame_size) == (32, 2, "float", 8)
    ext = struct.pack("<HHIIHHHHI", 0xFFFE, 1, 8000, 64000, 8, 64, 22, 64, 4)
    ext += struct.pack("<H", 3) + bytes(14)
    wav64 = b"RIFF\x00\x00\x00\x00WAVEfmt " + struct.pack("<I", 40) + ext + b"data\x00\x00\x00\x00"
    assert parse_wav(wav64, len(wav64)).encoding == "float"
    pcm = struct.pack("<5f", 0.5, -1.0, 2.0, 1.5 / 32768, float("nan"))
    assert to_l16(pcm, 32, "float") == struct.pack(">5h", 16384, -32768, 32767, 2, 0)
    assert to_l16(struct.pack("<2d", -0.25, 2.5 / 32768), 64, "float") == struct.pack(
        ">2h", -8192, 2
    )
    bad = b"RIFF\x00\x00\x00\x00WAVEfmt " + struct.pack("<I", 16)
    bad += struct.pack("<HHIIHH", 3, 1, 8000, 16000, 2, 16) + b"data\x00\x00\x00\x00"
    with pytest.raises(MalformedMedia, match="float 1 ch, 8000 Hz, 16 bits unsupported"):
        parse_wav(bad, len(bad))


def test_opaque_files_are_flagged() -> None:
    """Anything else is stored as opaque blocks with a clear not-streamable message."""
    info = analyse_bytes("notes.txt", b"hello world" * 100, seed=5)
    assert info.kind == KIND_OPAQUE and not info.streamable
    assert "cannot be streamed" in info.message
    assert info.block_size == DEFAULT_BLOCK and info.blocks == 1
    tiny = analyse_bytes("tiny", b"G", seed=5)
    assert tiny.kind == KIND_OPAQUE and tiny.size == 1
    with pytest.raises(MalformedMedia):
        payload_times(info, 0, b"hello world" * 100)


def test_block_size_rounding() -> None:
    """MPEG-TS block sizes round to whole 1316-byte RTP payloads; others are kept; limits hold."""
    assert DEFAULT_TS_BLOCK == 336_896
    assert block_size_for(KIND_TS, 100_000) == 76 * RTP_PAYLOAD
    assert block_size_for(KIND_TS, 1) == RTP_PAYLOAD
    assert block_size_for(KIND_WAV, 1000) == 1000
    with pytest.raises(ValueError):
        block_size_for(KIND_OPAQUE, 0)


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(["a", "clip.ts", "X-1_2"]),
    st.integers(0, 2**64 - 1),
    st.integers(0, 10_000_000),
    st.integers(1, 100_000),
    st.integers(0, 8),
    st.lists(st.integers(0, 10**9), max_size=5),
)
def test_media_info_json_round_trip(
    name: str, seed: int, size: int, bs: int, g: int, times: list[int]
) -> None:
    """MediaInfo survives to_json/JSON text/from_json and reports its block count."""
    info = MediaInfo(name, KIND_OPAQUE, size, bs, seed, g, block_times=tuple(times))
    obj = json.loads(json.dumps(info.to_json()))
    assert obj["blocks"] == info.blocks == -(-size // bs)
    assert MediaInfo.from_json(obj) == info


def test_media_info_round_trip_with_wav(tmp_path: Path) -> None:
    """A WAV MediaInfo (nested format) survives JSON; unknown fields are refused."""
    info = analyse_file(make_sample_wav(tmp_path / "b.wav", 0.1, 8000, 1), "b", seed=1)
    assert MediaInfo.from_json(json.loads(json.dumps(info.to_json()))) == info
    with pytest.raises(ValueError, match="unknown"):
        MediaInfo.from_json({**info.to_json(), "colour": 1})
    assert info.block_length(0) == info.size


def test_names_are_checked() -> None:
    """Media names are safe directory names."""
    assert check_name("sample") == "sample"
    for bad in ("", "../x", "a/b", ".hidden", "x" * 129, "sp ace"):
        with pytest.raises(ValueError):
            check_name(bad)
    with pytest.raises(ValueError):
        Analyser("../etc", seed=1)


def test_missing_ffmpeg_is_a_clear_error(tmp_path: Path) -> None:
    """make_sample_ts names the missing tool instead of crashing."""
    with pytest.raises(SampleError, match="not found"):
        make_sample_ts(tmp_path / "x.ts", 1, ffmpeg="/nonexistent/ffmpeg")


def test_wav_blocks_hold_whole_frames_and_packets_fit_a_datagram(tmp_path: Path) -> None:
    """WAV block sizes round down to whole frames; packet_bytes is 20 ms, capped at 1400 B of L16."""
    from yimaporc.yima.media import packet_bytes

    path = make_sample_wav(tmp_path / "s.wav", seconds=0.5, sample_rate=44_100, channels=2)
    info = analyse_bytes("s.wav", path.read_bytes(), seed=1, block_size=10_001)
    assert info.wav is not None and info.streamable
    assert info.block_size == 10_000
    assert packet_bytes(info.wav) == 350 * 4
    mono = make_sample_wav(tmp_path / "m.wav", seconds=0.5, sample_rate=8_000, channels=1)
    minfo = analyse_bytes("m.wav", mono.read_bytes(), seed=1)
    assert minfo.wav is not None and packet_bytes(minfo.wav) == 160 * 2
