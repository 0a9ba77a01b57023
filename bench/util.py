"""Process, port and CPU helpers shared by the benchmark modules.

Everything here keeps traffic on loopback and tracks every process it starts by PID, so that
``stop_all()`` ends exactly those processes (and their descendants) and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache"
LOOPBACK = "127.0.0.1"

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, host: str = LOOPBACK, timeout: float = 10.0) -> None:
    """Wait until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as e:
            last = e
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s: {last}")


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (all threads), from /proc."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        with contextlib.suppress(OSError):
            out.extend(int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
    return out


def descendants(pids: Iterable[int]) -> list[int]:
    """``pids`` and all their live descendants."""
    seen: list[int] = []
    stack = list(pids)
    while stack:
        pid = stack.pop()
        if pid in seen or not os.path.exists(f"/proc/{pid}"):
            continue
        seen.append(pid)
        stack.extend(children(pid))
    return seen


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime+stime, in seconds, of ``pids`` and their live descendants."""
    total = 0
    for pid in descendants(pids):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / _CLK_TCK


def rss_bytes(pids: Iterable[int]) -> int:
    """Resident set size, in bytes, of ``pids`` and their live descendants."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for pid in descendants(pids):
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
    return total


class ProcessGroup:
    """Processes started by the benchmark, ended by PID (descendants first) in ``stop_all``."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        self,
        argv: Sequence[str],
        *,
        log: Path | None = None,
        stdin: int | None = subprocess.DEVNULL,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` with output to ``log`` (or discarded) and remember it."""
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                list(argv), stdin=stdin, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd
            )
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        self.procs.append(proc)
        return proc

    @property
    def pids(self) -> list[int]:
        """PIDs of the processes still running."""
        return [p.pid for p in self.procs if p.poll() is None]

    def stop_all(self, timeout: float = 5.0) -> None:
        """SIGTERM each process we started (newest first), then SIGKILL what is left."""
        for proc in reversed(self.procs):
            if proc.poll() is not None:
                continue
            tree = descendants([proc.pid])
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
            if proc.stdin:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        self.procs.clear()


def run(argv: Sequence[str], timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a bounded command and capture its output as text."""
    return subprocess.run(  # type: ignore[call-overload,no-any-return]
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kw
    )


APT_TOOLS = {
    "nginx": "nginx",
    "haproxy": "haproxy",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "wrk": "wrk",
    "curl": "curl",
    "unshare": "util-linux",
}


def _which(cmd: str) -> str | None:
    return shutil.which(cmd) or shutil.which(cmd, path="/usr/sbin:/sbin:/usr/bin")


def ensure_tools() -> list[str]:
    """Install missing command-line tools (apt-get) and matplotlib (pip); return problems.

    Package installation must not start system services: a temporary ``policy-rc.d``
    that refuses every start is put in place for the duration of ``apt-get install``.
    """
    problems: list[str] = []
    missing = sorted({pkg for cmd, pkg in APT_TOOLS.items() if not _which(cmd)})
    if missing:
        if os.geteuid() != 0:
            problems.append(f"not root: cannot apt-get install {' '.join(missing)}")
        else:
            print(f"bench: installing {' '.join(missing)}", file=sys.stderr)
            policy = Path("/usr/sbin/policy-rc.d")
            created = not policy.exists()
            if created:
                policy.write_text("#!/bin/sh\nexit 101\n")
                policy.chmod(0o755)
            try:
                env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
                apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]
                if run([*apt, "install", "-y", "-qq", *missing], 900, env=env).returncode:
                    run([*apt, "update", "-qq"], 600, env=env)
                    r = run([*apt, "install", "-y", "-qq", *missing], 900, env=env)
                    if r.returncode:
                        problems.append(f"apt-get install failed: {r.stderr[-500:]}")
            finally:
                if created:
                    policy.unlink()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        r = run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], 600)
        if r.returncode:
            problems.append("pip install matplotlib failed: no chart")
    return problems


def hosts_file(names: Iterable[str], directory: Path) -> Path:
    """Write a hosts file mapping ``names`` to 127.0.0.1 (for ``run_with_hosts``)."""
    path = directory / "hosts"
    lines = [Path("/etc/hosts").read_text()] if Path("/etc/hosts").exists() else []
    lines += [f"{LOOPBACK} {n}\n" for n in names]
    path.write_text("".join(lines))
    return path


def with_hosts(argv: Sequence[str], hosts: Path | None) -> list[str]:
    """Wrap ``argv`` so it sees ``hosts`` as /etc/hosts, in a private mount namespace.

    glibc does not map ``*.localhost`` to loopback, and wrk resolves its URL's host (and uses
    it for SNI), so the TLS paths run wrk inside ``unshare -m`` with a bind-mounted hosts file.
    Nothing outside that short-lived namespace is changed; the traffic stays on 127.0.0.1.
    """
    if hosts is None:
        return list(argv)
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, str(hosts), *argv]


def json_line(p: subprocess.Popen[Any], what: str, timeout: float) -> dict[str, Any]:
    """
    The next line `p` writes on its stdout (a text or binary pipe), as a JSON object, within
    `timeout` seconds.

    @raise TimeoutError: no line came in time.
    @raise RuntimeError: `p` ended first.
    """
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"{what}: nothing after {timeout:g}s")
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"{what}: exited with {p.wait()}")
    out: dict[str, Any] = json.loads(line)
    return out
