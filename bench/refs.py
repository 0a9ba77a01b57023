"""Reference servers and paths built from C programs: nginx, OpenSSH ``ssh -R``, HAProxy.

``start_backends`` starts what every path forwards to (nginx, ``bench.servers``) and makes
the TLS material; the registered paths put ``ssh -R`` (with and without TCP_NODELAY) and
HAProxy TLS termination with SNI routing in front of them.  HAProxy + ``ssh -R`` is, in C,
the assembly our relay + agent replace: TLS with SNI dispatch, then one multiplexed link.

No system service is touched: each program runs in the foreground with its own config file
in the run's temporary directory, listening on a free 127.0.0.1 port.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

from bench.paths import (
    WANS,
    BenchPath,
    Context,
    Endpoint,
    HttpTarget,
    register,
    wait_json_line,
)
from bench.util import CACHE_DIR, LOOPBACK, ProcessGroup, free_port, run, wait_port

BIG_SIZE = 1 << 30
SMALL_BODY = b"x" * 99 + b"\n"


def big_file() -> Path:
    """A 1 GiB sparse file under ``bench/.cache`` (created once; reads cost no disk I/O)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / "big-1GiB.bin"
    if not path.exists() or path.stat().st_size != BIG_SIZE:
        with open(path, "wb") as f:
            f.truncate(BIG_SIZE)
    return path


def warm(path: Path) -> None:
    """Read ``path`` once so the first measured download does not fill the page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        while f.readinto(buf):
            pass


def make_certs(directory: Path, domain: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a leaf for ``*.domain``; returns (ca.pem, cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"*.{domain}")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(f"*.{domain}"), x509.DNSName(domain)]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_file, cert_file, key_file = (directory / n for n in ("ca.pem", "cert.pem", "key.pem"))
    ca_file.write_bytes(ca.public_bytes(pem))
    cert_file.write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    key_file.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_file.chmod(0o600)
    return ca_file, cert_file, key_file


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    default_type application/octet-stream;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    server {{
        listen {host}:{port} backlog=4096;
        server_name _;
        root {d}/www;
        location = /small {{ }}
        location = /big {{ }}
    }}
}}
"""


