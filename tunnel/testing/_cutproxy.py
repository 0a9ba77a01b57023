"""
A loopback TCP proxy for link-cut tests, run in a thread of the test process.

    proxy = CutProxy(upstream_port)        # listens on 127.0.0.1:<proxy.port>
    proxy.cut()        # stop forwarding on every current connection, keep the sockets open
                       # (a black hole: no FIN, no RST), and refuse new connections
    proxy.heal()       # accept and forward new connections again (cut ones stay frozen)
    proxy.kill_all()   # reset every connection (RST on both sides) at once
    proxy.close()      # stop the thread, close everything

Only loopback addresses are ever used. Everything runs on one selector thread; the public
methods hand work to it and wait (with a deadline) until it is done.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

LOOPBACK = "127.0.0.1"
_CHUNK = 1 << 16
#: Bytes buffered per direction before the proxy stops reading that side.
_MAX_BUFFER = 1 << 20


@dataclass(eq=False)
class _Pair:
    client: socket.socket
    upstream: socket.socket
    #: The port of the upstream socket: the peer port the upstream server sees.
    upstream_local_port: int
    frozen: bool = False
    to_upstream: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    client_eof: bool = False
    upstream_eof: bool = False


def _rst(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0) instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class CutProxy:
    def __init__(self, upstream_port: int, upstream_host: str = LOOPBACK) -> None:
        assert upstream_host in (LOOPBACK, "::1", "localhost")
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._pairs: list[_Pair] = []
        self._frozen: list[_Pair] = []
        self._refusing = False
        self._calls: list[tuple[Callable[[], object], threading.Event]] = []
        self._lock = threading.Lock()
        self._stop = False
        #: Connections accepted (and forwarded) so far.
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, name="cutproxy", daemon=True)
        self._thread.start()

    # -- control (from the test thread) ------------------------------------------------------

    def _call(self, fn: Callable[[], object], timeout: float = 10.0) -> None:
        done = threading.Event()
        with self._lock:
            self._calls.append((fn, done))
        self._wake_w.send(b"x")
        if not done.wait(timeout):
            raise AssertionError("the cut proxy did not answer in time")

    def cut(self) -> list[int]:
        """
        Freeze every connection (sockets held open, nothing forwarded, nothing read) and
        refuse new ones. Returns the upstream-side local ports of the frozen connections.
        """
        ports: list[int] = []

        def do() -> None:
            self._refusing = True
            for pair in self._pairs:
                pair.frozen = True
                for s in (pair.client, pair.upstream):
                    with contextlib.suppress(KeyError, ValueError):
                        self._sel.unregister(s)
                self._frozen.append(pair)
                ports.append(pair.upstream_local_port)
            self._pairs.clear()

        self._call(do)
        return ports

    def heal(self) -> None:
        """Forward new connections again (frozen ones stay frozen until `close`)."""

        def do() -> None:
            self._refusing = False

        self._call(do)

    def kill_all(self) -> list[int]:
        """Reset every live connection on both sides; returns their upstream-side ports."""
        ports: list[int] = []

        def do() -> None:
            for pair in list(self._pairs):
                ports.append(pair.upstream_local_port)
                self._drop(pair, rst=True)

        self._call(do)
        return ports

    def live(self) -> int:
        """Connections being forwarded now."""
        out: list[int] = []
        self._call(lambda: out.append(len(self._pairs)))
        return out[0]

    def close(self) -> None:
        def do() -> None:
            self._stop = True
            for pair in list(self._pairs) + self._frozen:
                self._drop(pair, rst=True)
            self._frozen.clear()

        if self._thread.is_alive():
            self._call(do)
            self._thread.join(10)
        for s in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                s.close()
        self._sel.close()

    # -- the selector thread -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            for key, mask in self._sel.select(1.0):
                if key.data == "wake":
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    with self._lock:
                        calls, self._calls = self._calls, []
                    for fn, done in calls:
                        try:
                            fn()
                        finally:
                            done.set()
                elif key.data is None:
                    self._accept()
                else:
                    pair, side = key.data
                    if pair in self._pairs:
                        self._io(pair, side, mask)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if self._refusing:
                _rst(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _rst(client)
                continue
            client.setblocking(False)
            upstream.setblocking(False)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, upstream, upstream.getsockname()[1])
            self._pairs.append(pair)
            self.accepted += 1
            self._sel.register(client, selectors.EVENT_READ, (pair, "client"))
            self._sel.register(upstream, selectors.EVENT_READ, (pair, "upstream"))

    def _interest(self, pair: _Pair) -> None:
        for sock, side, inbuf, outbuf, eof in (
            (pair.client, "client", pair.to_upstream, pair.to_client, pair.client_eof),
            (pair.upstream, "upstream", pair.to_client, pair.to_upstream, pair.upstream_eof),
        ):
            events = 0
            if not eof and len(inbuf) < _MAX_BUFFER:
                events |= selectors.EVENT_READ
            if outbuf:
                events |= selectors.EVENT_WRITE
            try:
                if events:
                    self._sel.modify(sock, events, (pair, side))
                else:
                    self._sel.unregister(sock)
            except KeyError:
                if events:
                    self._sel.register(sock, events, (pair, side))
            except ValueError:
                pass

    def _io(self, pair: _Pair, side: str, mask: int) -> None:
        if side == "client":
            sock, other, inbuf, outbuf = (
                pair.client,
                pair.upstream,
                pair.to_upstream,
                pair.to_client,
            )
        else:
            sock, other, inbuf, outbuf = (
                pair.upstream,
                pair.client,
                pair.to_client,
                pair.to_upstream,
            )
        try:
            if mask & selectors.EVENT_READ:
                data = sock.recv(_CHUNK)
                if not data:
                    if side == "client":
                        pair.client_eof = True
                    else:
                        pair.upstream_eof = True
                    if not inbuf:
                        with contextlib.suppress(OSError):
                            other.shutdown(socket.SHUT_WR)
                else:
                    inbuf.extend(data)
                    self._flush(other, inbuf)
            if mask & selectors.EVENT_WRITE and outbuf:
                self._flush(sock, outbuf)
                if not outbuf and (pair.upstream_eof if side == "client" else pair.client_eof):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(pair, rst=True)
            return
        if pair.client_eof and pair.upstream_eof and not pair.to_client and not pair.to_upstream:
            self._drop(pair, rst=False)
            return
        self._interest(pair)

    @staticmethod
    def _flush(sock: socket.socket, buf: bytearray) -> None:
        while buf:
            try:
                n = sock.send(buf)
            except (BlockingIOError, InterruptedError):
                return
            del buf[:n]

    def _drop(self, pair: _Pair, rst: bool) -> None:
        if pair in self._pairs:
            self._pairs.remove(pair)
        for s in (pair.client, pair.upstream):
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s)
            if rst:
                _rst(s)
            else:
                with contextlib.suppress(OSError):
                    s.close()
