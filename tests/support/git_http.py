"""A git server that wants a password: bare repositories over git's dumb HTTP protocol, behind
HTTP basic authentication, so a URL carrying credentials (http://user:TOKEN@host/x.git) is the
only way in. Proves the role hands those credentials to git and shows or stores them nowhere.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class GitHttp:
    """A running server: `url(name)` is the URL of repository `name` with the credentials in it."""

    address: str
    port: int
    user: str
    token: str
    admitted: list[str] = field(default_factory=list)  # client addresses that got a file
    refused: int = 0  # requests without the right credentials

    def url(self, name: str) -> str:
        return f"http://{self.user}:{self.token}@{self.address}:{self.port}/{name}"


def publish(bare: Path) -> None:
    """Write the files a dumb-HTTP client reads (info/refs, objects/info/packs): needed again
    after every change to the repository's refs."""
    subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True)


@contextlib.contextmanager
def git_over_http(root: Path, address: str, user: str, token: str) -> Iterator[GitHttp]:
    """Serve the bare repositories under `root` at http://`address`:<a free port>/<name>, to
    `user` with password `token` only (401 to anyone else, as a git host answers)."""
    wanted = "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()

    class Handler(SimpleHTTPRequestHandler):
        def authorized(self) -> bool:
            if self.headers.get("Authorization") == wanted:
                server.admitted.append(self.client_address[0])
                return True
            server.refused += 1
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False

        def do_GET(self) -> None:
            if self.authorized():
                super().do_GET()

        def do_HEAD(self) -> None:
            if self.authorized():
                super().do_HEAD()

        def log_message(self, *args: object) -> None:  # quiet: the test reads `server`
            pass

    httpd = ThreadingHTTPServer((address, 0), functools.partial(Handler, directory=str(root)))
    server = GitHttp(address, httpd.server_address[1], user, token)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
