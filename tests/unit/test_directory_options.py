"""
``twistd tunnelrelay --workers``: the option, what the supervisor refuses at start, and that
``--workers 1`` (the default) builds the relay of one process as before.
"""

from __future__ import annotations

import os
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
    assert options(tmp_path)["workers"] == 1
    assert options(tmp_path, "--workers", "3")["workers"] == 3
    assert options(tmp_path, "--workers", "auto")["workers"] == (os.cpu_count() or 1)
    for bad in ("0", "-1", "many"):
        with pytest.raises(usage.UsageError):
            options(tmp_path, "--workers", bad)


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
    service = tap.makeService(options(tmp_path, "--listen", "tcp:0"), MemoryReactorClock())
    assert isinstance(service, RelayService)
    assert not any(isinstance(s, Worker) for s in service)
    assert service.relay.worker_status is None


def test_several_workers_are_a_supervisor_with_the_state_made_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(WORKER_ENV, raising=False)
    parsed = options(tmp_path, "--workers", "2", "--listen", "tcp:8443:interface=127.0.0.1")
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
