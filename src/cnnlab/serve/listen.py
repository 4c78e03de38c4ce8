"""The server's listening socket, bound before the model is loaded, so that a port in use is said at once."""

from __future__ import annotations

import errno
import socket

from cnnlab.errors import CnnlabError


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), for the server to accept on; a port in use, or an address this machine
    does not have, is refused in one line."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as error:
        message = f"cannot listen on {host}: {error.strerror}; give an address of this machine with --host"
        raise CnnlabError(message) from None
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            raise CnnlabError(f"port {port} on {host} is in use; choose another with --port") from None
        raise CnnlabError(f"cannot listen on {host} port {port}: {error.strerror}") from None
    return listener
