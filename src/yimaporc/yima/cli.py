"""``yimaporc media ...`` and ``yimaporc disks ...`` (CONTRACT §3)."""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .._cliutil import CliError, print_json
from ..admin.client import AdminClient, AdminError, await_continue

UPLOAD_CHUNK = 1 << 20


class _Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int, label: str, stream: IO[str] | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.started = time.monotonic()

    def update(self, done: int) -> None:
        """Redraw with ``done`` bytes sent."""
        if not self.enabled:
            return
        frac = min(done / self.total, 1.0)
        width = 30
        bar = "#" * int(frac * width)
        rate = done / max(time.monotonic() - self.started, 1e-6) / 1e6
        self.stream.write(f"\r{self.label} [{bar:<{width}}] {frac * 100:5.1f}% {rate:7.1f} MB/s")
        self.stream.flush()

    def close(self, message: str = "") -> None:
        """End the line."""
        if self.enabled:
            self.stream.write(f"\r{message:<79}\r" if message else "\n")
            self.stream.flush()


def upload(
    client: AdminClient,
    path: str,
    query: dict[str, str],
    source: Path,
    progress: Callable[[int], None] | None = None,
) -> Any:
    """POST ``source`` as the raw body of ``path?query``; the decoded JSON answer."""
    url = urllib.parse.urlsplit(client.base_url)
    conn_type = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    size = source.stat().st_size
    conn = conn_type(url.hostname or "", url.port, timeout=client.timeout)
    target = f"{url.path}{path}?{urllib.parse.urlencode(query)}"
    try:
        conn.putrequest("POST", target)
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(size))
        conn.putheader("Accept", "application/json")
        if client.token:
            conn.putheader("Authorization", "Bearer " + client.token)
        # The node judges token and size from the head: wait for its go-ahead (or its
        # refusal) before streaming the file.
        conn.putheader("Expect", "100-continue")
        conn.endheaders()
        early = await_continue(conn)
        if early is not None:
            status, raw = early
        else:
            sent = 0
            with source.open("rb") as f:
                while chunk := f.read(UPLOAD_CHUNK):
                    conn.send(chunk)
                    sent += len(chunk)
                    if progress is not None:
                        progress(sent)
            resp = conn.getresponse()
            status, raw = resp.status, resp.read()
    except OSError as e:
        raise AdminError(f"cannot reach {client.base_url}: {e}") from e
    finally:
        conn.close()
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise AdminError(f"{client.base_url} answered with something that is not JSON") from e
    if status != 200:
        message = doc.get("error", raw.decode("utf-8", "replace")) if isinstance(doc, dict) else doc
        raise AdminError(f"{message} (HTTP {status})")
    return doc


def _json(args: argparse.Namespace, doc: Any) -> bool:
    """With ``--json``: print ``doc`` as JSON and return True (the caller prints nothing)."""
    if getattr(args, "json", False):
        print_json(doc)
        return True
    return False


def _cli_error(message: str) -> Exception:
    return CliError(message)


def _cmd_ingest(args: argparse.Namespace) -> int:
    source = Path(args.file)
    if not source.is_file():
        raise _cli_error(f"{source}: no such file")
    name = args.name or source.stem
    query = {"name": name}
    if args.block_size is not None:
        if args.block_size <= 0:
            raise _cli_error("--block-size must be positive")
        query["block_size"] = str(args.block_size)
    if args.parity_group is not None:
        if args.parity_group < 0:
            raise _cli_error("--parity-group must be 0 (no parity) or more")
        query["parity_group"] = str(args.parity_group)
    if args.opaque:
        query["opaque"] = "1"
    client = args.make_client(args)
    size = source.stat().st_size
    bar = _Progress(size, f"ingest {name}")
    started = time.monotonic()
    try:
        doc = upload(client, "/api/yima/media", query, source, bar.update)
    finally:
        bar.close()
    seconds = max(time.monotonic() - started, 1e-9)
    if _json(args, doc):
        return 0
    parity = f", parity groups of {doc['parity_group']}" if doc["parity_group"] else ""
    print(
        f"ingested {doc['name']}: {doc['kind']}, {doc['bytes']} bytes in {doc['blocks']} blocks "
        f"of {doc['block_size']}{parity}, {doc['bytes'] / seconds / 1e6:.1f} MB/s"
    )
    if doc.get("message"):
        print(doc["message"])
    for warning in doc.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    doc = args.make_client(args, mutating=False).get("/api/yima/media")
    if _json(args, doc):
        return 0
    if not doc["media"]:
        print("no media")
    for m in doc["media"]:
        duration = f"{m['duration']:.2f}s" if m.get("duration") is not None else "-"
        flag = "streamable" if m["streamable"] else "not-streamable"
        print(
            f"{m['name']} {m['kind']} {m['size']} bytes {m['blocks']} blocks "
            f"{duration} seed {m['seed']} {flag}"
        )
    return 0


def _cmd_get(args: argparse.Namespace) -> int:
    client = args.make_client(args)
    media = {m["name"]: m for m in client.get("/api/yima/media")["media"]}
    info = media.get(args.name)
    if info is None:
        raise _cli_error(f"no such media: {args.name}")
    out = Path(args.out)
    with out.open("wb") as f:
        for i in range(info["blocks"]):
            q = urllib.parse.urlencode({"name": args.name, "index": i})
            f.write(base64.b64decode(client.get(f"/api/yima/block?{q}")["data"]))
    written = {"name": args.name, "out": str(out), "bytes": out.stat().st_size}
    if not _json(args, written):
        print(f"wrote {out} ({written['bytes']} bytes)")
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    doc = args.make_client(args).post("/api/yima/media/delete", {"name": args.name})
    if not _json(args, doc):
        missed = doc["blocks_not_reached"]
        print(f"removed {doc['name']}: {doc['blocks_deleted']} blocks deleted" +
              (f", {missed} on nodes not reached (left as orphans)" if missed else ""))  # fmt: skip
    return 0


