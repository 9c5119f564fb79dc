"""Finding MPEG-TS seek points: PES starts with PTS and random access, the PAT before
them, and libavformat's npt convention (pure functions)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from yimaporc.yima.media import PTS_WRAP, MediaInfo, last_pat_before, pes_starts
from yimaporc.yima.media._info import KIND_TS
from yimaporc.yima.rtspservice import lavf_npt, lavf_quirk

VIDEO = 0x100


def _pts_bytes(pts: int) -> bytes:
    return bytes(
        [
            0x21 | ((pts >> 29) & 0x0E),
            (pts >> 22) & 0xFF,
            ((pts >> 14) & 0xFE) | 1,
            (pts >> 7) & 0xFF,
            ((pts << 1) & 0xFE) | 1,
        ]
    )


def _packet(pid: int, payload: bytes, *, start: bool = False, rai: bool = False) -> bytes:
    head = bytes([0x47, (0x40 if start else 0) | pid >> 8, pid & 0xFF])
    if rai:
        af = bytes([1, 0x40])  # adaptation field of 1 byte: random_access_indicator
        body = af + payload
        head += bytes([0x30])
    else:
        body = payload
        head += bytes([0x10])
    return (head + body).ljust(188, b"\xff")


def _pes(pts: int | None, es: bytes) -> bytes:
    if pts is None:
        return b"\x00\x00\x01\xe0\x00\x00\x80\x00\x00" + es
    return b"\x00\x00\x01\xe0\x00\x00\x80\x80\x05" + _pts_bytes(pts) + es


PAT = _packet(0, b"\x00\x00\xb0\x0d", start=True)
AUD_NON_IDR = b"\x00\x00\x00\x01\x09\xf0\x00\x00\x00\x01\x41\x9a"  # AUD, non-IDR slice
IDR = b"\x00\x00\x00\x01\x09\xf0\x00\x00\x00\x01\x65\x88"  # AUD, IDR slice


def test_pes_starts_give_offsets_pts_and_random_access() -> None:
    """Every PES start of the PID is found with its offset and PTS; RAI, an H.264 IDR or
    an MPEG-2 sequence header marks a key; continuation packets and other PIDs do not
    count."""
    data = b"".join(
        [
            PAT,
            _packet(VIDEO, _pes(9000, AUD_NON_IDR), start=True, rai=True),
            _packet(VIDEO, b"\x00" * 100),  # continuation
            _packet(0x101, _pes(9100, b"\xff\xf1"), start=True, rai=True),  # audio
            _packet(VIDEO, _pes(12600, AUD_NON_IDR), start=True),
            _packet(VIDEO, _pes(16200, IDR), start=True),
            _packet(VIDEO, _pes(19800, b"\x00\x00\x01\xb3\x14\x00"), start=True),
            _packet(VIDEO, _pes(None, IDR), start=True),
        ]
    )
    got = [(p.offset // 188, p.pts, p.key) for p in pes_starts(data, VIDEO)]
    assert got == [
        (1, 9000, True),
        (4, 12600, False),
        (5, 16200, True),
        (6, 19800, True),
        (7, None, True),
    ]
    assert pes_starts(data + b"\x47\x41", VIDEO) == pes_starts(data, VIDEO)  # partial tail


@given(st.integers(min_value=0, max_value=PTS_WRAP - 1))
def test_pts_round_trips(pts: int) -> None:
    """Any 33-bit PTS is read back as written."""
    data = _packet(VIDEO, _pes(pts, IDR), start=True)
    assert [p.pts for p in pes_starts(data, VIDEO)] == [pts]


def test_last_pat_before_an_offset() -> None:
    """The PAT nearest before the offset is found; none before the first one."""
    key = _packet(VIDEO, _pes(0, IDR), start=True, rai=True)
    data = PAT + key + PAT + key + key
    assert last_pat_before(data, 4 * 188) == 2 * 188
    assert last_pat_before(data, 2 * 188) == 0
    assert last_pat_before(data, 0) is None
    assert last_pat_before(key * 3, 3 * 188) is None


def _ts_info(origin_pts: int) -> MediaInfo:
    return MediaInfo("m", KIND_TS, 188 * 100, 188 * 70, 0, 0, pcr_pid=VIDEO,
                     pcr_origin=origin_pts * 300)  # fmt: skip


def test_lavf_npt_is_the_pts_clock() -> None:
    """A libavformat client's npt is PTS seconds: media time is that less the first PCR,
    0 before it, unwrapped across the 33-bit PTS wrap; other clients are left alone."""
    assert lavf_quirk("Lavf59.27.100") and not lavf_quirk("GStreamer/1.22.0")
    info = _ts_info(round(0.723 * 90000))
    assert abs(lavf_npt(info, 3.9) - (3.9 - 0.723)) < 1e-9
    assert lavf_npt(info, 0.0) == 0.0
    near_wrap = _ts_info(PTS_WRAP - 90000)  # first PCR 1 s before the wrap
    assert abs(lavf_npt(near_wrap, 2.0) - 3.0) < 1e-9
