"""Compile every .proto in this folder into the ``greeter`` package.

This is the project's one proto command, and the greeter package's build runs it
(service/build_backend/compile_protos.py): every ``pip install`` of ./service, editable or
not, and so the Makefile's venv, the tests, the lab and the Ansible role, compiles with it.
Run by hand (``python protos/compile.py``, with an interpreter that has grpcio-tools) it
refreshes an editable install after a .proto edit. Generated code is never committed.

The ``-Igreeter=protos`` mapping makes protoc emit ``from greeter import hello_pb2``
instead of a bare top-level import, so the modules live inside the package.
"""

import argparse
import importlib.resources
import pathlib
import sys

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=HERE.parent / "service" / "src",
        help="source root that holds the greeter package (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    protos = sorted(str(p) for p in HERE.glob("*.proto"))
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    command = [
        "grpc_tools.protoc",
        f"-I{well_known}",
        f"-Igreeter={HERE}",
        f"--python_out={args.out}",
        f"--pyi_out={args.out}",
        f"--grpc_python_out={args.out}",
        *protos,
    ]
    status = protoc.main(command)
    if status != 0:
        print(f"protoc failed with status {status}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