def _print_move(doc: dict[str, Any]) -> None:
    mb = doc["bytes"] / 1e6
    rate = mb / doc["copy_seconds"] if doc["copy_seconds"] > 0 else 0.0
    print(f"copied {mb:.1f} MB in {doc['copy_seconds']:.2f}s ({rate:.1f} MB/s)")
    print(doc["summary"])


def _cmd_disks_add(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"path": os.path.abspath(args.path)}
    if args.node:
        body["node"] = args.node
    if args.capacity is not None:
        body["capacity"] = args.capacity
    if args.rate is not None:
        body["rate"] = args.rate
    doc = args.make_client(args).post("/api/yima/disks", body)
    if _json(args, doc):
        return 0
    print(f"added disk {doc['disk_id']}")
    _print_move(doc)
    return 0


def _cmd_disks_remove(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"disk_id": args.disk_id}
    if args.rate is not None:
        body["rate"] = args.rate
    doc = args.make_client(args).post("/api/yima/disks/remove", body)
    if _json(args, doc):
        return 0
    print(f"removed disk {args.disk_id}")
    _print_move(doc)
    return 0


def _cmd_disks_list(args: argparse.Namespace) -> int:
    doc = args.make_client(args, mutating=False).get("/api/status")
    if _json(args, {"disks": doc.get("disks", [])}):
        return 0
    for d in doc.get("disks", []):
        cap = d["capacity"] if d["capacity"] is not None else "-"
        print(f"{d['disk_id']} node {d['node_id']} {d['path']} capacity {cap} blocks {d['blocks']}")
    return 0


def _cmd_disks_rebuild(args: argparse.Namespace) -> int:
    doc = args.make_client(args).post("/api/yima/rebuild", {"disk_id": args.disk_id})
    if _json(args, doc):
        return 0
    print(f"rebuilt {doc['disk_id']}: restored {doc['restored']} blocks, {doc['present']} intact")
    if doc.get("lost"):
        names = ", ".join(doc.get("unprotected", []))
        print(f"lost {doc['lost']} blocks of files ingested without parity: {names}")
    return 0


def register(
    sub: Any, make_client: Callable[..., AdminClient], admin: argparse.ArgumentParser
) -> None:
    """Add ``media`` and ``disks`` to the ``yimaporc`` command."""

    def parser(group: Any, name: str, help: str, func: Callable[..., int]) -> Any:
        p = group.add_parser(name, parents=[admin], help=help)
        p.set_defaults(func=func, make_client=make_client)
        return p

    media = sub.add_parser("media", help="Yima media files")
    msub = media.add_subparsers(dest="media_command", metavar="COMMAND")
    msub.required = True
    p = parser(msub, "ingest", "store a file (MPEG-TS, WAV or opaque)", _cmd_ingest)
    p.add_argument("file", metavar="FILE")
    p.add_argument("--name", help="media name (default: the file name without extension)")
    p.add_argument(
        "--block-size",
        type=int,
        metavar="BYTES",
        help="block size (MPEG-TS rounds to 1316-byte RTP payloads; "
        "default 336896 for MPEG-TS, 262144 otherwise)",
    )
    p.add_argument(
        "--parity-group",
        type=int,
        metavar="G",
        help="data blocks per parity block (default: up to 4, as the disks allow; "
        "0: no parity - fewest moves on scaling, no protection against a lost disk)",
    )
    p.add_argument(
        "--opaque",
        action="store_true",
        help="store the file as opaque blocks even if it cannot be streamed "
        "(without it, such a file is refused and the command exits non-zero)",
    )
    parser(msub, "list", "list stored media", _cmd_list)
    p = parser(msub, "get", "download a stored file block by block", _cmd_get)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--out", required=True, metavar="FILE")
    p = parser(
        msub, "rm", "delete a stored file's blocks everywhere and its catalog entry", _cmd_rm
    )
    p.add_argument("name", metavar="NAME")

    disks = sub.add_parser("disks", help="Yima disks (online scaling)")
    dsub = disks.add_subparsers(dest="disks_command", metavar="COMMAND")
    dsub.required = True
    p = parser(dsub, "add", "add a disk and move blocks onto it", _cmd_disks_add)
    p.add_argument("path", metavar="PATH")
    p.add_argument("--node", metavar="ID", help="node that owns PATH (default: the --admin node)")
    p.add_argument("--capacity", type=int, metavar="BYTES")
    p.add_argument("--rate", type=float, metavar="BYTES_PER_S", help="move pace")
    p = parser(dsub, "remove", "move a disk's blocks away and stop using it", _cmd_disks_remove)
    p.add_argument("disk_id", metavar="DISK_ID")
    p.add_argument("--rate", type=float, metavar="BYTES_PER_S", help="move pace")
    parser(dsub, "list", "list the cluster's disks", _cmd_disks_list)
    p = parser(dsub, "rebuild", "restore a replaced disk's blocks from parity", _cmd_disks_rebuild)
    p.add_argument("disk_id", metavar="DISK_ID")
