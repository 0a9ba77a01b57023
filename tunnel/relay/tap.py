"""
``twistd tunnelrelay``: options and service construction.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from tunnel import __version__
from tunnel._daemon import LOG_FORMAT_OPTION, apply_log_format
from tunnel._malloc import tune_allocator
from tunnel._rate import parse_rate
from tunnel._reactor import lean_dispatch
from tunnel._signedtokens import TokenVerifier
from tunnel.relay._acme import (
    CHECK_INTERVAL,
    AcmeCSRIssuer,
    AcmeIssuer,
    AcmeService,
    AcmeStore,
    DNSHook,
    RenewalPolicy,
    issue_in_thread,
)
from tunnel.relay._certificate import CertificateRefused
from tunnel.relay._certs import ensure_dev_certificates
from tunnel.relay._certwatch import CertificateWatch, put_in_service
from tunnel.relay._issuer import DevCAIssuer
from tunnel.relay._supervisor import Supervisor
from tunnel.relay._tls import RelayTLS
from tunnel.relay._tokens import RevokedFile, TokenFile
from tunnel.relay._worker import (
    WORKER_ENV,
    admin_path,
    attach_worker,
    check_listen,
    parse_worker_env,
    probe_listen,
)
from tunnel.relay._workeradmin import merged_admin_site
from tunnel.relay.registry import ReclaimKey
from tunnel.relay.service import (
    Relay,
    RelayConfig,
    RelayService,
    parse_port_range,
)
from tunnel.wire import LinkSettings

__all__ = ["Options", "makeService"]

_log = Logger()


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "tunnels", "relay")


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise ValueError(f"{text} is not positive")
        return value

    return parse


def _workers(text: str) -> int:
    if text == "auto":
        return os.cpu_count() or 1
    value = int(text)
    if value < 1:
        raise ValueError(f"{text} is not a positive number of workers")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError(f"{text} is not in (0, 1]")
    return value


class Options(usage.Options):
    """
    Options of the relay. Listening addresses are endpoint strings.
    """

    synopsis = (
        "--domain DOMAIN [--listen tcp:443] [--cert C --key K | --acme URL --acme-dns-hook CMD] "
        "[options]"
    )
    longdesc = (
        f"The public relay of Tunnels {__version__}: terminates TLS for *.DOMAIN and "
        "dispatches each connection by SNI to the agent that owns the tunnel; raw TCP ports "
        "for unencrypted tunnels. Without --cert or --acme it runs in development mode with "
        "its own local CA."
    )

    optParameters = [
        ["domain", None, "tunnel.localhost", "Tunnels are <id>.DOMAIN."],
        ["listen", None, "tcp:443:backlog=1024", "Endpoint string of the public TLS listener."],
        ["public-port", None, None, "Port written into URLs (default: the listening port).", int],
        [
            "cert",
            None,
            None,
            "PEM certificate chain for DOMAIN and *.DOMAIN (reread when it changes and on SIGHUP).",
        ],
        ["key", None, None, "PEM private key of --cert."],
        [
            "acme",
            None,
            None,
            "ACME directory URL: obtain and renew the certificate for DOMAIN and *.DOMAIN "
            "with DNS-01 (instead of --cert/--key).",
        ],
        ["acme-email", None, None, "Contact address of the ACME account."],
        [
            "acme-dns-hook",
            None,
            None,
            "Command run as `CMD set NAME VALUE` / `CMD clear NAME VALUE` to publish and "
            "remove the _acme-challenge TXT record (required with --acme).",
        ],
        ["acme-ca", None, None, "PEM CA bundle to trust for the ACME server (default: system)."],
        [
            "acme-renew-before",
            None,
            None,
            "Renew this many seconds before expiry (default: when a third of the validity "
            "is left).",
            _positive(float),
        ],
        [
            "acme-check-interval",
            None,
            CHECK_INTERVAL,
            "Seconds between checks whether renewal is due (retries after a failure back "
            "off from 60 s, at most this long, at most an hour).",
            _positive(float),
        ],
        ["tcp-ports", None, "20000-29999", "Range of raw TCP tunnel ports, LOW-HIGH."],
        ["tcp-interface", None, None, "Address raw TCP ports bind to (default: all)."],
        [
            "tokens",
            None,
            None,
            "File of accepted agent tokens, one per line, each optionally followed by "
            "names=NAME,GLOB... (the tunnel names it may hold).",
        ],
        [
            "revoked",
            None,
            None,
            "File of revoked subjects and token ids (jti) of signed tokens, one per line "
            "(reread on change).",
        ],
        ["state-dir", None, None, "Directory for keys and development certificates."],
        ["handshake-timeout", None, 10.0, "Seconds a TLS handshake may take.", _positive(float)],
        [
            "client-hello-timeout",
            None,
            3.0,
            "Seconds from accept until the whole TLS ClientHello has arrived "
            "(at most --handshake-timeout).",
            _positive(float),
        ],
        [
            "max-pending-handshakes",
            None,
            1024,
            "TLS handshakes in progress at once.",
            _positive(int),
        ],
        [
            "max-pending-per-source",
            None,
            256,
            "TLS handshakes in progress at once from one IPv4 address or IPv6 /64.",
            _positive(int),
        ],
        ["max-tunnels-per-agent", None, 64, "Tunnels one agent may hold.", _positive(int)],
        ["max-streams-per-link", None, 4096, "Open streams per agent link.", _positive(int)],
        [
            "max-connections-per-tunnel",
            None,
            1024,
            "Open public connections per tunnel.",
            _positive(int),
        ],
        [
            "max-connections-per-source",
            None,
            256,
            "Of those, from one IPv4 address or IPv6 /64; more from it are closed at once.",
            _positive(int),
        ],
        [
            "source-reset-rate",
            None,
            100.0,
            "Public connections per second one IPv4 address or IPv6 /64 may end with a reset "
            "(TCP RST), after a burst of --source-reset-burst; past it its new connections "
            "are refused for 10 s, before any reaches an agent.",
            _positive(float),
        ],
        [
            "source-reset-burst",
            None,
            1000,
            "Resets one source may make at once above --source-reset-rate.",
            _positive(int),
        ],
        [
            "max-links-per-token",
            None,
            256,
            "Agent links one token may hold at once (one source address, without --tokens).",
            _positive(int),
        ],
        [
            "max-streams-per-token",
            None,
            16384,
            "Open streams over all the links of one token (or source, without --tokens).",
            _positive(int),
        ],
        [
            "tunnel-request-rate",
            None,
            10.0,
            "Tunnel requests per second one link may make, after a burst of "
            "--tunnel-request-burst; faster ones are refused (limit).",
            _positive(float),
        ],
        [
            "tunnel-request-burst",
            None,
            128,
            "Tunnel requests one link may make at once.",
            _positive(int),
        ],
        [
            "token-request-rate",
            None,
            50.0,
            "Tunnel requests per second over all the links of one token (or source), "
            "after a burst of --token-request-burst.",
            _positive(float),
        ],
        [
            "token-request-burst",
            None,
            1024,
            "Tunnel requests one token (or source) may make at once.",
            _positive(int),
        ],
        [
            "port-quarantine-share",
            None,
            0.1,
            "Fraction of --tcp-ports that one token (or source) may hold in the 300 s "
            "quarantine of released ports; past it, its own oldest is freed early.",
            _fraction,
        ],
        [
            "idle-timeout",
            None,
            None,
            "Close public connections idle this many seconds.",
            _positive(float),
        ],
        [
            "max-rate",
            None,
            None,
            "Most bytes per second one tunnel may carry each way (10MB/s, 1GB/s, 8MiB/s); "
            "tunnels without a rate limit get it, higher ones are lowered to it "
            "(default: none).",
            parse_rate,
        ],
        ["keepalive-interval", None, 5.0, "Seconds between keepalive pings.", _positive(float)],
        ["keepalive-timeout", None, 15.0, "Seconds of silence that end a link.", _positive(float)],
        ["drain-grace", None, 30.0, "Seconds streams may finish after SIGTERM.", float],
        ["admin", None, None, "Endpoint for /metrics and /status (keep it on loopback)."],
        [
            "workers",
            None,
            None,
            "Worker processes sharing the listener (default auto: one per core, where the "
            "listener can be shared); 1: one process.",
            _workers,
        ],
        [
            "max-window",
            None,
            16,
            "MiB a stream's receive window may auto-tune up to.",
            _positive(int),
        ],
        LOG_FORMAT_OPTION,
    ]

    def __init__(self) -> None:
        super().__init__()
        self["token-key"] = []
        #: The arguments as given (the supervisor starts its workers with them).
        self.arguments: list[str] = []

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        self.arguments = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_token_key(self, path: str) -> None:
        """PEM public key (Ed25519) whose signed tokens are accepted (repeatable: rotation)."""
        self["token-key"].append(path)

    def postOptions(self) -> None:
        apply_log_format(self)
        if bool(self["cert"]) != bool(self["key"]):
            raise usage.UsageError("--cert and --key go together")
        self._check_acme()
        try:
            self["tcp-ports"] = parse_port_range(self["tcp-ports"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        domain = self["domain"].strip().lower().rstrip(".")
        if not domain or "/" in domain or ":" in domain:
            raise usage.UsageError(f"--domain {self['domain']!r} is not a domain name")
        self["domain"] = domain
        if self["state-dir"] is None:
            self["state-dir"] = _default_state_dir()

    def _check_acme(self) -> None:
        acme_only = ["acme-email", "acme-dns-hook", "acme-ca", "acme-renew-before"]
        if not self["acme"]:
            given = [f"--{name}" for name in acme_only if self[name] is not None]
            if given:
                raise usage.UsageError(f"{', '.join(given)} go with --acme")
            return
        if self["cert"]:
            raise usage.UsageError(
                "--acme and --cert/--key are mutually exclusive: with --acme the relay "
                "obtains its certificate itself"
            )
        if not self["acme"].startswith(("https://", "http://")):
            raise usage.UsageError(f"--acme {self['acme']!r} is not a directory URL")
        if not self["acme-dns-hook"]:
            raise usage.UsageError(
                "--acme needs --acme-dns-hook CMD: the command that publishes the DNS-01 "
                "TXT record (see docs/deployment.md)"
            )
        try:
            argv = shlex.split(self["acme-dns-hook"])
        except ValueError as e:
            raise usage.UsageError(f"--acme-dns-hook: {e}") from None
        if not argv or shutil.which(argv[0]) is None:
            raise usage.UsageError(
                f"--acme-dns-hook: {argv[0] if argv else 'empty command'!r} is not an "
                "executable (give a path, or a command on PATH)"
            )
        if self["acme-ca"] is not None and not os.access(self["acme-ca"], os.R_OK):
            raise usage.UsageError(f"--acme-ca {self['acme-ca']}: cannot read it")


def _ephemeral_overlap(low: int, high: int) -> tuple[int, int] | None:
    """
    The kernel's range of ports for outgoing connections, when it overlaps `low`-`high`.

    A port of the TCP range that an outgoing connection happens to hold cannot be listened
    on, so a reclaimed tunnel would not get its port back.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            first, last = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return None
    if low <= last and first <= high:
        return first, last
    return None


