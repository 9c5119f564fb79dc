"""The control channel between a node's main process and its delivery workers.

AMP commands over the child's stdin/stdout (see :mod:`.workers` for the design):
the main process sends :class:`WorkerSetup`, :class:`WorkerStart`,
:class:`WorkerControl`, :class:`WorkerNack`, :class:`WorkerClock` and
:class:`WorkerState`; a worker asks :class:`WorkerBlockPath` and
:class:`WorkerBlockSpool`.  An adoption carries a session's scheduler state as
:data:`STATE_FIELDS` (:func:`session_state`, :func:`apply_state`).
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.protocols import amp

from .schedule import Session
from .streaming import StreamControl, StreamNack

__all__ = [
    "STATE_FIELDS",
    "STATE_PAGE",
    "WorkerBlockPath",
    "WorkerBlockSpool",
    "WorkerClock",
    "WorkerControl",
    "WorkerNack",
    "WorkerSetup",
    "WorkerStart",
    "WorkerState",
    "apply_state",
    "session_state",
]

#: Sessions per :class:`WorkerState` answer (an AMP value holds at most 64 KiB).
STATE_PAGE = 200


# --- values that do not fit one AMP value ----------------------------------------------


class _Packed(amp.Argument):
    """A sequence of numbers packed with ``struct`` over as many keys as needed
    (``name``, ``name.1``, ...; an AMP value holds at most 64 KiB)."""

    CHUNK = 8000

    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.fmt = fmt

    def toBox(self, name: bytes, strings: dict[bytes, bytes], objects: Any, proto: Any) -> None:
        values = list(objects[name.decode()])
        parts = [values[i : i + self.CHUNK] for i in range(0, len(values), self.CHUNK)] or [[]]
        for i, part in enumerate(parts):
            key = name if i == 0 else name + b".%d" % i
            strings[key] = struct.pack(f"!{len(part)}{self.fmt}", *part)

    def fromBox(self, name: bytes, strings: dict[bytes, bytes], objects: Any, proto: Any) -> None:
        size = struct.calcsize(self.fmt)
        out: list[Any] = []
        i = 0
        while True:
            key = name if i == 0 else name + b".%d" % i
            raw = strings.get(key)
            if raw is None:
                break
            out.extend(struct.unpack(f"!{len(raw) // size}{self.fmt}", raw))
            i += 1
        objects[name.decode()] = out


# --- the control channel ---------------------------------------------------------------


class WorkerSetup(amp.Command):
    """First message to a worker: how to send, how much to cache, the clock."""

    commandName = b"yima.worker-setup"
    arguments = [
        (b"index", amp.Integer()),
        (b"send_path", amp.Unicode()),
        (b"send_ahead", amp.Float()),
        (b"cache_bytes", amp.Integer()),
        (b"offset", amp.Float()),
        # Rows of the shared board on fd 4 (workerboard.py); none: no board.
        (b"board_rows", amp.Integer(optional=True)),
    ]
    response = [(b"pid", amp.Integer()), (b"path", amp.Unicode())]


class WorkerStart(amp.Command):
    """Serve ``blocks`` of a media for a session (a start, a seek, or an adoption)."""

    commandName = b"yima.worker-start"
    arguments = [
        (b"session", amp.Unicode()),
        (b"generation", amp.Integer()),
        (b"media", amp.Unicode()),
        (b"size", amp.Integer()),
        (b"block_size", amp.Integer()),
        (b"block_starts", _Packed("d")),
        (b"duration", amp.Float()),
        (b"payload", amp.Integer()),
        (b"clock_rate", amp.Integer()),
        (b"blocks", _Packed("I")),
        (b"start_ct", amp.Float()),
        (b"start_mt", amp.Float()),
        (b"host", amp.Unicode()),
        (b"port", amp.Integer()),
        (b"ssrc", amp.Integer()),
        (b"seq_base", amp.Integer()),
        (b"ts_base", amp.Integer()),
        (b"node_index", amp.Integer()),
        (b"offset", amp.Float()),
        # An adoption (the owner died): the whole scheduler state to go on from.
        (b"state", amp.ListOf(amp.Float(), optional=True)),
        # StreamStart's ``batch``: seconds of a relayed session's packets sent at once.
        (b"batch", amp.Float(optional=True)),
    ]
    response = [(b"packets", amp.Integer())]


class WorkerControl(amp.Command):
    """StreamControl for a session of this worker."""

    commandName = b"yima.worker-control"
    # StreamControl's arguments plus the cluster clock offset
    arguments = [*StreamControl.arguments, (b"offset", amp.Float())]
    response = StreamControl.response


class WorkerNack(amp.Command):
    """StreamNack for a session of this worker."""

    commandName = b"yima.worker-nack"
    arguments = StreamNack.arguments
    response = StreamNack.response


class WorkerClock(amp.Command):
    """The cluster clock offset, and the main process's heartbeat (no answer)."""

    commandName = b"yima.worker-clock"
    arguments = [(b"offset", amp.Float())]
    requiresAnswer = False


class WorkerState(amp.Command):
    """The worker's counters and a page of its sessions' cursors; the clock offset."""

    commandName = b"yima.worker-state"
    arguments = [(b"start", amp.Integer()), (b"offset", amp.Float())]
    response = [
        (
            b"sessions",
            amp.AmpList(
                [
                    (b"session", amp.Unicode()),
                    (b"generation", amp.Integer()),
                    (b"cursor_block", amp.Integer()),
                    (b"cursor_packet", amp.Integer()),
                    (b"node_seq", amp.Integer()),
                ]
            ),
        ),
        (b"next", amp.Integer()),
        (b"counters", amp.AmpList([(b"name", amp.Unicode()), (b"value", amp.Integer())])),
    ]


class WorkerBlockPath(amp.Command):
    """(worker -> main) Where block ``index`` of ``media`` lies on this node's disks."""

    commandName = b"yima.worker-block-path"
    arguments = [(b"media", amp.Unicode()), (b"index", amp.Integer())]
    response = [(b"paths", amp.ListOf(amp.Unicode()))]


class WorkerBlockSpool(amp.Command):
    """(worker -> main) Read the block for me (no local copy): the spool file to read."""

    commandName = b"yima.worker-block-spool"
    arguments = [(b"media", amp.Unicode()), (b"index", amp.Integer())]
    response = [(b"path", amp.Unicode())]


#: The scheduler state an adoption carries (:attr:`WorkerStart.state`), in this order.
STATE_FIELDS = (
    "anchor_ct",
    "anchor_mt",
    "speed",
    "paused",
    "pause_mt",
    "cursor_block",
    "cursor_packet",
    "node_seq",
)


def session_state(s: Session) -> list[float]:
    """``s``'s scheduler state as :data:`STATE_FIELDS` (numbers)."""
    return [float(getattr(s, f)) for f in STATE_FIELDS]


def apply_state(s: Session, state: list[float]) -> None:
    """Put :func:`session_state`'s numbers back into ``s``."""
    anchor_ct, anchor_mt, speed, paused, pause_mt, block, packet, node_seq = state
    s.anchor_ct, s.anchor_mt, s.speed = anchor_ct, anchor_mt, speed
    s.paused, s.pause_mt = bool(paused), pause_mt
    s.cursor_block, s.cursor_packet, s.node_seq = int(block), int(packet), int(node_seq)
