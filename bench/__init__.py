"""Benchmarks: Tunnels against direct loopback, OpenSSH ``ssh -R`` and HAProxy TLS.

Run with ``make bench`` (``python -m bench``).  See ``docs/performance.md``.
"""
