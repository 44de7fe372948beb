"""The Greeter gRPC service: server, client commands and load tool."""

from importlib import metadata

try:
    __version__ = metadata.version("greeter")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
