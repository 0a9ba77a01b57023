"""Fixtures of the protocol tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted

from tests.protocol.inprocess import running_relay
from tunnel.relay.service import RelayService


@pytest_twisted.async_yield_fixture
async def relay(tmp_path: Path) -> AsyncIterator[RelayService]:
    """A relay in this process (state in ``tmp_path / "state"``)."""
    async for service in running_relay(tmp_path / "state"):
        yield service
