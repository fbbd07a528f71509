"""A free TCP port on this machine, for the servers cogpipe starts and the tests and benches
that start them (training's rendezvous, the temporary Prefect server, serve-api)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port free on 127.0.0.1 now: the OS picks it; it stays free until someone binds it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
