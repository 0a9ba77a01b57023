"""The hand-off mechanism alone: accepted TCP sockets passed over a UNIX socket.

    python -m bench.handoff [--connections 3000] [--rounds 3]

Two ways of serving the same trivial protocol (write one byte, close) on loopback:

- **direct**: one Twisted process listens on TCP and answers (what one worker does alone).
- **handoff**: a Twisted "supervisor" process accepts each TCP connection, sends the socket
  over a UNIX socket with ``SCM_RIGHTS`` (``socket.send_fds``, one byte of data with it) and
  closes its copy; a Twisted "worker" process receives it (``IFileDescriptorReceiver``),
  adopts it with ``reactor.adoptStreamConnection`` and answers.
- **relay**: the same through the relay's own code (`tunnel.relay._handoff`): a Twisted TCP
  listener whose protocol hands each connection with `HandoffSender` (one ``sendmsg`` with
  the descriptor and a frame holding the client's address and a ClientHello), and a worker
  that takes it with `HandoffReceiverFactory` (a TCP transport built from the frame's
  address, no duplicate descriptor) and answers.

A client in this process opens ``--connections`` connections one after the other and times
connect + first byte. Per mode and round (modes alternate, ``--rounds`` each) it reports the
CPU seconds of the serving processes (``/proc/<pid>/stat``, 10 ms ticks) per connection, and
once per mode the system calls per connection of each process (``strace -c -f`` attached for
the window of the connections only). System-call counts do not depend on the machine's load;
CPU and latency on a shared machine do (label them so).

Every process is started here, ended by PID, and uses loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.util import LOOPBACK, cpu_seconds

_MODES = ("direct", "handoff", "relay")


# --- the serving processes (run as ``python -m bench.handoff --role ...``) ---------------


def _serve_worker(unix_path: str | None, tcp_port_file: str | None) -> None:
    """A worker: answers adopted sockets received on `unix_path`, or a TCP port of its own
    (its number written to `tcp_port_file`)."""
    from twisted.internet import reactor
    from twisted.internet.interfaces import IFileDescriptorReceiver
    from twisted.internet.protocol import Factory, Protocol
    from zope.interface import implementer

    class Greeter(Protocol):
        def connectionMade(self) -> None:
            assert self.transport is not None
            self.transport.write(b"x")
            self.transport.loseConnection()

    greet = Factory.forProtocol(Greeter)

    @implementer(IFileDescriptorReceiver)
    class Adopter(Protocol):
        def fileDescriptorReceived(self, descriptor: int) -> None:
            # adoptStreamConnection duplicates the descriptor: close the received one.
            reactor.adoptStreamConnection(descriptor, socket.AF_INET, greet)  # type: ignore[attr-defined]
            os.close(descriptor)

        def dataReceived(self, data: bytes) -> None:
            pass  # one byte came with each descriptor

    if unix_path is not None:
        reactor.listenUNIX(unix_path, Factory.forProtocol(Adopter))  # type: ignore[attr-defined]
    if tcp_port_file is not None:
        port = reactor.listenTCP(0, greet, interface=LOOPBACK)  # type: ignore[attr-defined]
        Path(tcp_port_file).write_text(str(port.getHost().port))
    reactor.run()  # type: ignore[attr-defined]


def _serve_supervisor(unix_path: str, tcp_port_file: str) -> None:
    """A supervisor: accepts on TCP (reactor-driven) and hands each socket to the worker
    listening on `unix_path`."""
    from twisted.internet import reactor

    to_worker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    to_worker.connect(unix_path)
    to_worker.setblocking(False)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOPBACK, 0))
    listener.listen(1024)
    listener.setblocking(False)

    class Acceptor:
        def fileno(self) -> int:
            return listener.fileno()

        def logPrefix(self) -> str:
            return "acceptor"

        def doRead(self) -> None:
            # As twisted.internet.tcp.Port does: accept what is pending, up to a bound.
            for _ in range(100):
                try:
                    conn, _addr = listener.accept()
                except BlockingIOError:
                    return
                try:
                    socket.send_fds(to_worker, [b"\0"], [conn.fileno()])
                except BlockingIOError:
                    # A full buffer toward the worker: wait for it, with a deadline (a
                    # worker that stops reading ends the benchmark with an error).
                    if not select.select([], [to_worker], [], 10.0)[1]:
                        raise TimeoutError("the worker stopped reading") from None
                    socket.send_fds(to_worker, [b"\0"], [conn.fileno()])
                # Close our copy without shutdown(): the worker's copy stays connected.
                conn.close()

        def connectionLost(self, reason: object) -> None:
            pass

    reactor.addReader(Acceptor())  # type: ignore[attr-defined]
    Path(tcp_port_file).write_text(str(listener.getsockname()[1]))
    reactor.run()  # type: ignore[attr-defined]


def _serve_relay_worker(unix_path: str) -> None:
    """A worker taking hand-offs as the relay's workers do (`HandoffReceiverFactory`)."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    from tunnel.relay._handoff import HandoffCounts, HandoffReceiverFactory

    class Greeter(Protocol):
        def connectionMade(self) -> None:
            assert self.transport is not None
            self.transport.write(b"x")
            self.transport.loseConnection()

    receiver = HandoffReceiverFactory(reactor, Factory.forProtocol(Greeter), HandoffCounts())
    reactor.listenUNIX(unix_path, receiver)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def _serve_relay_sender(unix_path: str, tcp_port_file: str) -> None:
    """A Twisted TCP listener handing every connection as the relay's workers do
    (`HandoffSender`), with a ClientHello as a worker would have parsed."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    from tunnel.relay._clienthello import ClientHello
    from tunnel.relay._handoff import HandoffCounts, HandoffSender

    hello = ClientHello("abcdefghijklmnop.tunnel.localhost", (b"h2", b"http/1.1"), 0x0303, ())
    counts = HandoffCounts()

    def log(format: str, **fields: object) -> None:
        print(format.format(**fields), file=sys.stderr)

    sender = HandoffSender(reactor, lambda w: unix_path, counts, log)

    class Hand(Protocol):
        def connectionMade(self) -> None:
            assert self.transport is not None
            self.transport.stopReading()  # type: ignore[attr-defined]
            sender.hand(0, self.transport, b"", hello)

    port = reactor.listenTCP(0, Factory.forProtocol(Hand), interface=LOOPBACK)  # type: ignore[attr-defined]
    Path(tcp_port_file).write_text(str(port.getHost().port))
    reactor.run()  # type: ignore[attr-defined]


# --- the driver --------------------------------------------------------------------------


def _wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        time.sleep(0.02)
    raise TimeoutError(f"{path} not written after {timeout}s")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _start(mode: str, workdir: Path) -> tuple[list[subprocess.Popen[bytes]], dict[str, int], int]:
    """Start the processes of `mode`: (processes, {role: pid}, the TCP port clients use)."""
    me = [sys.executable, "-m", "bench.handoff"]
    port_file = workdir / f"{mode}-{time.monotonic_ns()}.port"
    if mode == "direct":
        worker = subprocess.Popen([*me, "--role", "worker", "--tcp-port-file", str(port_file)])
        return [worker], {"worker": worker.pid}, int(_wait_file(port_file, worker))
    unix_path = workdir / f"w-{time.monotonic_ns()}.sock"
    roles = ("worker", "supervisor") if mode == "handoff" else ("relay-worker", "relay-sender")
    worker = subprocess.Popen([*me, "--role", roles[0], "--unix", str(unix_path)])
    deadline = time.monotonic() + 20
    while not unix_path.exists():
        if time.monotonic() > deadline or worker.poll() is not None:
            _stop([worker])
            raise RuntimeError("the worker did not listen on its UNIX socket")
        time.sleep(0.02)
    supervisor = subprocess.Popen(
        [*me, "--role", roles[1], "--unix", str(unix_path), "--tcp-port-file", str(port_file)]
    )
    procs = [supervisor, worker]
    try:
        port = int(_wait_file(port_file, supervisor))
    except Exception:
        _stop(procs)
        raise
    return procs, {"supervisor": supervisor.pid, "worker": worker.pid}, port


def _clients(port: int, count: int) -> list[float]:
    """`count` connections one after the other; seconds from connect to the first byte."""
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        with socket.create_connection((LOOPBACK, port), timeout=10) as s:
            if s.recv(1) != b"x":
                raise RuntimeError("no greeting byte")
            times.append(time.perf_counter() - t0)
    return times


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def parse_strace_summary(text: str) -> dict[str, int]:
    """Calls per system call from ``strace -c`` output (its ``total`` line excluded)."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or not parts[0].replace(".", "").isdigit():
            continue
        if parts[-1] == "total":
            continue
        calls[parts[-1]] = calls.get(parts[-1], 0) + int(parts[3])
    return calls