def _listen_port(listen: str) -> int | None:
    for part in listen.split(":")[1:]:
        if part.isdigit() and int(part) > 0:
            return int(part)
    return None


def makeService(options: Options, reactor: Any = None) -> service.IService:
    """
    Build the relay's service from parsed options: the relay, or with ``--workers`` N > 1
    the supervisor of N workers (`tunnel.relay._supervisor`), each of them the relay.
    """
    worker = os.environ.get(WORKER_ENV)
    if worker is None and options["workers"] is None:
        options["workers"] = _default_workers(options)
    if worker is None and options["workers"] > 1:
        return _supervisor(options, reactor)
    index = count = 0
    if worker is not None:
        try:
            index, count = parse_worker_env(worker)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
    # With --acme, worker 0 runs the orders; the others serve what it stores.
    relay_service = _relay_service(options, reactor, acme_orders=index == 0)
    if worker is not None:
        attach_worker(
            relay_service.reactor,
            relay_service,
            index,
            count,
            options["state-dir"],
            options["listen"],
        )
    return relay_service


def _default_workers(options: Options) -> int:
    """
    The number of workers when ``--workers`` is not given: one per core, or one process
    where workers cannot share the listener (an endpoint other than ``tcp:``/``tcp6:`` with
    a fixed port, or a state directory too long for their sockets); said in the log.
    """
    cores = os.cpu_count() or 1
    if cores == 1:
        return 1
    try:
        check_listen(options["listen"])
    except ValueError as e:
        _log.info("one relay process, not one per core: {why}", why=str(e))
        return 1
    if len(admin_path(options["state-dir"], cores - 1).encode()) > _SOCKET_PATH_MAX:
        _log.info("one relay process, not one per core: --state-dir is too long for sockets")
        return 1
    return cores


