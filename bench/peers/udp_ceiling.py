#!/usr/bin/env python3
# ruff: noqa
# Copied from /work/shared/peers/udp_ceiling.py (peer benchmark kit); see bench/peers/NOTE.md.
"""Loopback UDP ceiling for RTP-sized datagrams (1316 B = 7 x 188 B MPEG-TS)
from Python itself: one sender process -> one receiver process, each pinned
to its own core, unthrottled, for --duration seconds after --warmup.

  python3 udp_ceiling.py [--stack raw|asyncio|twisted|all] [--duration 5]

raw      blocking socket.send / recv_into loops (the floor of Python overhead)
asyncio  DatagramProtocol + transport.sendto batches / datagram_received
twisted  twisted.internet.protocol.DatagramProtocol, transport.write batches /
         datagramReceived (needs: pip install twisted)
Reports sent and received packets/s, received payload Mbit/s, loss, and the
CPU% of each side.  Last line per stack: RESULT udp stack=... rx_pps=...
"""

import argparse
import multiprocessing as mp
import os
import socket
import sys
import time

PAYLOAD = 1316


def pin(cpu):
    try:
        n = os.cpu_count() or 1
        os.sched_setaffinity(0, {cpu % n})
    except (AttributeError, OSError):
        pass


def cpu_now():
    t = os.times()
    return t.user + t.system


# ----------------------------------------------------------------- receivers
def recv_raw(port, t_w0, t_w1, t_end, q):
    pin(1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 8 << 20)
    s.bind(("127.0.0.1", port))
    s.settimeout(0.2)
    q.put(("ready", s.getsockname()[1]))
    buf = bytearray(2048)
    n = nb = 0
    c0 = None
    while True:
        try:
            k = s.recv_into(buf)
        except socket.timeout:
            k = 0
        now = time.monotonic()
        if now >= t_end:
            break
        if t_w0 <= now < t_w1:
            if c0 is None:
                c0 = cpu_now()
            if k:
                n += 1
                nb += k
        elif now >= t_w1 and c0 is not None and not isinstance(c0, tuple):
            c0 = (c0, cpu_now())
    c = c0[1] - c0[0] if isinstance(c0, tuple) else float("nan")
    q.put(("rx", n, nb, c))


def recv_asyncio(port, t_w0, t_w1, t_end, q):
    import asyncio

    pin(1)
    st = {"n": 0, "nb": 0, "c0": None, "c1": None}

    class P(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            now = time.monotonic()
            if t_w0 <= now < t_w1:
                st["n"] += 1
                st["nb"] += len(data)

    async def main():
        loop = asyncio.get_running_loop()
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 8 << 20)
        s.bind(("127.0.0.1", port))
        tr, _ = await loop.create_datagram_endpoint(P, sock=s)
        q.put(("ready", s.getsockname()[1]))
        await asyncio.sleep(max(0, t_w0 - time.monotonic()))
        st["c0"] = cpu_now()
        await asyncio.sleep(max(0, t_w1 - time.monotonic()))
        st["c1"] = cpu_now()
        await asyncio.sleep(max(0, t_end - time.monotonic()))
        tr.close()

    asyncio.run(main())
    q.put(("rx", st["n"], st["nb"], st["c1"] - st["c0"]))


def recv_twisted(port, t_w0, t_w1, t_end, q):
    from twisted.internet import reactor
    from twisted.internet.protocol import DatagramProtocol

    pin(1)
    st = {"n": 0, "nb": 0, "c0": None, "c1": None}

    class P(DatagramProtocol):
        def datagramReceived(self, data, addr):
            now = time.monotonic()
            if t_w0 <= now < t_w1:
                st["n"] += 1
                st["nb"] += len(data)

    p = reactor.listenUDP(port, P(), interface="127.0.0.1", maxPacketSize=2048)
    p.socket.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 8 << 20)
    q.put(("ready", p.getHost().port))
    reactor.callLater(max(0, t_w0 - time.monotonic()), lambda: st.__setitem__("c0", cpu_now()))
    reactor.callLater(max(0, t_w1 - time.monotonic()), lambda: st.__setitem__("c1", cpu_now()))
    reactor.callLater(max(0, t_end - time.monotonic()), reactor.stop)
    reactor.run()
    q.put(("rx", st["n"], st["nb"], st["c1"] - st["c0"]))


# ------------------------------------------------------------------- senders
def send_raw(port, t_w0, t_w1, t_stop, q):
    pin(0)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", port))
    data = b"\x80\x21" + bytes(PAYLOAD - 2)
    n = 0
    c0 = c1 = None
    send = s.send
    while True:
        for _ in range(256):
            try:
                send(data)
            except OSError:
                pass
        now = time.monotonic()
        if now >= t_stop:
            break
        if t_w0 <= now < t_w1:
            if c0 is None:
                c0 = cpu_now()
            n += 256
        elif now >= t_w1 and c1 is None and c0 is not None:
            c1 = cpu_now()
    q.put(("tx", n, c1 - c0 if c0 is not None and c1 is not None else float("nan")))


def send_asyncio(port, t_w0, t_w1, t_stop, q):
    import asyncio

    pin(0)
    st = {"n": 0}

    async def main():
        loop = asyncio.get_running_loop()
        tr, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=("127.0.0.1", port)
        )
        data = b"\x80\x21" + bytes(PAYLOAD - 2)
        c0 = c1 = None
        while True:
            for _ in range(256):
                tr.sendto(data)
            now = time.monotonic()
            if now >= t_stop:
                break
            if t_w0 <= now < t_w1:
                if c0 is None:
                    c0 = cpu_now()
                st["n"] += 256
            elif now >= t_w1 and c1 is None and c0 is not None:
                c1 = cpu_now()
            await asyncio.sleep(0)  # let the loop flush / run callbacks
        tr.close()
        return c1 - c0

    c = asyncio.run(main())
    q.put(("tx", st["n"], c))


