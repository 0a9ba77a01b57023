"""
A hostile agent: a raw client of the link protocol, written from docs/protocol.md alone.

It builds frames by hand and uses nothing of the project's own multiplexer or control-message
code, so it can send what a correct implementation never would: frames out of order, control
messages with wrong types, floods, and it can simply never read.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Frame types (docs/protocol.md section 4).
HELLO, DATA, OPEN, WINDOW, RESET, PING, GOAWAY, CONTROL = range(8)
ACK = FIN = 0x1
MAGIC = b"TUNL"
LINK_ALPN = "tunnel/1"
DOMAIN = "tunnel.localhost"


def frame(kind: int, stream: int = 0, payload: bytes = b"", flags: int = 0) -> bytes:
    """One frame: a 24-bit length, type, flags, 32-bit stream id, then the payload."""
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def hello_frame(
    settings: dict[int, int] | None = None, versions: tuple[int, int] = (1, 1)
) -> bytes:
    """The HELLO frame: magic, min/max version, then (id, value) settings."""
    body = MAGIC + bytes(versions)
    for ident, value in (settings or {}).items():
        body += struct.pack(">HI", ident, value)
    return frame(HELLO, 0, body)


def control_frame(message: dict[str, Any] | bytes) -> bytes:
    """A CONTROL frame carrying `message` (a dict is JSON-encoded; bytes are sent as given)."""
    payload = message if isinstance(message, bytes) else json.dumps(message).encode()
    return frame(CONTROL, 0, payload)


def agent_hello(token: str | None = None) -> dict[str, Any]:
    return {"type": "hello", "version": 1, "token": token, "agent": "rawlink"}


@dataclass(frozen=True)
class Frame:
    kind: int
    flags: int
    stream: int
    payload: bytes

    def json(self) -> dict[str, Any]:
        """The control message a CONTROL frame carries."""
        assert self.kind == CONTROL, self
        value: dict[str, Any] = json.loads(self.payload)
        return value


class RawLink:
    """
    One TLS connection to the relay with ALPN ``tunnel/1`` (blocking socket), and frames sent
    and read by hand.
    """

    def __init__(
        self,
        port: int,
        ca: Path,
        *,
        host: str = "127.0.0.1",
        server_name: str = DOMAIN,
        timeout: float = 10.0,
        rcvbuf: int | None = None,
    ) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Set before connecting, so the advertised TCP window is small too.
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(timeout)
        try:
            raw.connect((host, port))
            ctx = ssl.create_default_context(cafile=str(ca))
            ctx.set_alpn_protocols([LINK_ALPN])
            self.sock = ctx.wrap_socket(raw, server_hostname=server_name)
        except BaseException:
            raw.close()
            raise
        self._buf = b""

    # -- sending -------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def try_send(self, data: bytes, deadline: float) -> int:
        """
        Send as much of `data` as the relay accepts before `deadline` (monotonic); returns the
        octets sent. Stops early when the connection ends.
        """
        sent = 0
        view = memoryview(data)
        while sent < len(data) and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, min(0.5, deadline - time.monotonic())))
            try:
                sent += self.sock.send(view[sent : sent + 65536])
            except (TimeoutError, ssl.SSLWantWriteError):
                continue
            except OSError:
                break
        return sent

    def handshake(self, token: str | None = None) -> dict[str, Any]:
        """HELLO, the ``hello`` control message; returns the relay's answer (welcome/error)."""
        self.send(hello_frame() + control_frame(agent_hello(token)))
        return self.control()

    def request(self, request_id: int, kind: str = "tls", **members: Any) -> dict[str, Any]:
        """Send a ``tunnel_request``; returns the relay's answer (granted/refused)."""
        message = {"type": "tunnel_request", "request_id": request_id, "kind": kind, **members}
        self.send(control_frame(message))
        return self.control()

    # -- reading -------------------------------------------------------------------------------

    def recv_frame(self, timeout: float = 10.0) -> Frame | None:
        """The next frame, or None when the relay closed the connection."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self._buf) >= 9:
                length = int.from_bytes(self._buf[:3], "big")
                if len(self._buf) >= 9 + length:
                    kind, flags, stream = struct.unpack(">BBI", self._buf[3:9])
                    payload = self._buf[9 : 9 + length]
                    self._buf = self._buf[9 + length :]
                    return Frame(kind, flags, stream, payload)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no complete frame in time")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except (ConnectionResetError, ssl.SSLError):
                return None
            if not data:
                return None
            self._buf += data

    def control(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next control message (frames of other types are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            f = self.recv_frame(max(0.01, deadline - time.monotonic()))
            if f is None:
                raise ConnectionError("the relay closed the link")
            if f.kind == CONTROL:
                return f.json()

    def until_closed(self, timeout: float = 10.0) -> list[Frame]:
        """Every frame until the relay closes the connection (fails at `timeout`)."""
        frames = []
        deadline = time.monotonic() + timeout
        while True:
            f = self.recv_frame(max(0.01, deadline - time.monotonic()))
            if f is None:
                return frames
            frames.append(f)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def goaway_code(frames: list[Frame]) -> int | None:
    """The error code of the first GOAWAY among `frames`, if any."""
    for f in frames:
        if f.kind == GOAWAY:
            return int.from_bytes(f.payload[4:8], "big")
    return None
