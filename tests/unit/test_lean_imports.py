"""
The plain-Python API's import graph stays lean, so that a cold start does not slowly grow
back (docs/performance.md, "Cold start"): `import tunnel` imports no Twisted and no TLS
library, and a process's first `tunnel.forward()` imports neither the modules of features
it does not use (the inspector's web server and metrics, the HTTP-proxy dialler, client
CAs) nor the relay's, the daemons' or the command line's.

Each check runs in a fresh interpreter and reads its `sys.modules`: a count of modules, not
a time.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import tunnel
from tunnel.testing import RelayProcess

ROOT = Path(tunnel.__file__).parent.parent

#: Not imported by `import tunnel`: Twisted and the TLS stack come with the first forward.
NOT_ON_IMPORT = ("twisted", "zope", "cryptography", "OpenSSL", "service_identity", "asyncio")

#: Not imported by a first `forward()` that uses none of these features (each a module or
#: a package, with its submodules).
NOT_ON_FORWARD = (
    # the inspector (forward(inspect=...)): Twisted's web server, the admin pages, metrics
    "twisted.web",
    "twisted.spread",
    "hyperlink",
    "prometheus_client",
    "tunnel._admin",
    "tunnel.agent._inspect",
    "tunnel.agent.admin",
    # an HTTP proxy to reach the relay through (proxy=, TUNNEL_PROXY)
    "tunnel.agent._httpconnect",
    # client certificate authorities (client_ca=)
    "tunnel._clientca",
    # the relay, the daemons, the command line
    "tunnel.relay",
    "tunnel.agent.tap",
    "tunnel._daemon",
    "tunnel.cli",
    "tunnel._run",
    "tunnel._console",
    "tunnel._token_cli",
    "tunnel.testing",
)

#: Prints the JSON list of the modules loaded after `import tunnel` (argv[1] == "import")
#: or after one `with tunnel.forward(PORT) as t: t.url` (argv[1] == PORT).
CHILD = """
import json, sys
import tunnel
if sys.argv[1] != "import":
    with tunnel.forward(int(sys.argv[1])) as t:
        assert t.url.startswith("https://"), t.url
print(json.dumps(sorted(sys.modules)))
"""


def _loaded(arg: str, env: dict[str, str] | None = None) -> set[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
    environ.update(env or {})
    p = subprocess.run(
        [sys.executable, "-c", CHILD, arg],
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
        cwd=str(ROOT),
        check=False,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return set(json.loads(p.stdout.strip().splitlines()[-1]))


def _among(loaded: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in loaded if any(m == n or m.startswith(n + ".") for n in names))


def test_import_tunnel_imports_no_twisted() -> None:
    loaded = _loaded("import")
    assert "tunnel" in loaded
    assert _among(loaded, NOT_ON_IMPORT) == []


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    d = tmp_path_factory.mktemp("lean-relay")
    proc = RelayProcess.start(d / "relay.log", state_dir=d / "state")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def local_port() -> Iterator[int]:
    # Something to forward; the test never connects to it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _forward_env(relay: RelayProcess) -> dict[str, str]:
    return {"TUNNEL_RELAY": f"localhost:{relay.port}", "TUNNEL_CA": str(relay.ca)}


def test_first_forward_imports_only_what_it_uses(relay: RelayProcess, local_port: int) -> None:
    loaded = _loaded(str(local_port), _forward_env(relay))
    # The forward did run on Twisted and its TLS (the check sees what a forward imports) ...
    assert {"tunnel.client", "tunnel.agent.session", "twisted.internet.reactor"} <= loaded
    assert "OpenSSL.SSL" in loaded
    # ... and nothing of the features it did not use.
    assert _among(loaded, NOT_ON_FORWARD) == []


def test_a_proxy_imports_the_proxy_dialler() -> None:
    # The same check sees a lazily imported module once its feature is used: the settings
    # of a forward through a proxy parse the proxy's address with the HTTP-proxy dialler.
    code = (
        "import json, sys\n"
        "from tunnel.agent.settings import connection_settings\n"
        "connection_settings('localhost:1', proxy='http://127.0.0.1:3128')\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(ROOT),
        check=True,
    )
    loaded = set(json.loads(p.stdout.strip().splitlines()[-1]))
    assert "tunnel.agent._httpconnect" in loaded
    assert "twisted.web" not in loaded
