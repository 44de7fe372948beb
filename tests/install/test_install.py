"""Every way of installing ./service yields a greeter package with its compiled gRPC modules.

Each test starts from a fresh ``git clone`` of the repository's HEAD, where no generated module
exists (they are never committed), and nobody runs ``protos/compile.py`` by hand: the package's
build does (service/build_backend/compile_protos.py). Before it did, ``make venv`` left a
``greeter`` that failed with ``cannot import name 'hello_pb2'``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib
from support.server import Server, clean_env

REPO = Path(__file__).resolve().parents[2]
COMPILED = {"greeter/hello_pb2.py", "greeter/hello_pb2_grpc.py", "greeter/hello_pb2.pyi"}
PIP = ["-m", "pip", "--disable-pip-version-check", "--no-input"]


def fresh_clone(dest: Path) -> Path:
    """A clone of the repository's committed HEAD, as a new user gets it; returns its service/."""
    head = subprocess.run(
        ["git", "-C", REPO, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", REPO, dest], check=True)
    subprocess.run(["git", "-C", dest, "checkout", "--quiet", "--detach", head], check=True)
    service = dest / "service"
    assert not list((service / "src" / "greeter").glob("*_pb2*")), "a clone has no compiled module"
    return service


def pip(python: Path | str, *args: str | Path, cwd: Path | None = None) -> None:
    done = subprocess.run(
        [python, *PIP, *args], check=False, capture_output=True, text=True, cwd=cwd, timeout=600
    )
    assert done.returncode == 0, f"pip {' '.join(map(str, args))} failed:\n{done.stderr[-3000:]}"


def wheel_names(folder: Path) -> set[str]:
    (wheel,) = folder.glob("greeter-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def test_pyproject_pins_the_grpcio_tools_of_the_releases() -> None:
    """An isolated build compiles with the protoc a release's own build (no isolation) uses."""
    requires = tomllib.loads((REPO / "service" / "pyproject.toml").read_text())["build-system"]
    requirements = (REPO / "service" / "requirements.txt").read_text()
    pinned = re.search(r"^grpcio-tools==\S+$", requirements, re.MULTILINE)
    assert pinned and pinned.group(0) in requires["requires"]


def test_a_wheel_built_without_isolation_carries_the_compiled_modules(tmp_path: Path) -> None:
    """The role's way: the virtualenv's own grpcio-tools and setuptools, no build isolation."""
    service = fresh_clone(tmp_path / "clone")
    pip(sys.executable, "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--wheel-dir", tmp_path / "wheels", service)  # fmt: skip
    assert wheel_names(tmp_path / "wheels") >= COMPILED


def build_sdist(service: Path, dest: Path) -> Path:
    """The sdist, made by calling the backend pyproject.toml names, as a build frontend does."""
    config = tomllib.loads((service / "pyproject.toml").read_text())["build-system"]
    script = (
        "import importlib, sys; sys.path[:0] = sys.argv[2].split(':'); "
        "print(importlib.import_module(sys.argv[1]).build_sdist(sys.argv[3]))"
    )
    backend_path = ":".join(str(service / p) for p in config.get("backend-path", []))
    made = subprocess.run(
        [sys.executable, "-c", script, config["build-backend"], backend_path, dest],
        check=True, capture_output=True, text=True, cwd=service,
    )  # fmt: skip
    return dest / made.stdout.strip().splitlines()[-1]


def test_an_sdist_carries_the_compiled_modules_and_builds_without_protos(tmp_path: Path) -> None:
    """An sdist has no ../protos: it must carry the modules, and a build without either fails
    and says why."""
    sdist = build_sdist(fresh_clone(tmp_path / "clone"), tmp_path / "dist")
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    assert not (unpacked.parent / "protos").exists()
    pip(sys.executable, "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--wheel-dir", tmp_path / "wheels", unpacked)  # fmt: skip
    assert wheel_names(tmp_path / "wheels") >= COMPILED

    for module in (unpacked / "src" / "greeter").glob("*_pb2*"):
        module.unlink()
    failed = subprocess.run(
        [sys.executable, *PIP, "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", tmp_path / "nothing", unpacked],
        check=False, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert failed.returncode != 0
    output = failed.stdout + failed.stderr
    assert "protos/compile.py is missing" in output and "Nothing was built." in output, output


@pytest.fixture(scope="module")
def new_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv, as a user makes one (``python3 -m venv``); returns its bin/."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    return venv / "bin"


@pytest.fixture
def greeting(new_venv: Path) -> Iterator:
    """Serve with the new venv's ``greeter-server``; greet it with its ``greeter``."""
    servers: list[Server] = []

    def greet(name: str) -> str:
        server = Server("--workers", "1", executable=str(new_venv / "greeter-server"))
        servers.append(server)
        done = subprocess.run(
            [new_venv / "greeter", "hello", server.target, name],
            check=False, capture_output=True, text=True, timeout=60, env=clean_env(),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    yield greet
    for server in servers:
        server.stop()


def compiled_module(bin_dir: Path) -> Path:
    found = subprocess.run(
        [bin_dir / "python", "-c", "from greeter import hello_pb2; print(hello_pb2.__file__)"],
        check=False, capture_output=True, text=True, env=clean_env(),
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    return Path(found.stdout.strip())


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_a_new_venv_with_build_isolation_serves_and_greets(
    tmp_path: Path, new_venv: Path, greeting, editable: bool
) -> None:
    """requirements.txt's way (``pip install -e ./service``, build isolation: grpcio-tools from
    [build-system] requires) and the plain ``pip install ./service`` both give a working
    ``greeter-server`` and ``greeter``; nothing else ran compile.py."""
    service = fresh_clone(tmp_path / "clone")
    pip(new_venv / "python", "install", "--quiet", *(["-e"] if editable else []), service)
    module = compiled_module(new_venv)
    # The editable install imports from the clone, the other from the venv's site-packages.
    assert module.is_relative_to(service if editable else new_venv.parent), module
    assert greeting("Teste") == "Olá, Teste!"


def make(clone: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", clone, *args],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_make_venv_is_light_and_nothing_needs_make_protos(tmp_path: Path) -> None:
    """``make venv`` installs requirements.txt alone (what the playbooks need); no target runs
    compile.py to make imports work (the package build does); a proto edit reinstalls."""
    clone = fresh_clone(tmp_path / "clone").parent
    venv = make(clone, "-n", "venv").stdout
    assert "-r requirements.txt" in venv and "requirements-dev" not in venv, venv
    for target in ("lint", "test", "demo", "lab-up", "bench"):
        dry = make(clone, "-n", target).stdout
        assert "-r requirements-dev.txt" in dry and "compile.py" not in dry, (target, dry)

    (clone / ".venv").mkdir()
    (clone / ".venv" / ".installed").touch()  # as if `make venv` had just run
    assert make(clone, "-q", "venv").returncode == 0
    for source in ("protos/hello.proto", "protos/compile.py"):
        later = (clone / ".venv" / ".installed").stat().st_mtime + 10
        os.utime(clone / source, (later, later))
        assert make(clone, "-q", "venv").returncode == 1, f"editing {source} must reinstall"
        (clone / ".venv" / ".installed").touch()
        os.utime(clone / ".venv" / ".installed", (later + 1, later + 1))
