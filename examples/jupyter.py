"""
JupyterLab behind a tunnel, protected by a token: the notebook of a container or a laptop,
reachable from a browser anywhere the relay is.

    TUNNEL_RELAY=localhost:8443 TUNNEL_CA=state/relay/ca.pem python examples/jupyter.py
    # JupyterLab: https://<id>.tunnel.localhost:8443/lab?token=...

Options: ``--port`` (JupyterLab's local port, default 8888), ``--token`` (default: a fresh
random one), ``--root-dir``. Ctrl-C (or SIGTERM) stops JupyterLab, then closes the tunnel.
Needs ``pip install jupyterlab``.

The tunnel comes first, so that JupyterLab can be told its public origin: its websockets
(the kernels' channels) then accept the tunnel's URL and no other, and the token guards the
rest. The same from a shell: ``tunnel run 8888 -- jupyter lab ...`` with the URL in
``$TUNNEL_URL_8888``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import tunnel


def jupyter_command(port: int, token: str, origin: str, root_dir: str) -> list[str]:
    """
    JupyterLab on loopback `port`, accepting `token` and websockets from `origin` only.
    """
    command = [
        *(sys.executable, "-m", "jupyterlab", "--no-browser"),
        *("--ip=127.0.0.1", f"--port={port}", "--port-retries=0"),
        f"--IdentityProvider.token={token}",
        # Requests arrive with the tunnel's Host; JupyterLab refuses non-local Hosts unless
        # told, and websockets whose Origin is not the tunnel's.
        "--ServerApp.allow_remote_access=True",
        f"--ServerApp.allow_origin={origin}",
        f"--ServerApp.root_dir={root_dir}",
    ]
    if os.geteuid() == 0:
        command.append("--allow-root")  # containers often run as root
    return command


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="JupyterLab behind a tunnel, with a token.")
    parser.add_argument("--port", type=int, default=8888, help="JupyterLab's local port")
    parser.add_argument("--token", help="the token to require (default: a random one)")
    parser.add_argument("--root-dir", default=".", help="the notebooks' directory")
    args = parser.parse_args(argv)
    token = args.token or secrets.token_urlsafe(24)
    # SIGTERM (a container stopping) ends JupyterLab as Ctrl-C does, not just this script.
    signal.signal(signal.SIGTERM, _interrupt)

    with tunnel.forward(args.port) as t:
        print(f"JupyterLab: {t.url}/lab?token={token}", flush=True)
        lab = subprocess.Popen(jupyter_command(args.port, token, t.url, args.root_dir))
        try:
            return lab.wait()
        except KeyboardInterrupt:
            lab.terminate()  # JupyterLab shuts its kernels down on SIGTERM
            try:
                lab.wait(30)
            except subprocess.TimeoutExpired:
                lab.kill()
                lab.wait()
            return 0


if __name__ == "__main__":
    sys.exit(main())