def start_nginx(directory: Path, procs: ProcessGroup) -> tuple[int, str]:
    """nginx serving ``/small`` (100 bytes) and ``/big`` (1 GiB); returns (port, command)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tmp").mkdir(exist_ok=True)
    www = directory / "www"
    www.mkdir(exist_ok=True)
    (www / "small").write_bytes(SMALL_BODY)
    big = www / "big"
    if not big.exists():
        big.symlink_to(big_file())
    warm(big)
    port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=directory, host=LOOPBACK, port=port, user=user))
    argv = ["nginx", "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)]
    proc = procs.spawn(argv, log=directory / "stdout.log")
    wait_port(port)
    if proc.poll() is not None:
        raise RuntimeError(f"nginx exited: {(directory / 'error.log').read_text()[-500:]}")
    return port, " ".join(argv)


def start_backends(workdir: Path, quick: bool) -> tuple[Context, list[str]]:
    """Start nginx and ``bench.servers`` and make the TLS material; returns the context."""
    procs = ProcessGroup()
    try:
        certs = workdir / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        ca, cert, key = make_certs(certs, "bench.localhost")
        nginx_port, nginx_cmd = start_nginx(workdir / "nginx", procs)
        argv = [sys.executable, "-m", "bench.servers"]
        srv = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        procs.procs.append(srv)
        ports = wait_json_line(srv)
        ctx = Context(
            workdir=workdir,
            nginx_port=nginx_port,
            data_port=int(ports["data"]),  # type: ignore[call-overload]
            echo_port=int(ports["echo"]),  # type: ignore[call-overload]
            ca_file=ca,
            cert_file=cert,
            key_file=key,
            quick=quick,
            procs=procs,
        )
    except BaseException:
        procs.stop_all()
        raise
    return ctx, [nginx_cmd, " ".join(argv)]


SSHD_CONF = """\
ListenAddress {host}
Port {port}
HostKey {d}/host_key
AuthorizedKeysFile {d}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
GatewayPorts no
X11Forwarding no
PrintMotd no
PidFile none
MaxStartups 100:30:200
LogLevel ERROR
"""


class SshReverse(BenchPath):
    """Our own ``sshd`` plus one ``ssh -R`` client carrying three forwards (web, data, echo)."""

    name = "ssh-R"
    title = "ssh -N -R (Nagle on)"
    tty: ClassVar[bool] = False

    def start(self) -> None:
        d = self.dir
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], 30)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "id")], 30)
        (d / "authorized_keys").write_text((d / "id.pub").read_text())
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        sshd_port = free_port()
        (d / "sshd_config").write_text(SSHD_CONF.format(host=LOOPBACK, port=sshd_port, d=d))
        self.spawn(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")], "sshd.log")
        wait_port(sshd_port)
        if self.wan is not None:
            # The ssh connection is the link that crosses the WAN, as the agent's link does.
            sshd_port = self.start_wan_proxy([sshd_port])[0]
        self.web_port, self.data_port, self.echo_port = free_port(), free_port(), free_port()
        argv = [
            "ssh", "-F", "/dev/null", "-i", str(d / "id"), "-p", str(sshd_port),
            "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR",
        ]  # fmt: skip
        for rport, target in (
            (self.web_port, self.ctx.nginx_port),
            (self.data_port, self.ctx.data_port),
            (self.echo_port, self.ctx.echo_port),
        ):
            argv += ["-R", f"{LOOPBACK}:{rport}:{LOOPBACK}:{target}"]
        if self.tty:
            # -tt allocates a pty, and ssh/sshd then set TCP_NODELAY on the connection.
            argv += ["-tt", f"root@{LOOPBACK}", "sleep 3600"]
            self.ssh = self.spawn(argv, "ssh.log", stdin=subprocess.PIPE)
        else:
            argv += ["-N", f"root@{LOOPBACK}"]
            self.ssh = self.spawn(argv, "ssh.log")
        for port in (self.web_port, self.data_port, self.echo_port):
            if self.ssh.poll() is not None:
                raise RuntimeError(f"ssh exited: {(d / 'ssh.log').read_text()[-500:]}")
            wait_port(port, timeout=15)
        self.set_targets()

    def set_targets(self) -> None:
        """Point the measurements at the forwarded ports (overridden by HAProxy paths)."""
        self.http = HttpTarget(f"http://{LOOPBACK}:{self.web_port}")
        self.tcp = Endpoint(LOOPBACK, self.data_port)
        self.echo = Endpoint(LOOPBACK, self.echo_port)


@register
class SshReverseN(SshReverse):
    """``ssh -N -R``: no pty, so OpenSSH leaves Nagle's algorithm on.

    Nagle + delayed ACKs cost ~40 ms per connection, so 100 connections, not 1,000, are timed.
    """

    name = "ssh-R"
    title = "ssh -N -R (Nagle on)"
    tty = False
    connect_count = 100


@register
class SshReverseTty(SshReverse):
    """``ssh -tt -R ... 'sleep 3600'``: a pty, so OpenSSH sets TCP_NODELAY."""

    name = "ssh-R-tt"
    title = "ssh -tt -R (TCP_NODELAY)"
    tty = True


class _SshWan(SshReverse):
    """``ssh -R`` whose ssh connection crosses ``wan`` (ssh dials sshd through the proxy)."""

    def set_targets(self) -> None:
        super().set_targets()
        self.http = None


for _wan in WANS:
    for _base in (SshReverseN, SshReverseTty):
        register(
            type(
                f"{_base.__name__}Wan_{_wan.tag}",
                (_SshWan,),
                {
                    "name": f"{_base.name}-wan-{_wan.tag}",
                    "title": f"{_base.title}, ssh link over {_wan.rtt_ms:g} ms / "
                    f"{_wan.rate_mbps:g} Mbit/s",
                    "tty": _base.tty,
                    "wan": _wan,
                },
            )
        )


HAPROXY_CONF = """\
global
    maxconn 9000
    tune.ssl.default-dh-param 2048
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend tls
    bind {host}:{port} ssl crt {pem}
    use_backend data if {{ ssl_fc_sni -i data.{domain} }}
    use_backend echo if {{ ssl_fc_sni -i echo.{domain} }}
    use_backend web if {{ ssl_fc_sni -m end .{domain} }}
backend web
    server s {host}:{web}
backend data
    server s {host}:{data}
backend echo
    server s {host}:{echo}
"""


class HaproxySsh(SshReverse):
    """HAProxy terminating TLS and routing by SNI (``mode tcp``) to the ``ssh -R`` ports."""

    def start(self) -> None:
        super().start()
        d, ctx = self.dir, self.ctx
        pem = d / "haproxy.pem"
        pem.write_bytes(ctx.cert_file.read_bytes() + ctx.key_file.read_bytes())
        pem.chmod(0o600)
        port = free_port()
        conf = HAPROXY_CONF.format(
            host=LOOPBACK, port=port, pem=pem, domain=ctx.domain,
            web=self.web_port, data=self.data_port, echo=self.echo_port,
        )  # fmt: skip
        (d / "haproxy.cfg").write_text(conf)
        self.spawn(["haproxy", "-db", "-f", str(d / "haproxy.cfg")], "haproxy.log")
        wait_port(port)
        ca = str(ctx.ca_file)
        self.http = HttpTarget(f"https://x.{ctx.domain}:{port}", cafile=ca)
        self.tcp = Endpoint(LOOPBACK, port, sni=f"data.{ctx.domain}", cafile=ca)
        self.echo = Endpoint(LOOPBACK, port, sni=f"echo.{ctx.domain}", cafile=ca)

    def set_targets(self) -> None:
        """Targets are set after HAProxy starts."""


@register
class HaproxySshN(HaproxySsh):
    """HAProxy TLS → ``ssh -N -R`` → servers (only with ``--only``: Nagle's 40 ms stalls
    make it slow to measure, and ``haproxy-ssh-R-tt`` is the fair reference)."""

    name = "haproxy-ssh-R"
    title = "HAProxy TLS+SNI → ssh -N -R"
    tty = False
    default = False


@register
class HaproxySshTty(HaproxySsh):
    """HAProxy TLS → ``ssh -tt -R`` → servers."""

    name = "haproxy-ssh-R-tt"
    title = "HAProxy TLS+SNI → ssh -tt -R"
    tty = True
