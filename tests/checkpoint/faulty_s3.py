"""An HTTP proxy in front of the S3 server that can stop answering in the middle of a save, hold
uploads back, or refuse some.

It forwards every request to the real server until a PUT whose path contains `trigger` has been
answered; from then on it drops every connection unanswered, as a stopped server would, until
`up()`. PUTs whose path contains `hold` wait until `release()` (a store that is slow for as long
as the test wants); PUTs whose path contains `refuse` are answered 403 AccessDenied, as a bucket
policy would. The store behind it keeps its objects, so a later run sees what was committed
before.
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te",
               "trailer", "upgrade", "expect"}


class FaultyS3:
    def __init__(self, upstream: str, trigger: str = "(never)", *, hold: str = "(never)",
                 refuse: str = "(never)", hold_timeout_s: float = 300):
        self.upstream = urlsplit(upstream).netloc
        self.trigger, self.hold, self.refuse = trigger, hold, refuse
        self.down = False
        self.dropped = 0
        self.held: list[tuple[str, float]] = []  # (path, when it was let through) of held PUTs
        self.refused: list[str] = []
        self._released = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                body = self._body()
                if proxy.down:
                    proxy.dropped += 1
                    self.close_connection = True
                    self.connection.close()
                    return
                if self.command == "PUT" and proxy.refuse in self.path:
                    proxy.refused.append(self.path)
                    denied = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied"
                              b"</Code><Message>Access Denied</Message></Error>")
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(denied)))
                    self.end_headers()
                    self.wfile.write(denied)
                    return
                if self.command == "PUT" and proxy.hold in self.path:
                    proxy._released.wait(hold_timeout_s)
                    proxy.held.append((self.path, time.monotonic()))
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in _HOP_BY_HOP}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response_only(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                length = response.getheader("Content-Length")
                self.send_header("Content-Length",
                                 length if self.command == "HEAD" and length else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()
                if self.command == "PUT" and proxy.trigger in self.path:
                    proxy.down = True

            def _body(self) -> bytes | None:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    chunks = []
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def up(self) -> None:
        self.down = False

    def release(self) -> None:
        """Let the held PUTs (and any later ones) through."""
        self._released.set()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
