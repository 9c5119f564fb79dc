#!/usr/bin/python3
# ruff: noqa
# Copied from /work/shared/peers/gst_rtsp_server.py (peer benchmark kit); see bench/peers/NOTE.md.
"""Peer RTSP VOD server: GStreamer gst-rtsp-server via Python GI.

Serves a pre-encoded MPEG-TS file as RTP/MP2T (payload type 33, 7 TS packets
= 1316 bytes per RTP packet) over RTP/UDP unicast.  Must run under the system
python3 (/usr/bin/python3) because python3-gi and gir1.2-gst-rtsp-server-1.0
come from Debian packages.

  /usr/bin/python3 gst_rtsp_server.py --file test.ts --port 8554 [--shared]

Mount point: rtsp://127.0.0.1:PORT/test
--shared   one pipeline fanned out to all clients (broadcast); default is one
           pipeline per client (video on demand, each client its own position).
"""

import argparse
import os
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
gi.require_version("GstRtsp", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", required=True)
    ap.add_argument("--address", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8554)
    ap.add_argument("--mount", default="/test")
    ap.add_argument("--shared", action="store_true")
    ap.add_argument("--udp-min", type=int, default=40000)
    ap.add_argument("--udp-max", type=int, default=49999)
    a = ap.parse_args()

    Gst.init(None)
    loop = GLib.MainLoop()
    server = GstRtspServer.RTSPServer()
    server.set_address(a.address)
    server.set_service(str(a.port))
    # One session per client; bounded pool of server-side UDP ports.
    pool = GstRtspServer.RTSPAddressPool()
    pool.add_range("127.0.0.1", "127.0.0.1", a.udp_min, a.udp_max, 0)
    factory = GstRtspServer.RTSPMediaFactory()
    path = os.path.abspath(a.file)
    # tsparse set-timestamps=true derives timestamps from the PCR so the
    # (synchronised) udp sink paces output at the stream's real-time rate.
    factory.set_launch(
        '( filesrc location="%s" ! tsparse set-timestamps=true '
        "! rtpmp2tpay name=pay0 pt=33 mtu=1400 )" % path
    )
    factory.set_shared(a.shared)
    factory.set_address_pool(pool)
    factory.set_protocols(GstRtsp.RTSPLowerTrans.UDP)
    server.get_mount_points().add_factory(a.mount, factory)
    if server.attach(None) == 0:
        print("gst_rtsp_server: attach failed (port in use?)", file=sys.stderr)
        sys.exit(1)

    # Periodically reap timed-out sessions.
    def cleanup():
        server.get_session_pool().cleanup()
        return True

    GLib.timeout_add_seconds(2, cleanup)

    def stop(*_):
        loop.quit()

    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, stop)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, stop)
    print(
        "gst_rtsp_server: rtsp://%s:%d%s shared=%s pid=%d"
        % (a.address, a.port, a.mount, a.shared, os.getpid()),
        flush=True,
    )
    loop.run()


if __name__ == "__main__":
    main()
