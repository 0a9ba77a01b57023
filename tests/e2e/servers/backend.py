"""
Local servers that e2e tests put behind a tunnel (stdlib only, one process per server).

    python backend.py http [--root DIR]   HTTP/1.1 keep-alive server:
        GET /hello          a small text body
        GET /file/NAME      the bytes of DIR/NAME
        POST /sha256        replies with the sha256 (hex) of the request body
        GET /ws             websocket upgrade, then echoes every frame (text or binary)
    python backend.py echo                raw TCP echo (until EOF, then close)
    python backend.py proxy               raw TCP: reads a PROXY protocol header (version 1
                                          or 2), replies ``proxy vN SRC SPORT DST DPORT`` (or
                                          ``proxy vN UNKNOWN``) and a newline, then echoes
    python backend.py sink [--reply N] [--read-delay S] [--length-prefixed]
                                          raw TCP: read to EOF, reply with the sha256 (hex) of
                                          what was read and a newline, then N bytes
                                          (the digest repeated), then close. --read-delay: a
                                          slow reader (S seconds between 64 KiB reads).
                                          --length-prefixed: read an 8-byte big-endian length,
                                          then that many bytes, instead of reading to EOF
    python backend.py send --file PATH    raw TCP: send the file's bytes on connect, close

Each binds 127.0.0.1 on a free port and prints ``listening on PORT`` as its first line.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import socket
import socketserver
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class HTTPHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    root = "."

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            self._websocket()
        elif self.path.startswith("/hello"):
            self._reply(200, f"hello {self.path}\n".encode())
        elif self.path.startswith("/file/"):
            path = os.path.join(self.root, os.path.basename(self.path[len("/file/") :]))
            if not os.path.isfile(path):
                self._reply(404, b"no such file\n")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(os.path.getsize(path)))
            self.end_headers()
            with open(path, "rb") as f:
                shutil.copyfileobj(f, self.wfile, 1 << 20)
        else:
            self._reply(404, b"not found\n")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        digest = hashlib.sha256()
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            length -= len(chunk)
        self._reply(200, (digest.hexdigest() + "\n").encode())

    def _websocket(self) -> None:
        key = self.headers["Sec-WebSocket-Key"].encode()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        while True:
            frame = read_ws_frame(self.rfile)
            if frame is None:
                return
            opcode, payload = frame
            if opcode == 0x8:  # close: answer it and end
                self.wfile.write(ws_frame(0x8, payload[:2]))
                self.wfile.flush()
                return
            if opcode in (0x1, 0x2):
                self.wfile.write(ws_frame(opcode, payload))
                self.wfile.flush()


def read_exact(f, n: int) -> bytes | None:  # type: ignore[no-untyped-def]
    data = b""
    while len(data) < n:
        chunk = f.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def read_ws_frame(f) -> tuple[int, bytes] | None:  # type: ignore[no-untyped-def]
    head = read_exact(f, 2)
    if head is None:
        return None
    opcode = head[0] & 0x0F
    masked = head[1] & 0x80
    length = head[1] & 0x7F
    if length == 126:
        ext = read_exact(f, 2)
        if ext is None:
            return None
        (length,) = struct.unpack("!H", ext)
    elif length == 127:
        ext = read_exact(f, 8)
        if ext is None:
            return None
        (length,) = struct.unpack("!Q", ext)
    mask = read_exact(f, 4) if masked else b"\0\0\0\0"
    payload = read_exact(f, length)
    if mask is None or payload is None:
        return None
    if masked:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return opcode, payload


def ws_frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final frame; masked when `mask` (4 bytes) is given (client to server)."""
    head = bytes([0x80 | opcode])
    bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        head += mask
    return head + payload


class TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while True:
            data = sock.recv(1 << 16)
            if not data:
                break
            sock.sendall(data)


