"""
Tunnels: a public URL for a local port, through a relay you run.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
