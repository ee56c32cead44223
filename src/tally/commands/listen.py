"""Can ``tally serve`` listen on HOST:PORT? Asked before anything else is done, so a busy
port is one line (``tally: port 8000 on 127.0.0.1 is in use``) and not a banner, an opened
store and a JSON log line from the server's failed bind.

``python -m tally.commands.listen HOST PORT`` asks the same for ``make run`` (scripts/run.sh),
before it loads demo data or prints its banner. A check, not a reservation: a process that
takes the port in between still makes the server's own bind fail (rare, and still reported).
"""

from __future__ import annotations

import errno
import socket
import sys


def _bind(family: int, address: tuple[object, ...]) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # as the server binds: a port held only by connections in TIME_WAIT is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)


def listen_error(host: str, port: int) -> str | None:
    """Why a server could not listen on ``host:port`` now, or None when it can (port 0, an
    ephemeral port, always can)."""
    if port == 0:
        return None
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot listen on {host}: {exc.strerror}"
    for family, address in dict.fromkeys((a[0], a[4]) for a in addresses):
        try:
            _bind(family, address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is in use"
            return f"cannot listen on {host} port {port}: {exc.strerror or exc}"
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m tally.commands.listen HOST PORT", file=sys.stderr)
        return 2
    why = listen_error(argv[0], int(argv[1]))
    if why is not None:
        print(f"tally: {why}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
