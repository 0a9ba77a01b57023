"""
A small HTTP CONNECT proxy for the e2e tests (stdlib only): loopback targets only.

    python connectproxy.py [--auth USER:PASSWORD] [--deny]

Prints ``listening on PORT`` first, then ``CONNECT host:port -> STATUS`` for every request.
With ``--auth``, requests without that Basic ``Proxy-Authorization`` get 407; with
``--deny``, every request gets 403.
"""

from __future__ import annotations

import argparse
import base64
import socket
import socketserver
import sys
import threading

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


class Handler(socketserver.BaseRequestHandler):
    auth: str | None = None
    deny = False

    def handle(self) -> None:
        client: socket.socket = self.request
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 16384:
            data = client.recv(4096)
            if not data:
                return
            head += data
        head, _, early = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        request = lines[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        method, target, _ = [*request.split(" "), "", "", ""][:3]
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        if method != "CONNECT" or not port.isdigit() or host.lower() not in LOOPBACK_NAMES:
            status = "400 Bad Request"
        elif self.deny:
            status = "403 Forbidden"
        elif self.auth is not None and headers.get("proxy-authorization") != (
            "Basic " + base64.b64encode(self.auth.encode()).decode()
        ):
            status = "407 Proxy Authentication Required"
        else:
            status = "200 Connection established"
        print(f"CONNECT {target} -> {status[:3]}", flush=True)
        if not status.startswith("200"):
            client.sendall(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode())
            return
        try:
            upstream = socket.create_connection((host, int(port)), timeout=10)
        except OSError:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        upstream.settimeout(None)
        client.sendall(f"HTTP/1.1 {status}\r\nVia: connectproxy\r\n\r\n".encode())
        if early:
            upstream.sendall(early)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(1 << 16):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        up = threading.Thread(target=pump, args=(client, upstream), daemon=True)
        up.start()
        pump(upstream, client)
        up.join()
        upstream.close()


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--auth")
    parser.add_argument("--deny", action="store_true")
    args = parser.parse_args()
    Handler.auth = args.auth
    Handler.deny = args.deny
    server = Server(("127.0.0.1", 0), Handler)
    print(f"listening on {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
