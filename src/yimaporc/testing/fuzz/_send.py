"""Getting inputs to a node fast: many asyncio connections in flight, datagrams paced.

A *job* is one TCP connection carrying one or more mutated inputs, written in
the segments the mutator chose, then ended one of three ways: read the answers
until the node goes quiet, close at once, or reset (SO_LINGER 0).  Worker ``w``
always connects from ``source_address(w)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Sequence

import attrs

from ._lab import source_address
from ._seeds import MEDIA, SCOPE, SCOPE_ARGS, SESSION_PLACEHOLDER, amp_box

IDLE = 0.3  # a node silent this long after our last byte has answered all it will
MAX_READ = 4 << 20


@attrs.frozen
class Job:
    """One connection's worth of fuzz: ``chunks`` written in order, then ``ending``."""

    inputs: int
    chunks: tuple[bytes, ...]
    ending: str = "read"  # "read" | "close" | "reset"
    #: an exchange before the chunks: "amp-auth" completes the cluster RPC handshake
    #: (needs the key); "rtsp-session" SETUPs and puts the real session id wherever
    #: the chunks say ``SESSION_PLACEHOLDER``
    prelude: str = ""

    @property
    def data(self) -> bytes:
        """All bytes of the job."""
        return b"".join(self.chunks)


@attrs.define
class Sent:
    """What a run of jobs did: counters, and which slot ran each job."""

    counters: Counter[str] = attrs.field(factory=Counter)
    slot_of_job: list[int] = attrs.field(factory=list)


async def _read_amp_box(reader: asyncio.StreamReader) -> dict[bytes, bytes]:
    box: dict[bytes, bytes] = {}
    while True:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
        if n == 0:
            return box
        key = await reader.readexactly(n)
        (m,) = struct.unpack("!H", await reader.readexactly(2))
        box[key] = await reader.readexactly(m)


async def _amp_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rpc_key: bytes
) -> None:
    """The client side of ``yimaporc.hello``/``prove`` (see cluster/rpc.py)."""
    nonce, me = os.urandom(32), "fuzz"
    writer.write(amp_box(b"yimaporc.hello", 1, node_id=me.encode(), nonce=nonce, **SCOPE_ARGS))
    answer = await _read_amp_box(reader)
    theirs = answer[b"nonce"]
    where = f"{SCOPE.kind}\0{SCOPE.cluster}".encode("ascii")
    msg = b"client|" + where + b"|" + theirs + b"|" + nonce + b"|" + me.encode()
    proof = hmac.new(rpc_key, msg, hashlib.sha256).digest()
    writer.write(amp_box(b"yimaporc.prove", 2, proof=proof))
    done = await _read_amp_box(reader)
    if b"_answer" not in done:
        raise ConnectionError(f"handshake refused: {done!r:.100}")


async def _rtsp_session(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, url: str
) -> bytes:
    """SETUP over interleaved TCP as ffmpeg does; the Session id the node gave."""
    writer.write(
        f"SETUP {url} RTSP/1.0\r\nCSeq: 1\r\nTransport: RTP/AVP/TCP;unicast;interleaved=0-1\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"session:"):
            return line.split(b":", 1)[1].split(b";")[0].strip()
    raise ConnectionError(f"SETUP refused: {head[:60]!r}")


async def _one(
    host: str, port: int, slot: int, job: Job, counters: Counter[str], rpc_key: bytes
) -> None:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, local_addr=(source_address(slot), 0)), 5
    )
    counters["connections"] += 1
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        chunks = job.chunks
        if job.prelude == "amp-auth":
            await asyncio.wait_for(_amp_handshake(reader, writer, rpc_key), 5)
        elif job.prelude == "rtsp-session":
            url = f"rtsp://{host}:{port}/{MEDIA}"
            sid = await asyncio.wait_for(_rtsp_session(reader, writer, url), 5)
            chunks = tuple(c.replace(SESSION_PLACEHOLDER, sid) for c in chunks)
        for chunk in chunks:
            writer.write(chunk)
            counters["bytes_sent"] += len(chunk)
            if len(chunks) > 1:
                await asyncio.wait_for(writer.drain(), 5)
                await asyncio.sleep(0)
        await asyncio.wait_for(writer.drain(), 5)
        if job.ending == "read":
            total, deadline = 0, time.monotonic() + 3
            while total < MAX_READ and time.monotonic() < deadline:
                data = await asyncio.wait_for(reader.read(65536), IDLE)
                if not data:
                    counters["closed_by_node"] += 1
                    break
                total += len(data)
                counters["bytes_received"] += len(data)  # also when the idle timeout ends it
    except TimeoutError:
        counters["idle_end"] += 1
    finally:
        if job.ending == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1)


async def _run_jobs(
    host: str, port: int, jobs: Sequence[Job], workers: int, rpc_key: bytes
) -> Sent:
    sent = Sent(slot_of_job=[-1] * len(jobs))
    it = iter(enumerate(jobs))

    async def worker(slot: int) -> None:
        for index, job in it:
            sent.slot_of_job[index] = slot
            try:
                await _one(host, port, slot, job, sent.counters, rpc_key)
            except TimeoutError:
                sent.counters["timeouts"] += 1
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
                sent.counters["error_" + type(e).__name__] += 1
            sent.counters["inputs"] += job.inputs

    await asyncio.gather(*(worker(w) for w in range(workers)))
    return sent


def run_jobs(host: str, port: int, jobs: Sequence[Job], workers: int, rpc_key: bytes = b"") -> Sent:
    """Run ``jobs`` against ``host:port`` with ``workers`` connections in flight."""
    return asyncio.run(_run_jobs(host, port, jobs, workers, rpc_key))


def send_datagrams(
    host: str, port: int, datagrams: Sequence[bytes], rate: float, workers: int
) -> Sent:
    """Send ``datagrams`` to ``host:port`` at about ``rate`` per second from ``workers`` sources."""
    sent = Sent(slot_of_job=[-1] * len(datagrams))
    socks = []
    for w in range(max(1, min(workers, 16))):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((source_address(w), 0))
        socks.append(s)
    pause = threading.Event()
    start = time.monotonic()
    try:
        for i, data in enumerate(datagrams):
            slot = i % len(socks)
            sent.slot_of_job[i] = slot
            ahead = start + i / rate - time.monotonic()
            if ahead > 0.002:
                pause.wait(ahead)
            try:
                socks[slot].sendto(data, (host, port))
                sent.counters["bytes_sent"] += len(data)
            except OSError as e:
                sent.counters["error_" + type(e).__name__] += 1
            sent.counters["inputs"] += 1
    finally:
        for s in socks:
            s.close()
    return sent
