"""
``twistd tunnelrelay --workers 2`` end to end: real supervisor and worker processes, real
agents and clients on loopback. Which worker accepts a connection is the kernel's choice
(``SO_REUSEPORT``), so the tests loop, with a bound, until what they test has happened on
both workers (the workers' own ``/status`` counters say so).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.e2e.harness import (
    DEADLINE,
    LOOPBACK,
    Agent,
    Endpoint,
    Procs,
    curl,
    free_port,
    random_file,
    require_tool,
    tcp_port_range,
    wait_for,
)
from tests.e2e.pebble import AcmeWorld
from tests.e2e.test_certificates import CertFiles, acme, sans, served_certificate
from tests.e2e.test_passthrough import SCRIPT as PASSTHROUGH_AGENT
from tests.e2e.test_passthrough import serve_chain
from tunnel import _signedtokens as signed
from tunnel.testing._daemons import RelayProcess

pytestmark = pytest.mark.e2e

__all__ = ["acme"]  # the pebble fixture of the certificate tests, used here too

WORKERS = 2


def start_relay(procs: Procs, extra: Sequence[str] = (), **options: Any) -> RelayProcess:
    n = procs.next_id()
    relay = RelayProcess.start(
        procs.dir / f"{n:02d}-relay.log",
        state_dir=procs.dir / f"relay-state-{n}",
        tcp_ports=tcp_port_range(),
        workers=WORKERS,
        extra=["--drain-grace", "30", *extra],
        cwd=procs.dir,
        **options,
    )
    procs.procs.append(relay)
    return relay


def worker_of_links(relay: RelayProcess) -> list[int]:
    """The authenticated links (agents) on each worker."""
    return [relay.worker_status(i)["agents"] for i in range(WORKERS)]


def agents_on_both_workers(
    procs: Procs, relay: RelayProcess, forwards: Sequence[str], token: str | None = None
) -> list[Agent]:
    """Start agents (each with `forwards`) until each worker holds the link of one; the
    agents that made it so, one per worker, in worker order (the others are stopped)."""
    by_worker: dict[int, Agent] = {}
    for _ in range(12):
        before = worker_of_links(relay)
        agent = procs.agent(_relay_address(relay), forwards, token=token, ca=relay.ca)
        n = sum(before)
        relay.wait_status(lambda s, n=n: s.get("agents") == n + 1, "the new agent's link")
        now = worker_of_links(relay)
        worker = next(i for i in range(WORKERS) if now[i] > before[i])
        if worker in by_worker:
            agent.proc.stop()
            relay.wait_status(lambda s, n=n: s.get("agents") == n, "the extra agent gone")
            continue
        by_worker[worker] = agent
        if len(by_worker) == WORKERS:
            return [by_worker[i] for i in range(WORKERS)]
    raise AssertionError(f"12 agents and still no link on every worker: {worker_of_links(relay)}")


def _relay_address(relay: RelayProcess) -> str:
    return f"localhost:{relay.port}"


def hello(relay: RelayProcess, tunnel: Endpoint) -> None:
    result = curl(_Relay(relay), tunnel, f"{tunnel.url}/hello", timeout=20)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"hello /hello\n"


class _Relay:
    """What `curl` needs of a relay."""

    def __init__(self, relay: RelayProcess) -> None:
        self.port = relay.port
        self.ca = relay.ca


def sent_by_each_worker(relay: RelayProcess) -> list[int]:
    return [relay.worker_status(i)["handoffs_sent"] for i in range(WORKERS)]


def test_tunnels_are_served_whichever_worker_accepts(procs: Procs) -> None:
    relay = start_relay(procs)
    assert len(relay.worker_pids()) == WORKERS
    backend = procs.backend("http", "--root", str(procs.dir))
    agents = agents_on_both_workers(procs, relay, [str(backend.port)])
    tunnels = [agent.ready(str(backend.port)) for agent in agents]
    # Until each worker has handed a connection to the other (both directions), bounded.
    for _ in range(100):
        for tunnel in tunnels:
            hello(relay, tunnel)
        sent = sent_by_each_worker(relay)
        if all(sent):
            break
    else:
        raise AssertionError(f"no hand-off in both directions after 200 requests: {sent}")
    received = [relay.worker_status(i)["handoffs_received"] for i in range(WORKERS)]
    # What one sent the other took: nothing failed, nothing lost.
    assert received == sent[::-1]
    assert [relay.worker_status(i)["handoffs_failed"] for i in range(WORKERS)] == [0, 0]
    merged = relay.status()
    assert merged["handoffs_sent"] == sum(sent) and merged["tunnels"] == 2
    assert {w["state"] for w in merged["workers"]} == {"running"}
    for i in range(WORKERS):
        assert relay.worker_status(i)["worker"]["index"] == i


def test_by_default_a_relay_runs_one_worker_per_core(procs: Procs) -> None:
    cores = os.cpu_count() or 1
    if cores < 2:
        pytest.skip("one core: the default is one process")
    n = procs.next_id()
    relay = RelayProcess.start(
        procs.dir / f"{n:02d}-relay.log",
        state_dir=procs.dir / f"relay-state-{n}",
        workers=None,
        cwd=procs.dir,
    )
    procs.procs.append(relay)
    assert len(relay.worker_pids()) == cores
    assert {w["state"] for w in relay.status()["workers"]} == {"running"}
    backend = procs.backend("http", "--root", str(procs.dir))
    agent = procs.agent(_relay_address(relay), [str(backend.port)], ca=relay.ca)
    tunnel = agent.ready(str(backend.port))
    for _ in range(8):
        hello(relay, tunnel)


def test_raw_tcp_tunnel_is_listened_on_by_its_worker_only(procs: Procs) -> None:
    relay = start_relay(procs)
    backend = procs.backend("echo")
    agents = agents_on_both_workers(procs, relay, [f"{backend.port}:tcp"])
    for agent in agents:
        tunnel = agent.ready(f"{backend.port}:tcp")
        assert tunnel.tcp_port is not None
        for _ in range(5):
            with socket.create_connection((LOOPBACK, tunnel.tcp_port), timeout=DEADLINE) as s:
                s.sendall(b"ping through a worker\n")
                assert s.recv(64) == b"ping through a worker\n"
    assert [relay.worker_status(i)["tcp_listeners"] for i in range(WORKERS)] == [1, 1]


def test_reclaim_after_the_worker_holding_the_link_is_killed(procs: Procs) -> None:
    relay = start_relay(procs)
    backend = procs.backend("http", "--root", str(procs.dir))
    agent = procs.agent(_relay_address(relay), [str(backend.port)], ca=relay.ca)
    before = agent.ready(str(backend.port))
    holder = next(i for i, n in enumerate(worker_of_links(relay)) if n)
    pid = relay.worker_pids()[holder]
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    # The supervisor starts it again; the agent links again (to either worker) and
    # reclaims its id.
    relay.wait_status(
        lambda s: (
            s["workers"][holder]["restarts"] == 1
            and s["workers"][holder]["pid"] not in (None, pid)
            and s["workers"][holder]["state"] == "running"
        ),
        "the killed worker started again",
    )
    agent.proc.wait_status(lambda s: s.get("links_made", 0) >= 2, "the agent's second link")
    after = agent.ready(str(backend.port))
    assert after.host == before.host
    relay.wait_ready()
    for _ in range(6):
        hello(relay, after)


def test_a_killed_worker_takes_only_its_own_links(procs: Procs) -> None:
    relay = start_relay(procs)
    backend = procs.backend("http", "--root", str(procs.dir))
    agents = agents_on_both_workers(procs, relay, [str(backend.port)])
    tunnels = [agent.ready(str(backend.port)) for agent in agents]
    pid = relay.worker_pids()[0]
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    # Worker 1's tunnel is served all along, whichever worker accepts: by worker 1 alone
    # while worker 0 is down, then by both (worker 0 handing to worker 1).
    for _ in range(4):
        hello(relay, tunnels[1])
    relay.wait_status(
        lambda s: s["workers"][0]["state"] == "running" and s["workers"][0]["restarts"] == 1,
        "worker 0 started again",
    )
    agents[0].proc.wait_status(lambda s: s.get("links_made", 0) >= 2, "agent 0 linked again")
    assert agents[0].ready(str(backend.port)).host == tunnels[0].host
    relay.wait_ready()
    for _ in range(6):
        hello(relay, tunnels[0])
        hello(relay, tunnels[1])
    assert agents[1].proc.status()["links_made"] == 1


def test_agent_links_are_spread_evenly_whatever_the_kernels_hash(procs: Procs) -> None:
    relay = start_relay(procs)
    backend = procs.backend("http", "--root", str(procs.dir))
    # Started at once: links arrive while others are still being authenticated.
    agents = [
        procs.agent(_relay_address(relay), [str(backend.port)], ca=relay.ca, wait=False)
        for _ in range(8)
    ]
    relay.wait_status(lambda s: s.get("agents") == 8, "eight links")
    assert worker_of_links(relay) == [4, 4]
    tunnels = [agent.ready(str(backend.port)) for agent in agents]
    # Every tunnel is served, whichever worker holds its link and whichever accepts.
    for tunnel in tunnels:
        hello(relay, tunnel)
    # Worker 1 killed: its agents link again to the worker that is up, keep their ids, and
    # the links made once it is back go to it, the worker with the fewest.
    pid = relay.worker_pids()[1]
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    relay.wait_status(
        lambda s: s["workers"][1]["state"] == "running" and s["workers"][1]["restarts"] == 1,
        "worker 1 started again",
    )
    relay.wait_status(lambda s: s.get("agents") == 8, "every agent linked again")
    relay.wait_ready()
    for agent, tunnel in zip(agents, tunnels, strict=True):
        assert agent.ready(str(backend.port)).host == tunnel.host
    for _ in range(4):
        before = worker_of_links(relay)
        procs.agent(_relay_address(relay), [str(backend.port)], ca=relay.ca)
        n = sum(before) + 1
        relay.wait_status(lambda s, n=n: s.get("agents") == n, "the new agent's link")
        after = worker_of_links(relay)
        gained = [i for i in range(WORKERS) if after[i] > before[i]]
        assert len(gained) == 1 and before[gained[0]] == min(before), (before, after)


def test_drain_on_sigterm_lets_a_download_finish(procs: Procs) -> None:
    curl_path = require_tool("curl")
    root = procs.dir / "files"
    root.mkdir()
    big = root / "big"
    sha = random_file(big, 8 * 1024 * 1024, seed=15)
    relay = start_relay(procs)
    backend = procs.backend("http", "--root", str(root))
    agent = procs.agent(_relay_address(relay), [str(backend.port)], ca=relay.ca)
    tunnel = agent.ready(str(backend.port))
    out = procs.dir / "download"
    download = subprocess.Popen(
        [
            curl_path,
            "-sS",
            "--max-time",
            "60",
            "--limit-rate",
            "2M",
            "--cacert",
            str(relay.ca),
            "-o",
            str(out),
            f"{tunnel.url}/file/big",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: out.exists() and out.stat().st_size > 512 * 1024, "the download to start")
        relay.signal(signal.SIGTERM)
        # Draining: no new connections, the one in flight goes on.
        wait_for(lambda: not relay.ready(), "the relay to stop being ready")
        assert download.wait(60) == 0, download.stderr.read() if download.stderr else ""
    finally:
        if download.poll() is None:
            download.kill()
            download.wait()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sha
    # The supervisor exits once both workers have: none was killed for being late.
    relay.popen.wait(DEADLINE)
    assert relay.count("did not drain in time") == 0
    assert relay.count(r"relay draining: no new connections") == WORKERS


def _signed_token(directory: Path, max_tunnels: int) -> tuple[Path, str]:
    private_path, public_path = signed.generate_key_pair(str(directory / "keys"))
    with open(private_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    token = signed.issue_token(key, "alice", now=time.time(), max_tunnels=max_tunnels)  # type: ignore[arg-type]
    return Path(public_path), token


def test_tunnels_per_token_count_over_every_worker(procs: Procs) -> None:
    public, token = _signed_token(procs.dir, max_tunnels=2)
    relay = start_relay(procs, ["--token-key", str(public)])
    a, b, c = procs.backend("echo"), procs.backend("echo"), procs.backend("echo")
    first = procs.agent(_relay_address(relay), [str(a.port)], token=token, ca=relay.ca)
    first.ready(str(a.port))
    holder = next(i for i, n in enumerate(worker_of_links(relay)) if n)
    # A second agent of the same subject, on the other worker, asks for two more: one
    # is granted (two in all), the other refused for the subject's limit.
    for _ in range(12):
        second = procs.agent(
            _relay_address(relay),
            [str(b.port), str(c.port)],
            token=token,
            ca=relay.ca,
            wait=False,
        )
        relay.wait_status(lambda s: s.get("agents") == 2, "the second agent's link")
        if worker_of_links(relay)[holder] == 1:
            break
        second.proc.stop()
        relay.wait_status(lambda s: s.get("agents") == 1, "the extra agent gone")
    else:
        raise AssertionError("12 agents and none on the other worker")
    second.proc.wait_log(r"at most 2 tunnels at once")
    relay.wait_status(lambda s: s.get("tunnels") == 2, "two tunnels in all")
    assert [relay.worker_status(i)["tunnels"] for i in range(WORKERS)] == [1, 1]


def test_tokens_reload_reaches_every_worker(procs: Procs) -> None:
    tokens = procs.dir / "tokens.txt"
    tokens.write_text("token-one\ntoken-two\n")
    relay = start_relay(procs, ["--tokens", str(tokens)])
    backend = procs.backend("echo")
    agents_on_both_workers(procs, relay, [str(backend.port)], token="token-one")
    mark = relay.size()
    tokens.write_text("token-two\n")
    relay.signal(signal.SIGHUP)
    # Every worker checks at once, and closes its link of the removed token.
    wait_for(
        lambda: (
            relay.count(r"SIGHUP: checking") >= WORKERS
            and relay.text().count("tokens reloaded", mark) >= WORKERS
        ),
        "every worker to reload the tokens",
    )
    relay.wait_status(lambda s: s.get("agents") == 0, "the links of the removed token closed")
    assert relay.alive()


def test_certificate_reload_reaches_every_worker(procs: Procs) -> None:
    files = CertFiles(procs.dir)
    relay = start_relay(procs, ["--cert", str(files.cert), "--key", str(files.key)])
    assert served_certificate(relay.port, files.ca_path).serial_number == files.serial
    new = files.replace()
    relay.signal(signal.SIGHUP)
    wait_for(
        lambda: all(
            relay.worker_status(i)["certificate"]["serial"] == f"{new:X}" for i in range(WORKERS)
        ),
        "the new certificate in every worker",
    )
    for _ in range(6):
        assert served_certificate(relay.port, files.ca_path).serial_number == new


def _read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        data = sock.recv(1)
        assert data, f"closed after {line!r}"
        line += data
    return line


def test_a_handed_connection_keeps_its_client_address_and_the_deny_list(procs: Procs) -> None:
    relay = start_relay(procs)
    backend = procs.backend("proxy")
    forward = f"{backend.port}:proxy1"
    agent = procs.agent(
        _relay_address(relay), [forward], ca=relay.ca, extra=["--deny", "127.0.0.2"]
    )
    tunnel = agent.ready(forward)
    holder = next(i for i, n in enumerate(worker_of_links(relay)) if n)
    other = 1 - holder
    ctx = ssl.create_default_context(cafile=str(relay.ca))
    # Served, with the PROXY header naming the real client, also when the other worker
    # accepted the connection and handed it over (until it has, bounded).
    for _ in range(60):
        with (
            socket.create_connection((LOOPBACK, relay.port), timeout=DEADLINE) as raw,
            ctx.wrap_socket(raw, server_hostname=tunnel.host) as tls,
        ):
            client_port = tls.getsockname()[1]
            tls.sendall(b"hi\n")
            assert _read_line(tls) == (
                f"proxy v1 {LOOPBACK} {client_port} {LOOPBACK} {relay.port}\n".encode()
            )
            assert _read_line(tls) == b"hi\n"
        if relay.worker_status(other)["handoffs_sent"]:
            break
    else:
        raise AssertionError("60 connections and none accepted by the other worker")
    # From a denied address: refused by the holder, also when handed to it.
    handed = relay.worker_status(other)["handoffs_sent"]
    attempts = 0
    for _ in range(60):
        attempts += 1
        raw = socket.socket()
        raw.settimeout(DEADLINE)
        raw.bind(("127.0.0.2", 0))
        with raw:
            raw.connect((LOOPBACK, relay.port))
            with pytest.raises(ssl.SSLError, match="ACCESS_DENIED"):
                ctx.wrap_socket(raw, server_hostname=tunnel.host).close()
        if relay.worker_status(other)["handoffs_sent"] > handed:
            break
    else:
        raise AssertionError("60 denied connections and none handed over")
    relay.wait_status(
        lambda s: s["denied_connections"] == attempts, "every denied connection counted"
    )
    assert relay.worker_status(holder)["denied_connections"] == attempts


def test_acme_orders_run_in_one_worker_and_every_worker_serves_the_certificate(
    acme: AcmeWorld, procs: Procs
) -> None:
    relay = start_relay(procs, acme.relay_options())
    root = acme.root()
    serials = {relay.worker_status(i)["certificate"]["serial"] for i in range(WORKERS)}
    assert len(serials) == 1
    (serial,) = serials
    # Whichever worker accepts, the one certificate (ordered once).
    for _ in range(8):
        cert = served_certificate(relay.port, root)
        assert f"{cert.serial_number:X}" == serial
        assert sans(cert) == {"tunnel.localhost", "*.tunnel.localhost"}
    assert relay.count("requesting a certificate") == 1
    backend = procs.backend("http", "--root", str(procs.dir))
    agent = procs.agent(f"tunnel.localhost:{relay.port}", [str(backend.port)], ca=root)
    tunnel = agent.ready(str(backend.port))
    result = curl(_AcmeRelay(relay, root), tunnel, f"{tunnel.url}/hello", timeout=20)
    assert result.stdout == b"hello /hello\n", result.stderr


class _AcmeRelay:
    def __init__(self, relay: RelayProcess, ca: Path) -> None:
        self.port = relay.port
        self.ca = ca


def test_reclaim_after_an_agent_reconnect_on_either_worker(procs: Procs) -> None:
    ss = require_tool("ss")
    relay = start_relay(procs)
    backend = procs.backend("http", "--root", str(procs.dir))
    agent = procs.agent(_relay_address(relay), [str(backend.port)], ca=relay.ca)
    tunnel = agent.ready(str(backend.port))
    seen = {worker_of_links(relay).index(1)}
    # Cut the agent's link (its socket reset: both ends see it) until it has come back on
    # the other worker too, bounded; every time it reclaims its id.
    for cut in range(1, 13):
        result = subprocess.run(
            [ss, "-K", "-t", "dst", LOOPBACK, "dport", "=", f":{relay.port}"],
            capture_output=True,
            timeout=DEADLINE,
        )
        if result.returncode != 0:
            pytest.skip(f"ss -K cannot close sockets here: {result.stderr.decode()[:200]}")
        agent.proc.wait_status(lambda s, n=cut: s.get("links_made", 0) > n, "the agent back")
        again = agent.ready(str(backend.port))
        assert again.host == tunnel.host
        relay.wait_status(lambda s: s.get("agents") == 1 and s.get("tunnels") == 1, "one link")
        seen.add(worker_of_links(relay).index(1))
        hello(relay, again)
        if len(seen) == WORKERS:
            break
    else:
        raise AssertionError(f"12 reconnects, all to worker {seen}")
    assert relay.status()["handoffs_failed"] == 0


def test_a_named_pool_spans_the_workers(procs: Procs) -> None:
    relay = start_relay(procs)
    backend = procs.backend("http", "--root", str(procs.dir))
    forward = f"web={backend.port}"
    agents = agents_on_both_workers(procs, relay, [forward])
    tunnels = [agent.ready(forward) for agent in agents]
    assert {t.host for t in tunnels} == {f"web.{relay.domain}"}
    assert [relay.worker_status(i)["pool_members"] for i in range(WORKERS)] == [1, 1]
    # Each worker serves the name with its own member: nothing to hand over (the links
    # may have been handed, to spread them, before).
    before = sent_by_each_worker(relay)
    for _ in range(10):
        hello(relay, tunnels[0])
    assert sent_by_each_worker(relay) == before
    # One member gone: the name is served from the other worker, whichever accepts.
    agents[0].proc.stop()
    relay.wait_status(lambda s: s.get("pool_members") == 1, "one member left")
    for _ in range(60):
        hello(relay, tunnels[1])
        if relay.worker_status(0)["handoffs_sent"]:
            break
    else:
        raise AssertionError("60 requests and none handed from worker 0 to worker 1")


def test_a_revoked_subject_loses_its_links_on_every_worker(procs: Procs) -> None:
    public, token = _signed_token(procs.dir, max_tunnels=10)
    revoked = procs.dir / "revoked.txt"
    revoked.write_text("# revoked subjects and token ids\n")
    relay = start_relay(procs, ["--token-key", str(public), "--revoked", str(revoked)])
    backend = procs.backend("echo")
    agents_on_both_workers(procs, relay, [str(backend.port)], token=token)
    mark = relay.size()
    revoked.write_text("alice\n")
    relay.signal(signal.SIGHUP)
    relay.wait_status(lambda s: s.get("agents") == 0, "the revoked subject's links closed")
    assert relay.text().count("revoked list reloaded", mark) == WORKERS
    assert [relay.worker_status(i)["agents"] for i in range(WORKERS)] == [0, 0]


def test_a_passthrough_tunnel_is_handed_over_untouched(procs: Procs) -> None:
    openssl = require_tool("openssl")
    relay = start_relay(procs)
    port = free_port()
    script = procs.dir / "passthrough_agent.py"
    script.write_text(PASSTHROUGH_AGENT)
    agent = procs.start(
        "agent-api",
        [
            sys.executable,
            str(script),
            str(port),
            _relay_address(relay),
            str(relay.ca),
            str(procs.dir),
        ],
    )
    host = json.loads(agent.wait_log(r"READY (\{.*\})").group(1))["host"]
    leaf = serve_chain(procs, openssl, port)
    holder = worker_of_links(relay).index(1)
    wanted = x509.load_pem_x509_certificate(leaf.encode()).serial_number
    ctx = ssl.create_default_context(cafile=str(relay.ca))
    # The local server's own certificate, also through the worker that does not hold it.
    for _ in range(60):
        with (
            socket.create_connection((LOOPBACK, relay.port), timeout=DEADLINE) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            assert x509.load_der_x509_certificate(der).serial_number == wanted
        if relay.worker_status(1 - holder)["handoffs_sent"]:
            break
    else:
        raise AssertionError("60 connections and none handed over")
