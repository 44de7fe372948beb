"""The lab's wheelhouse over HTTP: ``python3 wheelserver.py ADDRESS PORT DIRECTORY``.

`python3 -m http.server` with a listen backlog for a fleet: socketserver's default
request_queue_size is 5, so when 25-50 hosts run pip at once the kernel drops the connections
beyond it and each waits a SYN retransmit (1 s, then 3 s, ...) before pip even asks.
"""

from __future__ import annotations

import functools
import sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class FleetServer(ThreadingHTTPServer):
    request_queue_size = 256  # above the largest lab (194 hosts), below net.core.somaxconn
    daemon_threads = True


def main(argv: list[str]) -> int:
    address, port, directory = argv
    handler = functools.partial(SimpleHTTPRequestHandler, directory=directory)
    with FleetServer((address, int(port)), handler) as server:
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