class ProxyHandler(socketserver.BaseRequestHandler):
    V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

    def handle(self) -> None:
        sock: socket.socket = self.request
        f = sock.makefile("rb")
        first = read_exact(f, 12)
        if first is None:
            return
        if first == self.V2_SIGNATURE:
            head = read_exact(f, 4)
            assert head is not None
            command, family, length = struct.unpack("!BBH", head)
            body = read_exact(f, length) or b""
            if command != 0x21 or family not in (0x11, 0x21):
                line = "proxy v2 UNKNOWN"
            else:
                n = 4 if family == 0x11 else 16
                src = socket.inet_ntop(socket.AF_INET if n == 4 else socket.AF_INET6, body[:n])
                dst = socket.inet_ntop(
                    socket.AF_INET if n == 4 else socket.AF_INET6, body[n : 2 * n]
                )
                sport, dport = struct.unpack("!HH", body[2 * n : 2 * n + 4])
                line = f"proxy v2 {src} {sport} {dst} {dport}"
        else:
            rest = f.readline(107)
            fields = (first + rest).decode("ascii").rstrip("\r\n").split(" ")
            if fields[:2] == ["PROXY", "UNKNOWN"]:
                line = "proxy v1 UNKNOWN"
            else:
                _, _, src, dst, sport, dport = fields
                line = f"proxy v1 {src} {sport} {dst} {dport}"
        sock.sendall(line.encode() + b"\n")
        while True:
            data = f.read1(1 << 16)
            if not data:
                break
            sock.sendall(data)


class SinkHandler(socketserver.BaseRequestHandler):
    reply = 0
    read_delay = 0.0
    length_prefixed = False

    def handle(self) -> None:
        sock: socket.socket = self.request
        digest = hashlib.sha256()
        left = -1
        if self.length_prefixed:
            header = b""
            while len(header) < 8:
                data = sock.recv(8 - len(header))
                if not data:
                    return
                header += data
            (left,) = struct.unpack("!Q", header)
        while left != 0:
            data = sock.recv(1 << 16 if left < 0 else min(left, 1 << 16))
            if not data:
                break
            digest.update(data)
            if left > 0:
                left -= len(data)
            if self.read_delay:
                time.sleep(self.read_delay)
        hexdigest = digest.hexdigest().encode()
        sock.sendall(hexdigest + b"\n")
        left = self.reply
        block = hexdigest * 1024
        while left > 0:
            n = min(left, len(block))
            sock.sendall(block[:n])
            left -= n


class SendHandler(socketserver.BaseRequestHandler):
    path = ""

    def handle(self) -> None:
        sock: socket.socket = self.request
        with open(self.path, "rb") as f:
            sock.sendfile(f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["http", "echo", "proxy", "sink", "send"])
    parser.add_argument("--root", default=".")
    parser.add_argument("--reply", type=int, default=0)
    parser.add_argument("--read-delay", type=float, default=0.0)
    parser.add_argument("--length-prefixed", action="store_true")
    parser.add_argument("--file", default="")
    args = parser.parse_args()
    # Room for a burst of concurrent connections (the listen backlog).
    socketserver.TCPServer.request_queue_size = 512
    server: socketserver.TCPServer
    if args.mode == "http":
        HTTPHandler.root = args.root
        ThreadingHTTPServer.daemon_threads = True
        server = ThreadingHTTPServer(("127.0.0.1", 0), HTTPHandler)
    elif args.mode == "echo":
        server = TCPServer(("127.0.0.1", 0), EchoHandler)
    elif args.mode == "proxy":
        server = TCPServer(("127.0.0.1", 0), ProxyHandler)
    elif args.mode == "sink":
        SinkHandler.reply = args.reply
        SinkHandler.read_delay = args.read_delay
        SinkHandler.length_prefixed = args.length_prefixed
        server = TCPServer(("127.0.0.1", 0), SinkHandler)
    else:
        SendHandler.path = args.file
        server = TCPServer(("127.0.0.1", 0), SendHandler)
    print(f"listening on {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
