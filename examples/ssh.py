"""
An SSH server behind an unencrypted tunnel: ``ssh -p PORT user@HOST`` from anywhere that
reaches the relay, to a container or a laptop with no inbound connectivity.

    TUNNEL_RELAY=localhost:8443 TUNNEL_CA=state/relay/ca.pem python examples/ssh.py --port 22
    # ssh -p 23447 root@tunnel.localhost

An ``sshd`` must listen on the local port already (for instance Debian's openssh-server, with
your key in ``~/.ssh/authorized_keys``). SSH encrypts and authenticates on its own, so the
tunnel is ``unencrypted=True``: the relay gives it a raw TCP port and forwards the bytes as
they are, and ``ssh`` checks the server's host key as usual. The tunnel stays until Ctrl-C
(or SIGTERM). ``--allow 203.0.113.0/24`` lets only those clients reach the port.
"""

from __future__ import annotations

import argparse
import getpass
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import tunnel


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="sshd behind an unencrypted tunnel.")
    parser.add_argument("--port", type=int, default=22, help="the local sshd's port")
    parser.add_argument("--user", default=getpass.getuser(), help="the user to print")
    parser.add_argument("--allow", action="append", default=[], help="client networks")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)

    with tunnel.forward(args.port, unencrypted=True, allow=args.allow) as t:
        host, port = t.tcp_socket
        print(f"ssh -p {port} {args.user}@{host}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
