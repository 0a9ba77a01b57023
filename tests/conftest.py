"""Shared fixtures: development certificates, relay TLS contexts, logged-error checks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import globalLogPublisher

from tunnel.relay._certs import DevCertificates, ensure_dev_certificates

DOMAIN = "tunnel.localhost"


@pytest.fixture(scope="session")
def dev_certs(tmp_path_factory: pytest.TempPathFactory) -> DevCertificates:
    """A development CA and wildcard certificate for ``tunnel.localhost``."""
    return ensure_dev_certificates(str(tmp_path_factory.mktemp("dev-certs")), DOMAIN)


@pytest.fixture
def logged_failures() -> Iterator[list[dict[str, Any]]]:
    """Collects events logged with a failure (``log.failure``, unhandled errors)."""
    failures: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            failures.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield failures
    finally:
        globalLogPublisher.removeObserver(observer)
