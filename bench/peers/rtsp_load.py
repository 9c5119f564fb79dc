#!/usr/bin/env python3
# ruff: noqa
# Copied from /work/shared/peers/rtsp_load.py (peer benchmark kit); see bench/peers/NOTE.md.
"""RTSP/RTP-over-UDP load generator (stdlib only, any python3 >= 3.8).

Runs N concurrent RTSP sessions against one URL with its own minimal client:
OPTIONS, DESCRIBE, SETUP of every SDP media track (RTP/AVP;unicast;
client_port=a-b; --first-track-only for one), PLAY, GET_PARAMETER keep-alive
every 20 s (own thread), then TEARDOWN.  It receives RTP on UDP, counting
packets, payload bytes, sequence gaps, and how far each track's media time
(RTP timestamps, clock from a=rtpmap) lags wall-clock time.  The generator
runs at SCHED_RR priority (--prio) and reads in 2 ms batches (--batch-ms) so
a many-threaded, overloaded server cannot starve it; a trial whose receive
loop still stalls > 0.5 s fails.  After each ramp trial it waits until the
server's CPU is back near idle.

A trial passes when, over the measurement window (after --warmup), every
session set up and received packets, and at most --max-bad (0.1 %) of the
packets all the clients expected were lost or late (added for yimaporc):
  * lost: a hole in the RTP sequence numbers (in any order with --fanout);
  * late: arrived more than --late-ms (200 ms) after its scheduled send time.
    A packet's scheduled time is the session's start plus its media time: the
    RTP timestamp (extended, clock from a=rtpmap) over the clock rate; the start
    is the earliest (arrival - media time) of the track so far, so a server that
    sends on schedule shows only network delay, and one that falls behind real
    time or stalls shows every packet it sends too late.
Per session the old figures are printed too (worst_delivery, and worst_rate =
1 - lag_growth / window, lag_growth comparing the smallest lag of the window's
last 0.5 s with that of its first 0.5 s).

Modes:
  rtsp_load.py --url rtsp://127.0.0.1:8554/test --sessions 20
  rtsp_load.py --url ... --ramp [--start 8 --max 1024 --budget 100]  # largest passing N
  (doubling until a trial fails, then bisection to 10 %; 8 s window + 2 s warm-up)
Server CPU is measured from /proc for --server-pid (threads + children).
Last line:  RESULT rtsp label=... max_sessions=N agg_mbps=... server_cpu_pct=...
"""

import argparse
import concurrent.futures
import os
import queue
import re
import selectors
import socket
import sys
import threading
import time
from urllib.parse import urlparse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402


# --fanout (added for yimaporc): ask a Yima cluster for direct fan-out
# (Transport ...;x-yima-fanout, docs/wire.md): RTP of one stream then arrives from
# every node, so receipt is counted per (global) sequence number, order-insensitive.
FANOUT = False


class RtspError(Exception):
    pass


class Track:
    def __init__(self, url, clock):
        self.url = url
        self.clock = clock  # RTP clock rate (Hz) from a=rtpmap, 90000 default
        self.rtp = self.rtcp = None
        self.port = None
        self.stats = Stats(clock)


