"""The systemd notification protocol (sd_notify) in pure Python.

With ``Type=notify`` systemd considers the unit started only when the service sends
``READY=1``, so ``systemctl start/restart`` returns once the port really serves. The protocol
is one datagram on the unix socket named by ``NOTIFY_SOCKET``; a leading ``@`` means an
abstract socket. Without ``NOTIFY_SOCKET`` (not under systemd) this does nothing.
"""

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; return whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False  # a stale NOTIFY_SOCKET must not stop the service; the caller logs it
    return True
