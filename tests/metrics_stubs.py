"""Stand-in instance /metrics endpoints for the autoscaler's tests (unit and cluster): a fixed body, one
that drips a byte at a time for ever, one of 10 MB; each served by a threaded HTTP server."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from typing import Any


class Metrics(http.server.BaseHTTPRequestHandler):
    """Answers every GET with ``body``; subclasses set another."""

    body = b"berth_running_requests 0\nberth_waiting_requests 0\n"  # idle

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


class Drip(Metrics):
    """Headers, then one byte every 0.2 s for as long as the client stays."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        try:
            while True:
                self.wfile.write(b"#")
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass


class Huge(Metrics):
    """10 MB of comment before the gauge."""

    body = b"# " + b"x" * (10 << 20) + b"\nberth_running_requests 1\n"

    def do_GET(self) -> None:
        with contextlib.suppress(OSError):  # the reader hangs up at its size cap
            super().do_GET()


def serve(
    handler: type[http.server.BaseHTTPRequestHandler], host: str = "127.0.0.1", port: int = 0
) -> http.server.ThreadingHTTPServer:
    """``handler`` on ``host:port`` (0: a free port) in a daemon thread; the caller shuts it down."""
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