class RtspSession:
    """Minimal RTSP/1.0 client: OPTIONS, DESCRIBE, SETUP (every media track,
    or only the first with all_tracks=False), PLAY, GET_PARAMETER keep-alive,
    TEARDOWN.  RTP/AVP over UDP unicast only."""

    def __init__(self, url, rtp_port, all_tracks=True, timeout=10.0, start_npt=0.0):
        self.url = url
        self.start_npt = start_npt  # (added) PLAY Range start, --spread
        u = urlparse(url)
        self.host = u.hostname
        self.port = u.port or 554
        self.cseq = 0
        self.session_id = None
        self.timeout = timeout
        self.next_port = rtp_port
        self.all_tracks = all_tracks
        self.sock = None
        self.buf = b""
        self.base = url
        self.aggregate = url
        self.tracks = []

    def _send(self, method, url, headers=()):
        self.cseq += 1
        lines = [
            "%s %s RTSP/1.0" % (method, url),
            "CSeq: %d" % self.cseq,
            "User-Agent: peerbench-rtsp-load/1.0",
        ]
        if self.session_id and method not in ("OPTIONS", "DESCRIBE"):
            lines.append("Session: %s" % self.session_id)
        lines.extend(headers)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return self._read_response()

    def _read_response(self):
        while b"\r\n\r\n" not in self.buf:
            d = self.sock.recv(65536)
            if not d:
                raise RtspError("connection closed")
            self.buf += d
        head, rest = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        m = re.match(r"RTSP/1\.\d (\d+)", lines[0])
        if not m:
            raise RtspError("bad status line %r" % lines[0])
        status = int(m.group(1))
        hdrs = {}
        for l in lines[1:]:
            if ":" in l:
                k, v = l.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        clen = int(hdrs.get("content-length", "0"))
        while len(rest) < clen:
            d = self.sock.recv(65536)
            if not d:
                raise RtspError("connection closed in body")
            rest += d
        body, self.buf = rest[:clen], rest[clen:]
        return status, hdrs, body.decode("latin-1")

    def _bind_udp(self, tr):
        # Even RTP port + odd RTCP port; search upward on collision.
        port = self.next_port
        for _ in range(500):
            a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                a.close()
                b.close()
                port += 2
                continue
            for x in (a, b):
                x.setblocking(False)
            for opt in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
                try:
                    a.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
                    break
                except OSError:
                    pass
            tr.rtp, tr.rtcp, tr.port = a, b, port
            self.next_port = port + 2
            return
        raise RtspError("no free UDP port pair near %d" % self.next_port)

    def _resolve(self, ctrl):
        if ctrl is None or ctrl == "*":
            return self.base
        if re.match(r"^[a-z]+://", ctrl, re.I):
            return ctrl
        return self.base.rstrip("/") + "/" + ctrl

    def setup(self):
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        st, h, _ = self._send("OPTIONS", self.url)
        if st != 200:
            raise RtspError("OPTIONS %d" % st)
        st, h, sdp = self._send("DESCRIBE", self.url, ["Accept: application/sdp"])
        if st != 200:
            raise RtspError("DESCRIBE %d" % st)
        self.base = h.get("content-base", h.get("content-location", self.url))
        session_ctrl = None
        medias = []  # [control, clock]
        for line in sdp.splitlines():
            line = line.strip()
            if line.startswith("m="):
                medias.append([None, 90000])
            elif line.startswith("a=control:"):
                c = line[len("a=control:") :].strip()
                if medias:
                    medias[-1][0] = c
                else:
                    session_ctrl = c
            elif line.startswith("a=rtpmap:") and medias:
                m = re.match(r"a=rtpmap:\d+ [^/]+/(\d+)", line)
                if m:
                    medias[-1][1] = int(m.group(1))
        if not medias:
            raise RtspError("SDP has no media")
        self.aggregate = self._resolve(session_ctrl) if session_ctrl else self.base
        if not self.all_tracks:
            medias = medias[:1]
        for ctrl, clock in medias:
            tr = Track(self._resolve(ctrl), clock)
            self._bind_udp(tr)
            st, h, _ = self._send(
                "SETUP",
                tr.url,
                [
                    "Transport: RTP/AVP;unicast;client_port=%d-%d%s"
                    % (tr.port, tr.port + 1, ";x-yima-fanout" if FANOUT else "")
                ],
            )
            if st != 200:
                raise RtspError("SETUP %d" % st)
            tr.stats.fanout = FANOUT and "x-yima-fanout" in h.get("transport", "")
            if not self.session_id:
                self.session_id = h.get("session", "").split(";")[0].strip()
                if not self.session_id:
                    raise RtspError("no Session header")
            self.tracks.append(tr)
        return self

    def play(self):
        st, h, _ = self._send("PLAY", self.aggregate, ["Range: npt=%.3f-" % self.start_npt])
        if st != 200:
            raise RtspError("PLAY %d" % st)

    def keepalive(self):
        try:
            self.sock.settimeout(2)
            self._send("GET_PARAMETER", self.aggregate)
        except Exception:
            pass

    def teardown(self):
        try:
            if self.sock:
                self.sock.settimeout(TEARDOWN_S)
                self._send("TEARDOWN", self.aggregate)
        except Exception:
            pass
        socks = [self.sock] + [x for t in self.tracks for x in (t.rtp, t.rtcp)]
        for x in socks:
            try:
                if x:
                    x.close()
            except Exception:
                pass


