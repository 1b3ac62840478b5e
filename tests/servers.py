"""HTTP servers for tests: real ones, on 127.0.0.1, in a thread of the test process.

`ShardServer` serves a folder with Range support, logs every request and injects the faults the
reliability tests need (cut bodies, 503s, resets, servers that ignore Range); without faults it is the
plain file server the other tests use, through `serving`.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path


class ShardServer(http.server.ThreadingHTTPServer):
    """A real HTTP/1.1 server on 127.0.0.1 serving `root`, with Range support and injectable faults.

    - `cuts[path] = n`: the next n responses for `path` send `cut_bytes` of their body, then drop the
      connection (Content-Length still says the full size, so the client sees a short body).
    - `stop_at[path] = offset`: every response for `path` stops at that absolute byte (a shard that can
      never be read to its end).
    - `fail[path] = n`: the next n requests get `503 Service Unavailable`.
    - `ignore_range`: answer 200 with the whole file to Range requests, as some servers do.
    - `reset`: drop connections with a TCP RST instead of a FIN.
    Every request is logged as (path, Range header or None, time).
    """

    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _ShardHandler)
        self.root = root
        self.lock = threading.Lock()
        self.log: list[tuple[str, str | None, float]] = []
        self.cuts: dict[str, int] = {}
        self.cut_bytes = 2500  # not a multiple of 512: the cut lands inside a tar member
        self.stop_at: dict[str, int] = {}
        self.fail: dict[str, int] = {}
        self.ignore_range = False
        self.reset = False
        self.after_cut: dict[str, Callable[[], None]] = {}  # path -> run once after its first cut

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def requests_for(self, path: str) -> list[str | None]:
        return [rng for p, rng, _ in self.log if p == path]


class _ShardHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ShardServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        srv, path = self.server, self.path
        rng = self.headers.get("Range")
        with srv.lock:
            srv.log.append((path, rng, time.monotonic()))
            failing = srv.fail.get(path, 0) > 0
            if failing:
                srv.fail[path] -= 1
            cut = not failing and srv.cuts.get(path, 0) > 0
            if cut:
                srv.cuts[path] -= 1
        if failing:
            self.send_error(503)
            return
        file = srv.root / path.lstrip("/")
        if not file.is_file():
            self.send_error(404)
            return
        content = file.read_bytes()
        start = 0
        if rng and not srv.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
        body = content[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"' + hashlib.sha256(content).hexdigest()[:16] + '"')
        self.end_headers()
        limit = len(body)
        if cut:
            limit = min(limit, srv.cut_bytes)
        if path in srv.stop_at:
            limit = min(limit, max(0, srv.stop_at[path] - start))
        self.wfile.write(body[:limit])
        self.wfile.flush()
        if limit < len(body):
            self.close_connection = True
            if srv.reset:  # SO_LINGER 0: close() sends RST, as a dropped link or a killed proxy does
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            hook = srv.after_cut.pop(path, None)
            if hook is not None:
                hook()


@contextlib.contextmanager
def serving(root: Path) -> Iterator[ShardServer]:
    """A `ShardServer` for `root`, running until the block ends; its `url` ends with a slash."""
    srv = ShardServer(root)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
