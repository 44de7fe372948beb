"""The greeter package's build backend: setuptools, after the project's one proto command.

pip, ``python -m build`` and the Ansible role all build the package through this file
(pyproject.toml's ``backend-path``), so every install, editable or not, with build isolation or
without, gets the gRPC stubs compiled from ``protos/`` next to ``service/``; no one has to run
``protos/compile.py`` first. In an isolated build grpcio-tools comes from ``[build-system]
requires``; without isolation (the role) from the virtualenv, which service/requirements.txt
gives it. An sdist has no ``protos/``: it carries the modules compiled when it was made.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from setuptools import build_meta
from setuptools.build_meta import *  # noqa: F403 -- every other hook is setuptools' own

SERVICE = Path(__file__).resolve().parents[1]
COMPILE = SERVICE.parent / "protos" / "compile.py"
PACKAGE = SERVICE / "src" / "greeter"


def compile_protos() -> None:
    """Run ``protos/compile.py`` with the build's interpreter, or check an sdist's modules."""
    if COMPILE.is_file():
        # The build environment's interpreter, which has grpcio-tools (isolated or not).
        subprocess.run([sys.executable, str(COMPILE), "--out", str(SERVICE / "src")], check=True)
        return
    if not any(PACKAGE.glob("*_pb2.py")):
        raise RuntimeError(
            f"greeter: cannot build the package without its gRPC modules: {COMPILE} is missing "
            f"(build from a checkout of the whole repository, which has protos/) and "
            f"{PACKAGE} holds no compiled *_pb2.py (an sdist made by this backend carries "
            "them). Nothing was built."
        )


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    compile_protos()
    return build_meta.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    compile_protos()
    return build_meta.build_editable(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    compile_protos()
    return build_meta.build_sdist(sdist_directory, config_settings)
