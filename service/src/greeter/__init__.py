"""The Greeter gRPC service: server, client commands and load tool."""


def __getattr__(name: str) -> str:
    # `greeter.__version__` on first use: importlib.metadata costs ~50 ms of start-up that the
    # client commands (the deploy's on-host probe among them) never need.
    if name != "__version__":
        raise AttributeError(f"module 'greeter' has no attribute {name!r}")
    from importlib import metadata  # noqa: PLC0415

    try:
        version = metadata.version("greeter")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        version = "0+unknown"
    globals()["__version__"] = version
    return version
