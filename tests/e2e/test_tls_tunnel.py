"""
TLS tunnels end to end: a real relay and agent (twistd), real clients (curl, openssl
s_client, Python ssl) on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import BIG, World
from tests.e2e.harness import (
    DEADLINE,
    DOMAIN,
    LOOPBACK,
    Procs,
    Relay,
    clean_env,
    curl,
    free_port,
    require_tool,
    run,
    tls_connect,
    tls_context,
    wait_for,
)
from tests.e2e.servers.backend import read_ws_frame, ws_frame

pytestmark = pytest.mark.e2e


def get(world: World, path: str, *args: str) -> tuple[int, str, bytes]:
    """GET `path` on the HTTP tunnel; (status, http version, body)."""
    fmt = "\n%{http_code} %{http_version}"
    result = curl(world.relay, world.http, "-w", fmt, *args, world.http.url + path)
    assert result.returncode == 0, result.stderr.decode()
    body, _, trailer = result.stdout.rpartition(b"\n")
    code, version = trailer.decode().split()
    return int(code), version, body


# ---------------------------------------------------------------------------------------------
# curl


@pytest.mark.parametrize(
    ("args", "alpn_line"),
    [
        ((), "ALPN: server accepted http/1.1"),
        (("--http1.1",), "ALPN: server accepted http/1.1"),
        (("--no-alpn",), None),
    ],
    ids=["alpn", "http1.1", "no-alpn"],
)
def test_curl_through_tls_tunnel(world: World, args: tuple[str, ...], alpn_line: str | None):
    result = curl(
        world.relay, world.http, "-v", "-w", "\n%{http_code} %{http_version}", *args,
        world.http.url + "/hello",
    )  # fmt: skip
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 0, err
    body, _, trailer = result.stdout.rpartition(b"\n")
    assert trailer == b"200 1.1"
    assert body == b"hello /hello\n"
    # The certificate verified against the dev CA for the tunnel's own name.
    assert f'subjectAltName: host "{world.http.host}" matched' in err, err
    if alpn_line is not None:
        assert alpn_line in err, err
    else:
        assert "ALPN: server accepted" not in err, err


def test_keep_alive_several_requests_on_one_connection(world: World):
    urls = [world.http.url + f"/hello/{i}" for i in range(5)]
    result = curl(world.relay, world.http, "-w", "|%{num_connects}|%{http_code}\n", *urls)
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    for i in range(5):
        assert f"hello /hello/{i}\n" in out
    stats = [line.split("|")[1:] for line in out.splitlines() if line.startswith("|")]
    # One TCP+TLS connection for the first request; the next four reuse it.
    assert stats == [["1", "200"]] + [["0", "200"]] * 4, out


def test_websocket_echo(world: World):
    sock = tls_connect(world.relay, world.http, alpn=["http/1.1"])
    with sock:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: {world.http.host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        f = sock.makefile("rb")
        status = f.readline()
        assert status.startswith(b"HTTP/1.1 101"), status
        headers = {}
        while (line := f.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        expected = base64.b64encode(
            hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
        ).decode()
        assert headers["sec-websocket-accept"] == expected
        for payload, opcode in [(b"hello websocket", 0x1), (os.urandom(100_000), 0x2)]:
            sock.sendall(ws_frame(opcode, payload, mask=os.urandom(4)))
            assert read_ws_frame(f) == (opcode, payload)
        sock.sendall(ws_frame(0x8, b"\x03\xe8", mask=os.urandom(4)))
        assert read_ws_frame(f) == (0x8, b"\x03\xe8")


def test_h2_tunnel_to_nghttpd(procs: Procs, relay: Relay):
    nghttpd = shutil.which("nghttpd")
    if nghttpd is None:
        pytest.skip("nghttpd is not installed (nghttp2-server; `make deps`)")
    docroot = procs.dir / "h2root"
    docroot.mkdir()
    (docroot / "index.html").write_bytes(b"hello over h2\n")
    port = None
    for _ in range(5):
        candidate = free_port()
        server = procs.start(
            "nghttpd", [nghttpd, "--no-tls", "-d", str(docroot), "-a", LOOPBACK, str(candidate)]
        )
        wait_for(lambda c=candidate, s=server: port_open(c) or not s.alive(), "nghttpd")
        if server.alive():
            port = candidate
            break
    assert port is not None, "nghttpd did not start"
    agent = procs.agent(relay, [f"{port}:h2"])
    tunnel = agent.ready(f"{port}:h2")
    result = curl(relay, tunnel, "--http2", "-w", "\n%{http_version}", tunnel.url + "/index.html")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"hello over h2\n\n2"


# ---------------------------------------------------------------------------------------------
# 64 MiB each way


def test_download_64_mib(world: World, tmp_path: Path):
    out = tmp_path / "download"
    result = curl(world.relay, world.http, "-o", str(out), world.http.url + "/file/big")
    assert result.returncode == 0, result.stderr.decode()
    assert out.stat().st_size == BIG
    assert sha256_file(out) == world.big_sha


def test_upload_64_mib(world: World):
    result = curl(
        world.relay, world.http, "-H", "Expect:", "-H", "Content-Type: application/octet-stream",
        "--data-binary", f"@{world.big}", world.http.url + "/sha256",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == world.big_sha


# ---------------------------------------------------------------------------------------------
# 200 concurrent connections


def test_200_concurrent_connections_each_intact(world: World):
    n, size = 200, 64 * 1024
    ctx = tls_context(world.relay)

    async def one(i: int, opened: asyncio.Barrier) -> bool:
        payload = hashlib.sha256(str(i).encode()).digest() + os.urandom(size - 32)
        reader, writer = await asyncio.open_connection(
            LOOPBACK, world.relay.port, ssl=ctx, server_hostname=world.echo.host
        )
        try:
            await opened.wait()  # every connection is open before any sends
            writer.write(payload)
            drain = asyncio.ensure_future(writer.drain())
            echoed = await reader.readexactly(size)
            await drain
            return echoed == payload
        finally:
            writer.close()

    async def main() -> list[bool | BaseException]:
        opened = asyncio.Barrier(n)
        return await asyncio.wait_for(
            asyncio.gather(*(one(i, opened) for i in range(n)), return_exceptions=True),
            timeout=90,
        )

    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} connections failed, e.g. {errors[0]!r}"
    assert results == [True] * n


# ---------------------------------------------------------------------------------------------
# Refusals by the TLS front, while other tunnels keep serving


def s_client(relay: Relay, *args: str) -> str:
    openssl = require_tool("openssl")
    result = run(
        [openssl, "s_client", "-connect", f"{LOOPBACK}:{relay.port}", "-CAfile", str(relay.ca),
         *args],
        input=b"",
        timeout=DEADLINE,
    )  # fmt: skip
    return (result.stdout + result.stderr).decode(errors="replace")


def assert_unrecognized_name(output: str) -> None:
    assert "alert number 112" in output or "unrecognized name" in output, output
    assert "BEGIN CERTIFICATE" not in output and "Server certificate" not in output, output


@pytest.mark.parametrize(
    "args",
    [
        ("-servername", f"nosuchtunnel0000.{DOMAIN}"),
        ("-servername", "example.com"),
        ("-noservername",),
    ],
    ids=["unknown-id", "foreign-name", "no-sni"],
)
def test_refused_with_unrecognized_name(world: World, args: tuple[str, ...]):
    assert_unrecognized_name(s_client(world.relay, *args))
    code, _, body = get(world, "/hello")
    assert (code, body) == (200, b"hello /hello\n")


def test_tls_1_1_refused_with_protocol_version(world: World):
    output = s_client(
        world.relay, "-servername", world.http.host, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"
    )
    assert "protocol version" in output or "alert number 70" in output, output
    code, _, _ = get(world, "/hello")
    assert code == 200


def test_refusals_concurrent_with_a_serving_tunnel(world: World):
    """A download through one tunnel runs while bad handshakes are refused."""
    download = subprocess.Popen(
        [
            require_tool("curl"), "-sS", "--max-time", "60", "--cacert", str(world.relay.ca),
            "--resolve", f"{world.http.host}:{world.http.port}:{LOOPBACK}",
            "--limit-rate", "16M", world.http.url + "/file/big",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
    )  # fmt: skip
    try:
        for i in range(10):
            output = s_client(world.relay, "-servername", f"unknown{i:011d}.{DOMAIN}")
            assert_unrecognized_name(output)
        out, err = download.communicate(timeout=90)
    finally:
        if download.poll() is None:
            download.kill()
            download.wait(10)
    assert download.returncode == 0, err.decode()
    assert hashlib.sha256(out).hexdigest() == world.big_sha


def test_offline_tunnel_refused_like_an_unknown_one(world: World, procs: Procs):
    port = world.backends["http"].port
    agent = procs.agent(world.relay, [str(port)])
    tunnel = agent.ready(str(port))
    ok = curl(world.relay, tunnel, "-w", "%{http_code}", "-o", "/dev/null", tunnel.url + "/hello")
    assert ok.stdout == b"200"
    agent.proc.stop()
    # The relay notices the link is gone; from then on the id is refused at the handshake.
    wait_for(
        lambda: (
            "unrecognized name" in s_client(world.relay, "-servername", tunnel.host)
            or "alert number 112" in s_client(world.relay, "-servername", tunnel.host)
        ),
        "the closed tunnel's id to be refused",
    )
    offline = s_client(world.relay, "-servername", tunnel.host)
    unknown = s_client(world.relay, "-servername", f"{'z' * len(tunnel.id)}.{DOMAIN}")
    assert_unrecognized_name(offline)
    assert_unrecognized_name(unknown)
    failed = curl(world.relay, tunnel, tunnel.url + "/hello", timeout=DEADLINE)
    assert failed.returncode != 0
    code, _, _ = get(world, "/hello")
    assert code == 200


# ---------------------------------------------------------------------------------------------
# helpers


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return True
    except OSError:
        return False
