"""Several workers, each listening on a socket of its own.

uvicorn's workers share one listening socket, and whichever worker is waiting in `accept` takes
the next connection. When many connections arrive together (a load balancer's pool, a benchmark's
64), one worker often takes all of them while the others idle: the server then has one core's
throughput however many workers it runs (Kludex/uvicorn#2472). On Linux, `SO_REUSEPORT` gives
every worker a listening socket of its own on the same port, and the kernel spreads connections
across them by a hash of their addresses.

uvicorn's supervisor hands the one list of sockets it was given to every worker it starts,
restarts or adds, so no socket bound in the supervisor can be a worker's own. What it hands out
is a `ReusePortSocket`: a socket in the supervisor, which holds the port while the server runs,
and which becomes a freshly bound one in each worker as the worker unpickles its arguments.

NOTE: a worker that dies, or that SIGHUP's rolling restart retires, resets the connections still
waiting in its own accept queue (with one shared socket, another worker would have accepted
them); Linux 5.14's `net.ipv4.tcp_migrate_req=1` hands them to the other workers instead.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

SPREADS_CONNECTIONS = sys.platform == "linux"
"""Only Linux balances connections across `SO_REUSEPORT` sockets; elsewhere workers share one."""


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _refuse_a_taken_port(host: str, port: int) -> None:
    """Raise `OSError` if anything is bound to the port.

    A socket with `SO_REUSEPORT` could join another server's listeners on the port (a second
    `make run`, an older version still running), and the two would silently share its traffic.
    A bind without it fails instead, as a single worker's would.
    """
    with socket.socket(_family(host)) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        probe.bind((host, port))


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(_family(host))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class ReusePortSocket(socket.socket):
    """Bound, never listening, in the process that makes it; bound anew in each that unpickles it.

    Only listening sockets take connections, so the supervisor's own takes none.
    """

    @classmethod
    def for_workers(cls, host: str, port: int) -> ReusePortSocket:
        _refuse_a_taken_port(host, port)
        bound = _bind(host, port)
        # The same open socket, under this class: the supervisor pickles it for each worker.
        return cls(bound.family, bound.type, bound.proto, bound.detach())

    def __reduce__(self) -> tuple[Any, ...]:
        host, port = self.getsockname()[:2]
        return (_bind, (host, port))