class Stats:
    __slots__ = (
        "next_seq",
        "recv",
        "lost",
        "bytes",
        "w_recv",
        "w_lost",
        "w_bytes",
        "first_t",
        "ts0",
        "lag_first",
        "lag_last",
        "ext_ts",
        "last_ts",
        "dups",
        "clock",
        "fanout",
        "max_seq",
        "w_seen",
        "anchor",
        "w_late",
        "w_late_max",
    )

    def __init__(self, clock=90000):
        self.clock = float(clock)
        self.next_seq = None
        self.recv = self.lost = self.bytes = 0
        self.w_recv = self.w_lost = self.w_bytes = 0
        self.first_t = None
        self.ts0 = None  # (wall, extended rtp ts) at window start
        self.lag_first = None  # min lag over first 0.5 s of window
        self.lag_last = {}  # bucket(0.5 s) -> min lag
        self.ext_ts = None
        self.last_ts = None
        self.dups = 0
        self.fanout = False  # granted x-yima-fanout: count by sequence number, any order
        self.max_seq = None  # highest extended sequence number seen
        self.w_seen = set()  # extended sequence numbers received in the window
        self.anchor = None  # session start: min over packets of (arrival - media time)
        self.w_late = 0  # packets of the window later than LATE_S after their schedule
        self.w_late_max = 0.0  # the worst lateness in the window (s)


# --teardown-timeout (added for yimaporc)
TEARDOWN_S = 3.0

# --spread (added for yimaporc): sessions start at points of [0, SPREAD) s of the clip
SPREAD = 0.0

# --late-ms (added for yimaporc): a packet arriving this long after its scheduled send
# time (session start + media time from the RTP timestamp) is late
LATE_S = 0.2


def _lateness(st, now, ets):
    """Seconds after its scheduled send time that this packet arrived (running anchor)."""
    off = now - ets / st.clock
    if st.anchor is None or off < st.anchor:
        st.anchor = off
    return off - st.anchor


