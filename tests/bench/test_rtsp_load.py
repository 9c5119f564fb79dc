"""bench/peers/rtsp_load.py: what counts as a late or lost packet, and when a trial fails.

Packets go through a datagram socket pair into the generator's own receive function,
with the arrival instants given explicitly, so every figure is exact.
"""

from __future__ import annotations

import importlib.util
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

PEERS = Path(__file__).resolve().parents[2] / "bench" / "peers"


def load() -> ModuleType:
    sys.path.insert(0, str(PEERS))  # it imports its sibling benchutil
    try:
        spec = importlib.util.spec_from_file_location(
            "yimaporc_bench_rtsp_load", PEERS / "rtsp_load.py"
        )
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(PEERS))
    return mod


rl = load()
CLOCK = 90000
TS0 = 0xFFFF0000  # the 32-bit timestamp wraps during the test


def rtp(seq: int, media_s: float) -> bytes:
    ts = (TS0 + round(media_s * CLOCK)) & 0xFFFFFFFF
    return struct.pack("!BBHII", 0x80, 33, seq & 0xFFFF, ts, 1234) + b"\0" * 188


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def feed(
    pair: tuple[socket.socket, socket.socket],
    st: object,
    arrivals: list[tuple[int, float, float]],
    window: tuple[float, float],
) -> None:
    """(seq, media time, arrival) packets, each drained at its arrival instant."""
    tx, rx = pair
    buf = bytearray(2048)
    for seq, mt, now in arrivals:
        tx.send(rtp(seq, mt))
        in_win = window[0] <= now < window[1]
        rl._drain_rtp(rx, st, buf, memoryview(buf), now, in_win, window[1])


def test_packets_on_schedule_are_not_late(pair: tuple[socket.socket, socket.socket]) -> None:
    """Packets arriving at start + media time (plus a constant delay) count none late."""
    st = rl.Stats(CLOCK)
    feed(pair, st, [(i, 0.01 * i, 100.0 + 0.01 * i + 0.002) for i in range(300)], (101.0, 103.0))
    assert st.w_recv == 200 and st.w_lost == 0 and st.w_late == 0
    assert st.w_late_max < 1e-3


def test_packets_held_up_by_a_stall_are_late_beyond_the_allowance(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A 345 ms stall: the packets it held more than 200 ms behind schedule are late, in order."""
    st = rl.Stats(CLOCK)
    # packets 150.. were due from 1.50 s on; the server sends them all at 1.845 s
    pkts = [(i, 0.01 * i, 100.0 + max(0.01 * i, 1.845 if i >= 150 else 0.0)) for i in range(300)]
    feed(pair, st, pkts, (101.0, 103.0))
    # held > 0.2 s: those due before 1.645 s, i.e. 150..164
    assert st.w_late == 15 and st.w_lost == 0
    assert st.w_late_max == pytest.approx(0.345, abs=1e-6)


def test_a_server_falling_behind_real_time_makes_every_later_packet_late(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Sending at 0.8 x real time: once 200 ms behind, every packet of the window is late."""
    st = rl.Stats(CLOCK)
    feed(pair, st, [(i, 0.01 * i, 100.0 + 0.0125 * i) for i in range(400)], (101.5, 105.0))
    # behind by 0.0025 s per packet: > 0.2 s from packet 81 on, all of the window's
    assert st.w_recv > 0 and st.w_late == st.w_recv


def test_a_hole_in_the_sequence_numbers_is_lost(pair: tuple[socket.socket, socket.socket]) -> None:
    """Two packets missing inside the window count as two lost."""
    st = rl.Stats(CLOCK)
    pkts = [(i, 0.01 * i, 100.0 + 0.01 * i) for i in range(300) if i not in (170, 171)]
    feed(pair, st, pkts, (101.0, 103.0))
    assert st.w_lost == 2 and st.w_late == 0


def test_trial_fails_above_one_in_a_thousand_lost_or_late() -> None:
    """1 bad packet in 1000 passes, 2 fail; a silent or missing session always fails."""
    assert rl.trial_passes(4, 4, 0, lost=1, late=0, expected=1000, max_bad=0.001)
    assert not rl.trial_passes(4, 4, 0, lost=1, late=1, expected=1000, max_bad=0.001)
    assert not rl.trial_passes(4, 4, 1, lost=0, late=0, expected=1000, max_bad=0.001)
    assert not rl.trial_passes(4, 3, 0, lost=0, late=0, expected=1000, max_bad=0.001)
    assert not rl.trial_passes(4, 4, 0, 0, 0, 1000, 0.001, errors=["setup timeout"])
