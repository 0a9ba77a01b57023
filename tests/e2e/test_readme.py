"""
The README's Python snippets run as printed, against a real relay on loopback that they
find through ``TUNNEL_RELAY`` and ``TUNNEL_CA``, as a reader's shell would give it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import Relay, clean_env, run

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
#: What every snippet prints: the tunnels it made.
PRINTED = re.compile(
    r"^(https://[a-z0-9]+\.tunnel\.localhost:\d+"
    r"|\('[a-z0-9]+\.tunnel\.localhost', \d+\)"
    r"|\('tunnel\.localhost', \d+\))$"
)


def snippets() -> list[str]:
    return SNIPPET.findall(README.read_text())


def test_the_readme_has_its_snippets() -> None:
    found = snippets()
    assert len(found) >= 3
    assert any("task.react" in code for code in found)  # the Deferred one runs as printed


@pytest.mark.parametrize("index", range(len(snippets())))
def test_readme_snippet_runs_as_printed(relay: Relay, tmp_path: Path, index: int) -> None:
    code = snippets()[index]
    script = tmp_path / f"readme_{index}.py"
    script.write_text(code)
    env = clean_env({"TUNNEL_RELAY": f"localhost:{relay.port}", "TUNNEL_CA": str(relay.ca)})
    result = run([sys.executable, str(script)], timeout=60, env=env)
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, code + output + result.stderr.decode(errors="replace")
    lines = output.splitlines()
    assert lines and all(PRINTED.match(line) for line in lines), output
    assert len(lines) == code.count("print(")
