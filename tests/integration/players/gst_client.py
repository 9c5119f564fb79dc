"""A GStreamer RTSP client for the player tests (run by the system python3 with PyGObject).

``gst_client.py URL OUT.json [--tcp] [--seek SECONDS] [--timeout SECONDS]``: plays URL
with ``playbin`` (``rtspsrc`` inside, forced to TCP interleaved or UDP) into fakesinks,
optionally seeks once (flushing, to the key unit) at the first decoded buffer, and
writes what it saw as JSON: the stream time and the MD5 (I420) of every decoded
video frame after the seek, the number of audio sample frames, whether EOS came, and any error.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import gi

gi.require_version("Gst", "1.0")
from gi.repository import GLib, Gst  # noqa: E402


def main(argv: list[str]) -> None:
    url, out = argv[1], argv[2]
    tcp = "--tcp" in argv
    seek = float(argv[argv.index("--seek") + 1]) if "--seek" in argv else None
    timeout = int(argv[argv.index("--timeout") + 1]) if "--timeout" in argv else 40
    Gst.init(None)
    play = Gst.ElementFactory.make("playbin")
    play.set_property("uri", url)
    seen: dict = {
        "video": [],
        "video_md5": [],
        "audio_frames": 0,
        "eos": False,
        "error": None,
        "seek_ok": None,
    }
    state = {"seeked": seek is None}

    def source_setup(_pb: Gst.Element, src: Gst.Element) -> None:
        src.set_property("protocols", 4 if tcp else 1)  # GST_RTSP_LOWER_TRANS_TCP / _UDP
        src.set_property("latency", 500)

    def handoff(_sink: Gst.Element, buf: Gst.Buffer, pad: Gst.Pad, kind: str) -> None:
        if not state["seeked"]:
            state["seeked"] = True
            GLib.idle_add(do_seek)
            return
        if kind == "video":
            ok, info = buf.map(Gst.MapFlags.READ)
            if ok:
                seen["video_md5"].append(hashlib.md5(info.data).hexdigest())
                buf.unmap(info)
            t = buf.pts
            ev = pad.get_sticky_event(Gst.EventType.SEGMENT, 0)
            if ev is not None and t != Gst.CLOCK_TIME_NONE:
                t = ev.parse_segment().to_stream_time(Gst.Format.TIME, t)
            seen["video"].append(None if t == Gst.CLOCK_TIME_NONE else t / Gst.SECOND)
        else:
            t = buf.pts
            ev = pad.get_sticky_event(Gst.EventType.SEGMENT, 0)
            if ev is not None and t != Gst.CLOCK_TIME_NONE:
                t = ev.parse_segment().to_stream_time(Gst.Format.TIME, t)
            if t != Gst.CLOCK_TIME_NONE:
                seen.setdefault("audio_first", t / Gst.SECOND)
                seen["audio_last"] = t / Gst.SECOND
            caps = pad.get_current_caps()
            st = caps.get_structure(0) if caps is not None else None
            ok, channels = st.get_int("channels") if st is not None else (False, 0)
            fmt = st.get_string("format") if st is not None else None
            width = {"S16LE": 2, "S16BE": 2, "F32LE": 4, "S32LE": 4, "S24LE": 3}.get(fmt, 4)
            seen["audio_frames"] += buf.get_size() // max(1, width * (channels if ok else 1))

    def do_seek() -> bool:
        seen["video"], seen["video_md5"], seen["audio_frames"] = [], [], 0
        seen.pop("audio_first", None)
        flags = Gst.SeekFlags.FLUSH | Gst.SeekFlags.KEY_UNIT
        seen["seek_ok"] = play.seek_simple(Gst.Format.TIME, flags, int(seek * Gst.SECOND))
        return False

    for kind in ("video", "audio"):
        # Video as I420 (what ffmpeg's framemd5 hashes for these clips), so frames can be
        # told apart by content, whatever timestamps the player gives them.
        conv = "videoconvert ! video/x-raw,format=I420" if kind == "video" else "identity"
        sink_bin = Gst.parse_bin_from_description(
            f"{conv} ! fakesink name=sink sync=true signal-handoffs=true", True
        )
        sink_bin.get_by_name("sink").connect("handoff", handoff, kind)
        play.set_property(f"{kind}-sink", sink_bin)
    play.connect("source-setup", source_setup)
    loop = GLib.MainLoop()
    bus = play.get_bus()
    bus.add_signal_watch()

    def on_message(_bus: Gst.Bus, msg: Gst.Message) -> None:
        if msg.type == Gst.MessageType.EOS:
            seen["eos"] = True
            loop.quit()
        elif msg.type == Gst.MessageType.ERROR:
            seen["error"] = str(msg.parse_error()[0].message)
            loop.quit()

    bus.connect("message", on_message)
    GLib.timeout_add_seconds(timeout, loop.quit)
    play.set_state(Gst.State.PLAYING)
    loop.run()
    with open(out, "w") as f:
        json.dump(seen, f)
    # No orderly NULL state: rtspsrc may wait on the TEARDOWN of an ended stream.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