def send_twisted(port, t_w0, t_w1, t_stop, q):
    from twisted.internet import reactor
    from twisted.internet.protocol import DatagramProtocol

    pin(0)
    st = {"n": 0, "c0": None, "c1": None}
    data = b"\x80\x21" + bytes(PAYLOAD - 2)
    proto = DatagramProtocol()
    reactor.listenUDP(0, proto, interface="127.0.0.1")
    proto.transport.connect("127.0.0.1", port)

    def batch():
        w = proto.transport.write
        for _ in range(256):
            try:
                w(data)
            except Exception:  # noqa: BLE001
                pass
        now = time.monotonic()
        if now >= t_stop:
            reactor.stop()
            return
        if t_w0 <= now < t_w1:
            if st["c0"] is None:
                st["c0"] = cpu_now()
            st["n"] += 256
        elif now >= t_w1 and st["c1"] is None and st["c0"] is not None:
            st["c1"] = cpu_now()
        reactor.callLater(0, batch)

    reactor.callWhenRunning(batch)
    reactor.run()
    q.put(("tx", st["n"], st["c1"] - st["c0"]))


# --- added for yimaporc's bench (not in the shared kit): unconnected sendto,
# and UDP GSO (UDP_SEGMENT): one sendto of up to 48 x 1316 B that the kernel
# splits into 1316-byte datagrams.  The receiver is the raw one.
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
GSO_SEGS = 48  # 48 x 1316 = 63168 B < 64 KB


def _send_loop(sock, dest, data, per_call, t_w0, t_w1, t_stop, q):
    n = 0
    c0 = c1 = None
    sendto = sock.sendto
    err = None
    while True:
        for _ in range(16):
            try:
                sendto(data, dest)
            except OSError as e:
                err = e
        now = time.monotonic()
        if now >= t_stop:
            break
        if t_w0 <= now < t_w1:
            if c0 is None:
                c0 = cpu_now()
            n += 16 * per_call
        elif now >= t_w1 and c1 is None and c0 is not None:
            c1 = cpu_now()
    if n == 0 and err is not None:
        print("sender error: %r" % err, file=sys.stderr, flush=True)
    q.put(("tx", n, c1 - c0 if c0 is not None and c1 is not None else float("nan")))


def send_sendto(port, t_w0, t_w1, t_stop, q):
    pin(0)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    data = b"\x80\x21" + bytes(PAYLOAD - 2)
    _send_loop(s, ("127.0.0.1", port), data, 1, t_w0, t_w1, t_stop, q)


def send_gso(port, t_w0, t_w1, t_stop, q):
    pin(0)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, PAYLOAD)
    except OSError as e:
        print("UDP_SEGMENT not supported: %r" % e, file=sys.stderr, flush=True)
        q.put(("tx", 0, float("nan")))
        return
    data = (b"\x80\x21" + bytes(PAYLOAD - 2)) * GSO_SEGS
    _send_loop(s, ("127.0.0.1", port), data, GSO_SEGS, t_w0, t_w1, t_stop, q)


STACKS = {
    "raw": (send_raw, recv_raw),
    "asyncio": (send_asyncio, recv_asyncio),
    "twisted": (send_twisted, recv_twisted),
    "sendto": (send_sendto, recv_raw),
    "gso": (send_gso, recv_raw),
}


def run(stack, port, warmup, duration):
    sender, receiver = STACKS[stack]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    base = time.monotonic() + 1.0
    t_w0 = base + warmup
    t_w1 = t_w0 + duration
    t_stop = t_w1 + 0.3
    t_end = t_stop + 0.5
    r = ctx.Process(target=receiver, args=(port, t_w0, t_w1, t_end, q))
    r.start()
    tag, port = q.get(timeout=10)
    assert tag == "ready"
    s = ctx.Process(target=sender, args=(port, t_w0, t_w1, t_stop, q))
    s.start()
    res = {}
    for _ in range(2):
        m = q.get(timeout=duration + warmup + 30)
        res[m[0]] = m
    s.join()
    r.join()
    tx_n, tx_cpu = res["tx"][1], res["tx"][2]
    rx_n, rx_b, rx_cpu = res["rx"][1], res["rx"][2], res["rx"][3]
    out = {
        "stack": stack,
        "tx_pps": tx_n / duration,
        "rx_pps": rx_n / duration,
        "rx_mbps": rx_b * 8 / duration / 1e6,
        "loss_pct": 100.0 * max(0, tx_n - rx_n) / tx_n if tx_n else float("nan"),
        "tx_cpu_pct": 100.0 * tx_cpu / duration,
        "rx_cpu_pct": 100.0 * rx_cpu / duration,
    }
    print(
        "RESULT udp stack=%(stack)s payload=1316 tx_pps=%(tx_pps).0f rx_pps=%(rx_pps).0f "
        "rx_mbps=%(rx_mbps).0f loss_pct=%(loss_pct).1f tx_cpu_pct=%(tx_cpu_pct).0f "
        "rx_cpu_pct=%(rx_cpu_pct).0f" % out,
        flush=True,
    )
    return out


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--stack", default="all", choices=("all",) + tuple(STACKS))
    ap.add_argument("--port", type=int, default=0, help="0 = any free port")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=5.0)
    a = ap.parse_args()
    stacks = list(STACKS) if a.stack == "all" else [a.stack]
    for st in stacks:
        run(st, a.port, a.warmup, a.duration)
        time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