def _strace_round(mode: str, workdir: Path, count: int) -> dict[str, dict[str, float]]:
    """System calls per connection of each serving process of `mode`."""
    procs, pids, port = _start(mode, workdir)
    tracers: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    try:
        _clients(port, 20)  # warm: imports and first-call paths before the window
        for role, pid in pids.items():
            out = workdir / f"strace-{mode}-{role}.txt"
            tracer = subprocess.Popen(
                ["strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
                stderr=subprocess.PIPE,
            )
            assert tracer.stderr is not None
            # strace says "Process N attached" once it traces: only then open the window.
            line = tracer.stderr.readline()
            if b"attached" not in line:
                raise RuntimeError(f"strace did not attach to {pid}: {line!r}")
            tracers[role] = (tracer, out)
        _clients(port, count)
        for tracer, _ in tracers.values():
            tracer.send_signal(signal.SIGINT)
        result = {}
        for role, (tracer, out) in tracers.items():
            tracer.wait(timeout=20)
            calls = parse_strace_summary(out.read_text())
            per = {name: round(n / count, 2) for name, n in sorted(calls.items()) if n >= count / 2}
            per["total"] = round(sum(calls.values()) / count, 2)
            result[role] = per
        return result
    finally:
        for tracer, _ in tracers.values():
            if tracer.poll() is None:
                tracer.kill()
                tracer.wait(timeout=5)
        _stop(procs)


def _timed_round(mode: str, workdir: Path, count: int) -> dict[str, Any]:
    procs, pids, port = _start(mode, workdir)
    try:
        _clients(port, 20)
        before = {role: cpu_seconds([pid]) for role, pid in pids.items()}
        times = _clients(port, count)
        cpu = {role: cpu_seconds([pid]) - before[role] for role, pid in pids.items()}
    finally:
        _stop(procs)
    return {
        "cpu_us_per_connection": {r: round(c / count * 1e6, 1) for r, c in cpu.items()},
        "cpu_us_per_connection_total": round(sum(cpu.values()) / count * 1e6, 1),
        "first_byte_us_p50": round(statistics.median(times) * 1e6, 1),
        "first_byte_us_p99": round(_percentile(times, 0.99) * 1e6, 1),
    }


def run(connections: int = 3000, rounds: int = 3, strace: bool = True) -> dict[str, Any]:
    """Both modes, alternating, `rounds` timed rounds each, then one traced round each."""
    with tempfile.TemporaryDirectory(prefix="handoff-") as tmp:
        workdir = Path(tmp)
        timed: dict[str, list[dict[str, Any]]] = {m: [] for m in _MODES}
        for _ in range(rounds):
            for mode in _MODES:
                timed[mode].append(_timed_round(mode, workdir, connections))
        traced = {}
        if strace:
            for mode in _MODES:
                traced[mode] = _strace_round(mode, workdir, max(200, connections // 3))
    summary: dict[str, Any] = {"connections": connections, "rounds": rounds, "modes": {}}
    for mode in _MODES:
        rows = timed[mode]
        summary["modes"][mode] = {
            "rounds": rows,
            "median_cpu_us_per_connection_total": statistics.median(
                r["cpu_us_per_connection_total"] for r in rows
            ),
            "median_first_byte_us_p50": statistics.median(r["first_byte_us_p50"] for r in rows),
            "median_first_byte_us_p99": statistics.median(r["first_byte_us_p99"] for r in rows),
            "syscalls_per_connection": traced.get(mode, {}),
        }
    d = summary["modes"]["direct"]
    for mode in ("handoff", "relay"):
        h = summary["modes"][mode]
        summary[f"{mode}_cpu_us_per_connection"] = round(
            h["median_cpu_us_per_connection_total"] - d["median_cpu_us_per_connection_total"], 1
        )
        if traced:
            summary[f"{mode}_syscalls_per_connection"] = round(
                sum(v["total"] for v in h["syscalls_per_connection"].values())
                - d["syscalls_per_connection"]["worker"]["total"],
                2,
            )
    return summary


def markdown(summary: dict[str, Any]) -> str:
    """The micro-benchmark's table, its figures labelled as what they are."""
    n, rounds = summary["connections"], summary["rounds"]
    lines = [
        f"Hand-off alone: {n} sequential loopback connections per round, {rounds} rounds per "
        "mode, alternating (`python -m bench.handoff`). CPU and latency: noisy, shared "
        "machine; system calls: counts.",
        "",
        "| Mode | CPU µs / connection (median of rounds; per round) | connect→first byte p50 "
        "/ p99 µs | system calls / connection |",
        "|---|---|---|---|",
    ]
    for mode, row in summary["modes"].items():
        per_round = ", ".join(str(r["cpu_us_per_connection_total"]) for r in row["rounds"])
        calls = "; ".join(
            f"{role} {per['total']}" for role, per in row["syscalls_per_connection"].items()
        )
        lines.append(
            f"| {mode} | {row['median_cpu_us_per_connection_total']} ({per_round}) | "
            f"{row['median_first_byte_us_p50']} / {row['median_first_byte_us_p99']} | "
            f"{calls or '-'} |"
        )
    lines.append("")
    for mode in ("handoff", "relay"):
        lines.append(
            f"Hand-off cost ({mode}): {summary[f'{mode}_cpu_us_per_connection']} µs CPU per "
            f"connection ({mode} minus direct, both processes; noisy)"
            + (
                f", {summary[f'{mode}_syscalls_per_connection']} more system calls per "
                "connection (counts)."
                if f"{mode}_syscalls_per_connection" in summary
                else "."
            )
        )
    for mode, row in summary["modes"].items():
        for role, per in row["syscalls_per_connection"].items():
            detail = ", ".join(f"{k} {v}" for k, v in per.items() if k != "total")
            lines.append(f"- {mode}, {role}: {detail}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.handoff", description=__doc__)
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-strace", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the JSON, not Markdown")
    parser.add_argument(
        "--role",
        choices=["worker", "supervisor", "relay-worker", "relay-sender"],
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--unix", help=argparse.SUPPRESS)
    parser.add_argument("--tcp-port-file", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.role == "worker":
        _serve_worker(a.unix, a.tcp_port_file)
        return 0
    if a.role == "supervisor":
        _serve_supervisor(a.unix, a.tcp_port_file)
        return 0
    if a.role == "relay-worker":
        _serve_relay_worker(a.unix)
        return 0
    if a.role == "relay-sender":
        _serve_relay_sender(a.unix, a.tcp_port_file)
        return 0
    if not 1 <= a.connections <= 100_000 or not 1 <= a.rounds <= 20:
        parser.error("--connections 1..100000, --rounds 1..20")
    summary = run(a.connections, a.rounds, strace=not a.no_strace)
    print(json.dumps(summary, indent=2) if a.json else markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
