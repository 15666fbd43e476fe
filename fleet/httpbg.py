"""One background HTTP server for the fleet's small endpoints (artifact store, manager /metrics, demo webhook).

A ``ThreadingHTTPServer`` on its own daemon thread, polling for shutdown every ``SHUTDOWN_POLL_S`` so that a
SIGTERM'd manager stops promptly (http.server's default poll is 0.5 s).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

SHUTDOWN_POLL_S = 0.05


class BackgroundHTTPServer:
    """``start()`` serves ``handler`` on (host, port) in a daemon thread named ``name``; ``stop()`` shuts it down."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str, port: int, name: str):
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.host, self.port = str(self.httpd.server_address[0]), int(self.httpd.server_address[1])
        self._name = name
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(SHUTDOWN_POLL_S,), name=self._name,
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
