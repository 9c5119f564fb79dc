"""The group-commit journal: one append and one ``fdatasync`` per group of stores.

A group's index rows are committed to SQLite without SQLite's own fsync
(``synchronous=NORMAL``) and its bodies are written to their files without an
fsync each; what makes the group durable is one record appended to this
journal, holding everything needed to redo it (the rows as committed, the
bodies), and one ``fdatasync`` of the journal file.  Only then are the callers
told (SMTP 250).  A *checkpoint* later (off any caller's path) makes the files
and databases themselves durable, then drops the journal files it covered;
:func:`read_records` gives recovery what a crash may have lost.

Record framing (big-endian)::

    b"YPJ1" | payload length u32 | seq u64 | crc32(payload) u32 | payload
    payload = header length u32 | header (JSON) | body bytes, one after another

A torn or corrupt tail (a crash mid-append) ends the journal: the record it
belongs to was never acknowledged.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

MAGIC = b"YPJ1"
_FRAME = struct.Struct("!4sIQI")
_U32 = struct.Struct("!I")
SUFFIX = ".journal"


@attrs.frozen
class Entry:
    """One committed message of a group, as the index has it."""

    bucket: int
    user: str
    mailbox: str
    uidvalidity: int
    key: str
    uid: int  # 0: an unnumbered (pending) row
    flags: str
    internal_date: float
    body: bytes


@attrs.frozen
class Record:
    """One group."""

    seq: int
    entries: tuple[Entry, ...]


def encode(record: Record) -> bytes:
    """The framed bytes of ``record``."""
    header = json.dumps(
        [
            [
                e.bucket,
                e.user,
                e.mailbox,
                e.uidvalidity,
                e.key,
                e.uid,
                e.flags,
                e.internal_date,
                len(e.body),
            ]
            for e in record.entries
        ],
        separators=(",", ":"),
    ).encode()
    payload = b"".join([_U32.pack(len(header)), header, *(e.body for e in record.entries)])
    return _FRAME.pack(MAGIC, len(payload), record.seq, zlib.crc32(payload)) + payload


def decode_all(data: bytes) -> Iterator[Record]:
    """Every whole, intact record of ``data``, in order; stops at the first bad one."""
    pos = 0
    while pos + _FRAME.size <= len(data):
        magic, size, seq, crc = _FRAME.unpack_from(data, pos)
        start = pos + _FRAME.size
        payload = data[start : start + size]
        if magic != MAGIC or len(payload) != size or zlib.crc32(payload) != crc:
            return
        try:
            record = _payload(seq, payload)
        except (ValueError, TypeError, IndexError, struct.error):
            return
        yield record
        pos = start + size


def _payload(seq: int, payload: bytes) -> Record:
    (hlen,) = _U32.unpack_from(payload, 0)
    rows: list[list[Any]] = json.loads(payload[4 : 4 + hlen])
    pos = 4 + hlen
    entries = []
    for bucket, user, mailbox, uidvalidity, key, uid, flags, date, size in rows:
        body = payload[pos : pos + size]
        if len(body) != size:
            raise ValueError("short body")
        pos += size
        entries.append(
            Entry(
                int(bucket),
                str(user),
                str(mailbox),
                int(uidvalidity),
                str(key),
                int(uid),
                str(flags),
                float(date),
                body,
            )
        )
    return Record(seq, tuple(entries))


def read_records(directory: Path) -> list[tuple[Path, list[Record]]]:
    """Each journal file of ``directory`` (oldest first) with its intact records."""
    out = []
    for path in sorted(directory.glob("*" + SUFFIX)):
        out.append((path, list(decode_all(path.read_bytes()))))
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """The append side: thread-safe; :meth:`append` returns once the record is durable."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._number = max((int(p.stem) for p in self.dir.glob("*" + SUFFIX)), default=0)
        #: Appends and fdatasyncs made (tests, ``/metrics``).
        self.appends = 0
        self.syncs = 0
        #: Bytes and records in the current file (for checkpoint decisions).
        self.size = 0
        self.records = 0

    def _open_next(self) -> None:
        self._number += 1
        self._path = self.dir / f"{self._number:012d}{SUFFIX}"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _fsync_dir(self.dir)  # the new file's name is durable before any record in it
        self.syncs += 1
        self.size = 0
        self.records = 0

    def append(self, record: Record) -> None:
        """Append ``record`` and fdatasync: durable when this returns."""
        data = encode(record)
        with self._lock:
            if self._fd is None:
                self._open_next()
            assert self._fd is not None
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fdatasync(self._fd)
            self.appends += 1
            self.syncs += 1
            self.size += len(data)
            self.records += 1

    def rotate(self) -> list[Path]:
        """Close the current file (later appends go to a new one); the closed files,
        whose records a checkpoint now covers."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            done = sorted(self.dir.glob("*" + SUFFIX))
            self.size = 0
            self.records = 0
        return done

    def close(self) -> None:
        """Close the current file."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