def _drain_rtp(sock, st, buf, mv, now, in_win, t_win1):
    while True:
        try:
            n = sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return
        if n < 12:
            continue
        seq = (buf[2] << 8) | buf[3]
        ts = int.from_bytes(mv[4:8], "big")
        off = 12 + 4 * (buf[0] & 0x0F)
        if buf[0] & 0x10 and n >= off + 4:  # header extension (RFC 8285): not payload
            off += 4 + 4 * ((buf[off + 2] << 8) | buf[off + 3])
        plen = n - off
        # extend the 32-bit RTP timestamp
        if st.ext_ts is None:
            st.ext_ts = ts
        else:
            d = (ts - (st.ext_ts & 0xFFFFFFFF)) & 0xFFFFFFFF
            if d < 0x80000000:
                st.ext_ts += d
            else:
                st.ext_ts -= 0x100000000 - d
        ets = st.ext_ts
        late = _lateness(st, now, ets)
        lost = 0
        if st.fanout:
            if st.max_seq is None:
                st.max_seq = ext = seq
                st.first_t = now
            else:
                d = (seq - (st.max_seq & 0xFFFF)) & 0xFFFF
                ext = st.max_seq + d if d < 0x8000 else st.max_seq - (0x10000 - d)
                st.max_seq = max(st.max_seq, ext)
            st.recv += 1
            st.bytes += plen
            if in_win:
                if ext in st.w_seen:
                    st.dups += 1
                    continue
                st.w_seen.add(ext)
                st.w_bytes += plen
                if late > LATE_S:
                    st.w_late += 1
                if late > st.w_late_max:
                    st.w_late_max = late
                if st.ts0 is None:
                    st.ts0 = (now, ets)
                lag = (now - st.ts0[0]) - (ets - st.ts0[1]) / st.clock
                if now - st.ts0[0] < 0.5 and (st.lag_first is None or lag < st.lag_first):
                    st.lag_first = lag
                if t_win1 - now < 0.5:
                    v = st.lag_last.get(0)
                    if v is None or lag < v:
                        st.lag_last[0] = lag
            continue
        if st.next_seq is None:
            st.first_t = now
        else:
            gap = (seq - st.next_seq) & 0xFFFF
            if gap:
                if gap < 0x8000:
                    lost = gap
                else:
                    st.dups += 1  # late or duplicate: ignore
                    continue
        st.next_seq = (seq + 1) & 0xFFFF
        st.recv += 1
        st.lost += lost
        st.bytes += plen
        if in_win:
            st.w_recv += 1
            st.w_lost += lost
            st.w_bytes += plen
            if late > LATE_S:
                st.w_late += 1
            if late > st.w_late_max:
                st.w_late_max = late
            if st.ts0 is None:
                st.ts0 = (now, ets)
            lag = (now - st.ts0[0]) - (ets - st.ts0[1]) / st.clock
            if now - st.ts0[0] < 0.5:
                if st.lag_first is None or lag < st.lag_first:
                    st.lag_first = lag
            if t_win1 - now < 0.5:
                v = st.lag_last.get(0)
                if v is None or lag < v:
                    st.lag_last[0] = lag


def trial_passes(n, n_ok, silent, lost, late, expected, max_bad, errors=()):
    """(added) Every session set up and heard in the window, at most ``max_bad`` of the
    packets the clients expected lost or late, and no set-up error or stall."""
    if errors or n_ok != n or silent or not expected:
        return False
    return (lost + late) <= max_bad * expected


