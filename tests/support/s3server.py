"""A real S3-protocol server on loopback (moto's server mode) and a fault-injecting proxy."""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERROR_BODY = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
              "<Message>{message}</Message></Error>")
FAULTS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "denied": (403, "AccessDenied", "Access Denied"),
    "badkey": (403, "InvalidAccessKeyId",
               "The AWS Access Key Id you provided does not exist in our records."),
}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class FaultProxy:
    """HTTP proxy in front of the S3 server. ``inject(key_part, faults, on)`` makes the next
    requests of the kinds in ``on`` (``GET`` an object, ``LIST``, ``PUT``) whose path contains
    ``key_part`` fail, one fault each: ``slowdown`` (503), ``internal`` (500), ``reset``
    (connection dropped), ``denied`` or ``badkey`` (403); ``deny`` makes one fail for good.
    ``requests`` counts every request by method, ``served_faults`` every fault served."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.faults: dict[tuple[str, str], list[str]] = {}
        self.sticky: dict[tuple[str, str], str] = {}
        self.requests: Counter = Counter()
        self.log: list[tuple[str, str]] = []  # (method, path) of every request
        self.served_faults: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy._next_fault(self.command, self.path)
                if fault == "reset":
                    # RST instead of FIN: the client sees a connection reset mid-request.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if fault:
                    status, code, message = FAULTS[fault]
                    data = ERROR_BODY.format(code=code, message=message).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in HOP_BY_HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                # A HEAD answer carries the object's length, not the (empty) body's.
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def inject(self, key_part: str, faults: list[str], on: tuple[str, ...] = ("GET",)) -> None:
        with self.lock:
            for op in on:
                self.faults[op, key_part] = list(faults)

    def deny(self, key_part: str, on: tuple[str, ...] = ("GET",), kind: str = "denied") -> None:
        with self.lock:
            for op in on:
                self.sticky[op, key_part] = kind

    def _next_fault(self, method: str, path: str) -> str | None:
        with self.lock:
            self.requests[method] += 1
            self.log.append((method, path))
            op = "LIST" if method == "GET" and "list-type=" in path else method
            for (on, part), kind in self.sticky.items():
                if on == op and part in path:
                    self.served_faults.append((path, kind))
                    return kind
            for (on, part), queue in self.faults.items():
                if on == op and part in path and queue:
                    kind = queue.pop(0)
                    self.served_faults.append((path, kind))
                    return kind
        return None

    def reset(self) -> None:
        with self.lock:
            self.faults.clear()
            self.sticky.clear()
            self.requests.clear()
            self.log.clear()
            self.served_faults.clear()

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