#: The longest path of a UNIX socket (``sun_path`` is 108 octets on Linux, with a margin).
_SOCKET_PATH_MAX = 100


def _supervisor(options: Options, reactor: Any) -> service.IService:
    """
    The supervisor of ``--workers`` workers. What the workers share is created here first
    (the state directory, the reclaim key, the development certificates) by building the
    relay's service once, which checks every option as a worker will; it is not started.
    """
    try:
        check_listen(options["listen"])
    except ValueError as e:
        raise usage.UsageError(f"--listen with --workers: {e}") from None
    longest = admin_path(options["state-dir"], options["workers"] - 1)
    if len(longest.encode()) > _SOCKET_PATH_MAX:
        raise usage.UsageError(
            f"--state-dir is too long for the workers' sockets ({longest!r}): give a shorter one"
        )
    try:
        probe_listen(options["listen"])
    except OSError as e:
        raise usage.UsageError(f"cannot listen on {options['listen']}: {e}") from None
    relay_service = _relay_service(options, reactor)
    return Supervisor(
        relay_service.reactor,
        options["workers"],
        options.arguments,
        options["state-dir"],
        options["drain-grace"],
        admin=options["admin"],
        admin_site=merged_admin_site,
    )


def _relay_service(options: Options, reactor: Any = None, acme_orders: bool = True) -> RelayService:
    """
    The relay's service (one process, or one worker) from parsed options. With --acme and
    not `acme_orders`, the certificate is the one another process orders and stores (the
    files of the ACME store are watched); passthrough certificates are ordered here. A
    worker does not repeat the start-up warnings that its supervisor gave.
    """
    warn = _log.warn if WORKER_ENV not in os.environ else lambda *a, **k: None
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
        # twistd's own reactor (the daemon owns it): drop the per-event log context from its
        # dispatch, and keep socket-read buffers off mmap. A reactor passed in (a test's, an
        # embedding program's) and its process are left alone.
        lean_dispatch(reactor)
        tune_allocator()
    state_dir = options["state-dir"]
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    domain = options["domain"]
    # With --cert, the certificate comes from the files (below); with --acme, from the ACME
    # service once it is issued: until then the relay has none, and handshakes fail.
    tls = RelayTLS()
    if not (options["acme"] or options["cert"]):
        dev = ensure_dev_certificates(state_dir, domain)
        tls = RelayTLS(dev.cert_path, dev.key_path)
        warn(
            "development mode: certificate for {domain} and *.{domain} signed by a local CA; "
            "trust it with: curl --cacert {ca} / TUNNEL_CA={ca}",
            domain=domain,
            ca=dev.ca_path,
        )
    overlap = _ephemeral_overlap(*options["tcp-ports"])
    if overlap is not None:
        warn(
            "--tcp-ports {low}-{high} overlaps the ephemeral port range {first}-{last}: a port "
            "held by an outgoing connection cannot be listened on, so tunnels may not get "
            "their ports back after a reconnect",
            low=options["tcp-ports"][0],
            high=options["tcp-ports"][1],
            first=overlap[0],
            last=overlap[1],
        )
    tokens = tokens_file = None
    if options["tokens"]:
        tokens_file = TokenFile(options["tokens"])
        try:
            tokens = tokens_file.read()
        except (OSError, ValueError) as e:
            raise usage.UsageError(str(e)) from None
    verifier = None
    if options["token-key"]:
        try:
            verifier = TokenVerifier.from_files(options["token-key"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
    revoked: frozenset[str] = frozenset()
    revoked_file = None
    if options["revoked"]:
        if verifier is None:
            raise usage.UsageError("--revoked names signed tokens: give --token-key too")
        revoked_file = RevokedFile(options["revoked"])
        try:
            revoked = revoked_file.read()
        except OSError as e:
            raise usage.UsageError(str(e)) from None
    if tokens is None and verifier is None:
        warn(
            "NO --tokens OR --token-key GIVEN: THIS RELAY ACCEPTS ANY AGENT, AND LETS IT HOLD "
            "ANY TUNNEL NAME. Use --tokens or --token-key in production."
        )
    # 0: the port the listener gets (for tcp:0), filled in once it listens.
    public_port = options["public-port"] or _listen_port(options["listen"]) or 0
    config = RelayConfig(
        domain=domain,
        public_port=public_port,
        tcp_ports=options["tcp-ports"],
        tcp_interface=options["tcp-interface"] or "",
        tokens=tokens,
        tokens_file=tokens_file,
        token_verifier=verifier,
        revoked=revoked,
        revoked_file=revoked_file,
        handshake_timeout=options["handshake-timeout"],
        client_hello_timeout=min(options["client-hello-timeout"], options["handshake-timeout"]),
        max_pending_handshakes=options["max-pending-handshakes"],
        max_pending_per_source=options["max-pending-per-source"],
        max_tunnels_per_agent=options["max-tunnels-per-agent"],
        max_streams_per_link=options["max-streams-per-link"],
        max_connections_per_tunnel=options["max-connections-per-tunnel"],
        max_connections_per_source=options["max-connections-per-source"],
        source_reset_rate=options["source-reset-rate"],
        source_reset_burst=options["source-reset-burst"],
        max_links_per_token=options["max-links-per-token"],
        max_streams_per_token=options["max-streams-per-token"],
        tunnel_request_rate=options["tunnel-request-rate"],
        tunnel_request_burst=options["tunnel-request-burst"],
        token_request_rate=options["token-request-rate"],
        token_request_burst=options["token-request-burst"],
        port_quarantine_share=options["port-quarantine-share"],
        idle_timeout=options["idle-timeout"],
        max_rate=options["max-rate"],
        keepalive_interval=options["keepalive-interval"],
        keepalive_timeout=options["keepalive-timeout"],
        drain_grace=options["drain-grace"],
        link=LinkSettings(max_window=options["max-window"] * 1024 * 1024),
    )
    relay = Relay(
        reactor,
        config,
        tls,
        ReclaimKey.load_or_create(os.path.join(state_dir, "reclaim.key")),
    )
    relay_service = RelayService(reactor, relay, options["listen"], options["admin"])
    certificates: CertificateWatch | AcmeService | None = None
    install = functools.partial(put_in_service, relay)
    if options["cert"]:
        certificates = CertificateWatch(
            reactor,
            options["cert"],
            options["key"],
            domain,
            lambda pair: put_in_service(relay, pair),
        )
        try:
            certificates.install_first()
        except CertificateRefused as e:
            raise usage.UsageError(f"--cert/--key: {e}") from None
    elif options["acme"]:
        store = AcmeStore(state_dir, options["acme"])
        issuer = AcmeIssuer(
            store, DNSHook(options["acme-dns-hook"]), options["acme-email"], options["acme-ca"]
        )
        # Passthrough tunnels' certificates come from the same CA, through the same hook.
        relay.issuer = AcmeCSRIssuer(
            lambda csr, names: issue_in_thread(reactor, issuer, csr, names)
        )
        if acme_orders:
            certificates = AcmeService(
                reactor,
                domain,
                store,
                lambda csr: issue_in_thread(reactor, issuer, csr),
                install,
                RenewalPolicy(options["acme-renew-before"], options["acme-check-interval"]),
            )
        else:
            certificates = CertificateWatch(
                reactor, store.cert_path, store.key_path, domain, install
            )
            if os.path.exists(store.cert_path):
                try:
                    certificates.install_first()
                except CertificateRefused as e:
                    _log.warn("the stored ACME certificate is not served (yet): {e}", e=e)
    else:
        # Development mode: the local CA also signs the certificates of passthrough
        # tunnels (an agent's CSR for its tunnel's name; the key stays with the agent).
        relay.issuer = DevCAIssuer.from_state_dir(state_dir)
    if certificates is not None:
        # Started before the public listener (children start first), stopped after it.
        certificates.setServiceParent(relay_service)
        relay_service.reload_hooks.append(certificates.reload)
    return relay_service