def run_trial(
    url,
    n,
    warmup,
    window,
    port_base,
    server_pids,
    setup_threads,
    min_delivery,
    min_rate,
    all_tracks=True,
    setup_timeout=30.0,
    verbose=True,
    batch_s=0.002,
    max_bad=0.001,
):
    """Set up n sessions (in threads) while already receiving, wait until all
    are playing, then warm up and measure one window."""
    # --spread (added): session i starts at the golden-ratio point i of [0, SPREAD) s of
    # the clip, so the sessions are spread over its blocks (and a cluster's nodes)
    urls = url if isinstance(url, list) else [url]
    sessions = [
        RtspSession(
            urls[i % len(urls)],
            port_base + 4 * i,
            all_tracks,
            start_npt=(i * 0.6180339887) % 1.0 * SPREAD,
        )
        for i in range(n)
    ]
    errors = []
    ready = queue.SimpleQueue()

    def do_setup(s):
        try:
            s.setup()
            s.play()
            ready.put(s)
        except Exception as e:  # noqa: BLE001
            ready.put(e)

    sel = selectors.DefaultSelector()
    buf = bytearray(2048)
    mv = memoryview(buf)
    ok = []
    done = 0
    t_setup0 = time.monotonic()
    setup_s = None
    t_win0 = t_win1 = float("inf")
    meter = None
    errs0 = None
    cpu = None
    # RTSP keep-alive (GET_PARAMETER every 20 s) runs in its own thread so a
    # slow server cannot stall packet reception.
    ka_stop = threading.Event()

    def keepalive_loop():
        while not ka_stop.wait(20.0):
            for s in list(ok):
                if ka_stop.is_set():
                    break
                s.keepalive()

    ka = threading.Thread(target=keepalive_loop, daemon=True)
    ka.start()
    max_gap = 0.0
    late_start = 0.0
    last_iter = t_setup0
    ex = concurrent.futures.ThreadPoolExecutor(max_workers=setup_threads)
    for s in sessions:
        ex.submit(do_setup, s)
    try:
        while True:
            now = time.monotonic()
            while True:
                try:
                    item = ready.get_nowait()
                except queue.Empty:
                    break
                done += 1
                if isinstance(item, Exception):
                    errors.append(repr(item))
                else:
                    ok.append(item)
                    for tr in item.tracks:
                        sel.register(tr.rtp, selectors.EVENT_READ, tr.stats)
                        sel.register(tr.rtcp, selectors.EVENT_READ, None)
            if setup_s is None:
                if done == n:
                    setup_s = now - t_setup0
                    t_win0 = now + warmup
                    t_win1 = t_win0 + window
                elif now - t_setup0 > setup_timeout:
                    errors.append("setup timeout: %d/%d done" % (done, n))
                    break
            if meter is None and now >= t_win0:
                meter = benchutil.CpuMeter(server_pids)
                errs0 = benchutil.udp_errors()
                late_start = now - t_win0
            if meter is not None:
                max_gap = max(max_gap, now - last_iter)
            last_iter = now
            if now >= t_win1 + 0.05:
                cpu = meter.stop()
                errs1 = benchutil.udp_errors()
                break
            in_win = t_win0 <= now < t_win1
            if ok:
                if batch_s:
                    # let packets accumulate: at most ~1/batch_s wake-ups per
                    # second, many packets per wake-up (keeps the generator
                    # cheap, and at RT priority it does not preempt per packet)
                    time.sleep(batch_s)
                events = sel.select(timeout=0.02)
            else:
                time.sleep(0.005)
                events = ()
            now = time.monotonic()
            for key, _ in events:
                st = key.data
                if st is None:  # RTCP: drain and ignore
                    try:
                        while True:
                            key.fileobj.recv(2048)
                    except (BlockingIOError, InterruptedError):
                        pass
                    continue
                _drain_rtp(key.fileobj, st, buf, mv, now, in_win, t_win1)
    finally:
        ka_stop.set()
        ka.join(timeout=15)
        ex.shutdown(wait=True)
        while True:
            try:
                item = ready.get_nowait()
            except queue.Empty:
                break
            if not isinstance(item, Exception):
                ok.append(item)
        sel.close()
        t_td = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(setup_threads, 64)) as ex2:
            list(ex2.map(lambda s: s.teardown(), sessions))
        teardown_s = time.monotonic() - t_td
    # A receive loop that stalled for more than 0.5 s (generator starved by
    # an overloaded server) cannot measure: the trial fails, CPU is unknown.
    starved = max(max_gap, late_start) > 0.5
    if cpu is None or starved:
        cpu = {"sys_cpu_pct": float("nan"), "gen_cpu_pct": float("nan")}
        if server_pids:
            cpu["server_cpu_pct"] = float("nan")
        if errs0 is None:
            errs0 = errs1 = (0, 0)
    if starved:
        errors.append("generator stalled %.1f s (machine overloaded)" % max(max_gap, late_start))
    per = []  # one entry per session: worst track decides
    w_exp = w_late = 0
    late_max = 0.0
    silent = 0  # sessions with a track that received nothing in the window
    for s in ok:
        deliv, rate, wbytes, wlost, dups = 1.0, 1.0, 0, 0, 0
        for tr in s.tracks:
            st = tr.stats
            if st.fanout and st.w_seen:
                # holes in the window's range of sequence numbers are losses
                st.w_recv = len(st.w_seen)
                st.w_lost = max(st.w_seen) - min(st.w_seen) + 1 - st.w_recv
            exp = st.w_recv + st.w_lost
            deliv = min(deliv, st.w_recv / exp if exp else 0.0)
            w_exp += exp
            w_late += st.w_late
            late_max = max(late_max, st.w_late_max)
            if not st.w_recv:
                silent += 1
            if st.lag_first is not None and 0 in st.lag_last:
                rate = min(rate, 1.0 - (st.lag_last[0] - st.lag_first) / window)
            else:
                rate = 0.0
            wbytes += st.w_bytes
            wlost += st.w_lost
            dups += st.dups
        per.append((deliv, rate, wbytes, wlost, dups))
    n_ok = len(per)
    granted = sum(1 for s in ok if s.tracks and all(t.stats.fanout for t in s.tracks))
    passed = [p for p in per if p[0] >= min_delivery and p[1] >= min_rate]
    agg_mbps = sum(p[2] for p in per) * 8 / window / 1e6
    lost_pkts = sum(p[3] for p in per)
    bad_frac = (lost_pkts + w_late) / w_exp if w_exp else 1.0
    res = {
        "n": n,
        "established": n_ok,
        "setup_errors": len(errors),
        "setup_s": setup_s if setup_s is not None else float("nan"),
        "teardown_s": teardown_s,
        "sessions_ok": len(passed),
        "pass": trial_passes(n, n_ok, silent, lost_pkts, w_late, w_exp, max_bad, errors),
        "worst_delivery": min((p[0] for p in per), default=0.0),
        "worst_rate": min((p[1] for p in per), default=0.0),
        "lost_pkts": lost_pkts,
        "late_pkts": w_late,
        "expected_pkts": w_exp,
        "bad_frac": bad_frac,
        "late_max_ms": late_max * 1000.0,
        "agg_mbps": agg_mbps,
        "per_session_mbps": agg_mbps / n_ok if n_ok else 0.0,
        "rcvbuf_errors": errs1[0] - errs0[0],
        "fanout_granted": granted,
        **cpu,
    }
    if errors and verbose:
        print("  setup errors: %d, first: %s" % (len(errors), errors[:2]), flush=True)
    if verbose:
        print(
            "  trial N=%(n)d pass=%(pass)s ok=%(sessions_ok)d/%(n)d "
            "worst_delivery=%(worst_delivery).5f worst_rate=%(worst_rate).5f "
            "lost=%(lost_pkts)d late=%(late_pkts)d/%(expected_pkts)d bad=%(bad_frac).5f "
            "late_max_ms=%(late_max_ms).0f agg_mbps=%(agg_mbps).1f per_session_mbps=%(per_session_mbps).3f "
            "setup_s=%(setup_s).2f teardown_s=%(teardown_s).2f rcvbuf_errors=%(rcvbuf_errors)d "
            "gen_cpu=%(gen_cpu_pct).0f%% sys_cpu_tick=%(sys_cpu_pct).0f%%"
            % res
            + (" server_cpu=%.0f%%" % res["server_cpu_pct"] if "server_cpu_pct" in res else "")
            + (" fanout=%d/%d" % (granted, n_ok) if FANOUT else ""),
            flush=True,
        )
    return res


