"""A free TCP port for a server about to be started here: Ray heads and dashboards, MLflow, S3 test servers, the
rendezvous of a process group."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at ``host`` now, picked by the OS (another process could still take it first)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
