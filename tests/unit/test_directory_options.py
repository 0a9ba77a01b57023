"""
``twistd tunnelrelay --workers``: the option and its default (one per core where the
listener can be shared), what the supervisor refuses at start, and that ``--workers 1``
builds the relay of one process as before.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from tunnel.relay import tap
from tunnel.relay._supervisor import Supervisor
from tunnel.relay._worker import WORKER_ENV, Worker
from tunnel.relay.service import RelayService


def options(tmp_path: Path, *args: str) -> tap.Options:
    parsed = tap.Options()
    parsed.parseOptions(["--state-dir", str(tmp_path / "s"), *args])
    return parsed


def test_workers_is_a_count_or_auto(tmp_path: Path) -> None:
    assert options(tmp_path)["workers"] is None
    assert options(tmp_path, "--workers", "3")["workers"] == 3
    assert options(tmp_path, "--workers", "auto")["workers"] == (os.cpu_count() or 1)
    for bad in ("0", "-1", "many"):
        with pytest.raises(usage.UsageError):
            options(tmp_path, "--workers", bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_by_default_one_worker_per_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WORKER_ENV, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    listen = f"tcp:{_free_port()}:interface=127.0.0.1"
    service = tap.makeService(options(tmp_path, "--listen", listen), MemoryReactorClock())
    assert isinstance(service, Supervisor) and service.count == 3


@pytest.mark.parametrize(
    ("cores", "listen"),
    [
        (1, "tcp:8443:interface=127.0.0.1"),
        (4, "tcp:0"),
        (4, "unix:/tmp/x.sock"),
    ],
)
def test_by_default_one_process_where_workers_cannot_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cores: int, listen: str
) -> None:
    monkeypatch.delenv(WORKER_ENV, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    service = tap.makeService(options(tmp_path, "--listen", listen), MemoryReactorClock())
    assert isinstance(service, RelayService)
    assert not any(isinstance(s, Worker) for s in service)


def test_by_default_one_process_with_a_state_dir_too_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(WORKER_ENV, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    parsed = tap.Options()
    parsed.parseOptions(
        ["--state-dir", str(tmp_path / ("d" * 100)), "--listen", "tcp:8443:interface=127.0.0.1"]
    )
    assert isinstance(tap.makeService(parsed, MemoryReactorClock()), RelayService)


def test_a_port_another_program_holds_is_refused_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(WORKER_ENV, raising=False)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        parsed = options(tmp_path, "--workers", "2", "--listen", f"tcp:{port}:interface=127.0.0.1")
        with pytest.raises(usage.UsageError, match="cannot listen"):
            tap.makeService(parsed, MemoryReactorClock())


def test_the_arguments_are_kept_for_the_workers(tmp_path: Path) -> None:
    parsed = options(tmp_path, "--workers", "2", "--listen", "tcp:8443")
    assert parsed.arguments == [
        "--state-dir",
        str(tmp_path / "s"),
        "--workers",
        "2",
        "--listen",
        "tcp:8443",
    ]


def test_one_worker_is_the_relay_of_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(WORKER_ENV, raising=False)
    parsed = options(tmp_path, "--workers", "1", "--listen", "tcp:8443:interface=127.0.0.1")
    service = tap.makeService(parsed, MemoryReactorClock())
    assert isinstance(service, RelayService)
    assert not any(isinstance(s, Worker) for s in service)
    assert service.relay.worker_status is None


def test_several_workers_are_a_supervisor_with_the_state_made_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(WORKER_ENV, raising=False)
    listen = f"tcp:{_free_port()}:interface=127.0.0.1"
    parsed = options(tmp_path, "--workers", "2", "--listen", listen)
    service = tap.makeService(parsed, MemoryReactorClock())
    assert isinstance(service, Supervisor) and service.count == 2
    # What the workers share exists before they start.
    state = tmp_path / "s"
    assert (state / "reclaim.key").exists() and (state / "ca.pem").exists()


@pytest.mark.parametrize(
    ("listen", "why"),
    [
        ("tcp:0", "fixed port"),
        ("unix:/tmp/x.sock", "tcp: or tcp6:"),
    ],
)
def test_workers_need_a_shared_tcp_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listen: str, why: str
) -> None:
    monkeypatch.delenv(WORKER_ENV, raising=False)
    with pytest.raises(usage.UsageError, match=why):
        tap.makeService(
            options(tmp_path, "--workers", "2", "--listen", listen), MemoryReactorClock()
        )


def test_a_state_dir_too_long_for_the_sockets_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(WORKER_ENV, raising=False)
    parsed = tap.Options()
    parsed.parseOptions(
        ["--state-dir", str(tmp_path / ("d" * 100)), "--workers", "2", "--listen", "tcp:8443"]
    )
    with pytest.raises(usage.UsageError, match="too long"):
        tap.makeService(parsed, MemoryReactorClock())


def test_a_worker_is_the_relay_with_its_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(WORKER_ENV, "1/2")
    parsed = options(tmp_path, "--workers", "2", "--listen", "tcp:8443:interface=127.0.0.1")
    service = tap.makeService(parsed, MemoryReactorClock())
    assert isinstance(service, RelayService)
    (worker,) = [s for s in service if isinstance(s, Worker)]
    assert (worker.index, worker.count) == (1, 2)
    assert service.relay.worker_status is worker and service.relay.elsewhere is worker
    monkeypatch.setenv(WORKER_ENV, "2/2")
    with pytest.raises(usage.UsageError, match="no such worker"):
        tap.makeService(parsed, MemoryReactorClock())