def wait_quiet(server_pids, baseline, limit_s=30.0):
    """After a trial, wait until the server's CPU is back near its idle
    baseline (<= baseline + 5 % of a core), so an overloaded trial does not
    spill into the next one.  Returns seconds waited."""
    if not server_pids:
        return 0.0
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        m = benchutil.CpuMeter(server_pids)
        time.sleep(0.5)
        if m.stop().get("server_cpu_pct", 0.0) <= baseline + 5.0:
            break
    return time.monotonic() - t0


def set_priority(mode):
    """Keep the load generator from being starved by the server under test."""
    if mode == "rt":
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
            return "SCHED_RR 1"
        except (OSError, AttributeError):
            mode = "nice"
    if mode == "nice":
        try:
            os.setpriority(os.PRIO_PROCESS, 0, -20)
            return "nice -20"
        except OSError:
            pass
    return "default"


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--url",
        required=True,
        action="append",
        help="(repeatable, added) session i connects to the (i mod count)-th URL",
    )
    ap.add_argument(
        "--teardown-timeout",
        type=float,
        default=3.0,
        help="(added) seconds a TEARDOWN may take (an overloaded server answers late)",
    )
    ap.add_argument(
        "--quiet-s",
        type=float,
        default=30.0,
        help="(added) ramp: wait at most this long for the server to go idle between trials",
    )
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument(
        "--ramp",
        action="store_true",
        help="search the largest N that passes (doubling, then bisection)",
    )
    ap.add_argument(
        "--first-track-only",
        action="store_true",
        help="SETUP only the first media track (default: all tracks)",
    )
    ap.add_argument("--start", type=int, default=8)
    ap.add_argument("--max", type=int, default=1024)
    ap.add_argument(
        "--resolution",
        type=float,
        default=0.1,
        help="stop bisection when (fail-pass) <= resolution*pass",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=100.0,
        help="ramp: stop starting new trials after this many seconds",
    )
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--window", type=float, default=8.0)
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between trials")
    ap.add_argument("--port-base", type=int, default=50000)
    ap.add_argument("--server-pid", type=int, action="append", default=[])
    ap.add_argument("--setup-threads", type=int, default=16)
    ap.add_argument("--min-delivery", type=float, default=0.999, help="(per-session diagnostic)")
    ap.add_argument("--min-rate", type=float, default=0.999, help="(per-session diagnostic)")
    ap.add_argument(
        "--max-bad",
        type=float,
        default=0.001,
        help="(added) a trial fails when more than this fraction of the window's packets "
        "were lost or late at the clients",
    )
    ap.add_argument(
        "--spread",
        type=float,
        default=0.0,
        help="(added) start session i at npt (i x 0.618 mod 1) x SPREAD s instead of 0",
    )
    ap.add_argument(
        "--growth",
        type=float,
        default=2.0,
        help="(added) ramp: the next N is N x GROWTH while trials pass",
    )
    ap.add_argument(
        "--late-ms",
        type=float,
        default=200.0,
        help="(added) a packet is late when it arrives this long after its scheduled send time",
    )
    ap.add_argument("--label", default="server")
    ap.add_argument(
        "--prio",
        choices=("rt", "nice", "none"),
        default="rt",
        help="rt (default; root only, else falls back to nice): run the "
        "generator SCHED_RR so a many-threaded server on a 2-core box "
        "cannot starve it (it then fails on its own merits); "
        "nice: nice -20; none: leave as is",
    )
    ap.add_argument(
        "--batch-ms",
        type=float,
        default=2.0,
        help="sleep before each poll so packets are read in batches",
    )
    ap.add_argument(
        "--fanout",
        action="store_true",
        help="(added) ask for Yima direct fan-out (x-yima-fanout); count receipt by sequence number",
    )
    a = ap.parse_args()
    global FANOUT, LATE_S, SPREAD, TEARDOWN_S
    FANOUT = a.fanout
    TEARDOWN_S = a.teardown_timeout
    SPREAD = a.spread
    LATE_S = a.late_ms / 1000.0
    print("  generator priority: %s" % set_priority(a.prio), flush=True)

    if not a.ramp:
        r = run_trial(
            a.url,
            a.sessions,
            a.warmup,
            a.window,
            a.port_base,
            a.server_pid,
            a.setup_threads,
            a.min_delivery,
            a.min_rate,
            not a.first_track_only,
            batch_s=a.batch_ms / 1000.0,
            max_bad=a.max_bad,
        )
        print(
            "RESULT rtsp label=%s sessions=%d pass=%s worst_delivery=%.5f worst_rate=%.5f "
            "agg_mbps=%.1f server_cpu_pct=%s gen_cpu_pct=%.0f sys_cpu_tick_pct=%.0f "
            "late_pkts=%d lost_pkts=%d expected_pkts=%d bad_frac=%.5f late_max_ms=%.0f"
            % (
                a.label,
                a.sessions,
                r["pass"],
                r["worst_delivery"],
                r["worst_rate"],
                r["agg_mbps"],
                "%.0f" % r["server_cpu_pct"] if "server_cpu_pct" in r else "na",
                r["gen_cpu_pct"],
                r["sys_cpu_pct"],
                r["late_pkts"],
                r["lost_pkts"],
                r["expected_pkts"],
                r["bad_frac"],
                r["late_max_ms"],
            ),
            flush=True,
        )
        return 0 if r["pass"] else 1

    t_start = time.monotonic()
    best = None
    fail_n = None
    n = a.start
    trials = 0

    def budget_left():
        return a.budget - (time.monotonic() - t_start)

    per_trial = a.warmup + a.window + a.pause + 2.0
    baseline = 0.0
    if a.server_pid:
        m = benchutil.CpuMeter(a.server_pid)
        time.sleep(1.0)
        baseline = m.stop().get("server_cpu_pct", 0.0)
        print("  server idle CPU: %.1f%%" % baseline, flush=True)
    # exponential phase
    while n <= a.max and budget_left() > per_trial:
        r = run_trial(
            a.url,
            n,
            a.warmup,
            a.window,
            a.port_base,
            a.server_pid,
            a.setup_threads,
            a.min_delivery,
            a.min_rate,
            not a.first_track_only,
            batch_s=a.batch_ms / 1000.0,
            max_bad=a.max_bad,
        )
        trials += 1
        time.sleep(a.pause)
        wait_quiet(a.server_pid, baseline, a.quiet_s)
        if r["pass"]:
            best = r
            n = max(n + 1, int(n * a.growth))
        else:
            fail_n = n
            break
    # bisection phase
    lo = best["n"] if best else 0
    while (
        fail_n is not None
        and budget_left() > per_trial
        and (fail_n - lo) > max(1, a.resolution * max(lo, 1))
    ):
        mid = (lo + fail_n) // 2
        if mid <= lo:
            break
        r = run_trial(
            a.url,
            mid,
            a.warmup,
            a.window,
            a.port_base,
            a.server_pid,
            a.setup_threads,
            a.min_delivery,
            a.min_rate,
            not a.first_track_only,
            batch_s=a.batch_ms / 1000.0,
            max_bad=a.max_bad,
        )
        trials += 1
        time.sleep(a.pause)
        wait_quiet(a.server_pid, baseline, a.quiet_s)
        if r["pass"]:
            best, lo = r, mid
        else:
            fail_n = mid
    # (added) how the ramp ended: converged (a passing N and the first failing one
    # within --resolution), capped (passed at --max: the limit was not found), or cut
    # by its time budget, which is a failure of the bench, not a lower bound
    lo = best["n"] if best else 0
    converged = fail_n is not None and (fail_n - lo) <= max(1, a.resolution * max(lo, 1))
    capped = fail_n is None and n > a.max
    cut = not converged and not capped
    ended = "budget_cut=%d capped=%d" % (cut, capped)
    if best is None:
        print(
            "RESULT rtsp label=%s max_sessions=0 first_fail=%s trials=%d %s"
            % (a.label, fail_n, trials, ended),
            flush=True,
        )
        return 1
    print(
        "RESULT rtsp label=%s max_sessions=%d first_fail=%s agg_mbps=%.1f "
        "per_session_mbps=%.3f server_cpu_pct=%s gen_cpu_pct=%.0f sys_cpu_tick_pct=%.0f "
        "trials=%d elapsed_s=%.0f late_pkts=%d lost_pkts=%d expected_pkts=%d bad_frac=%.5f "
        "late_max_ms=%.0f %s"
        % (
            a.label,
            best["n"],
            fail_n if fail_n is not None else ">%d" % best["n"],
            best["agg_mbps"],
            best["per_session_mbps"],
            "%.0f" % best["server_cpu_pct"] if "server_cpu_pct" in best else "na",
            best["gen_cpu_pct"],
            best["sys_cpu_pct"],
            trials,
            time.monotonic() - t_start,
            best["late_pkts"],
            best["lost_pkts"],
            best["expected_pkts"],
            best["bad_frac"],
            best["late_max_ms"],
            ended,
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
