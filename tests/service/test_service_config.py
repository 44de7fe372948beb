"""Bad flags, environment values and files stop greeter-server before anything starts."""

import os
import socket
import subprocess

import pytest
from greeter import server as greeter_server
from support.net import free_port
from support.server import SERVER, Server, clean_env


def run_server(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SERVER, *args],
        capture_output=True,
        text=True,
        timeout=15,
        env=clean_env(**env),
        check=False,
    )


def assert_refused(code: object, stdout: str, stderr: str, status: int, *words: str) -> None:
    assert code == status, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr  # one clear line, not a traceback
    assert lines[0].startswith("greeter-server: error:")
    for word in words:
        assert word in lines[0]
    assert stdout == ""  # nothing logged: nothing started


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        ((), {"GREETER_PORT": "abc"}, ("GREETER_PORT", "'abc'")),
        ((), {"GREETER_PORT": "70000"}, ("GREETER_PORT", "1-65535")),
        (("--port", "70000"), {}, ("--port", "1-65535")),
        (("--port", "0"), {}, ("--port",)),
        (("--workers", "0"), {}, ("--workers",)),
        ((), {"GREETER_WORKERS": "-2"}, ("GREETER_WORKERS",)),
        ((), {"GREETER_THREADS": "many"}, ("GREETER_THREADS",)),
        ((), {"GREETER_GRACE": "-1"}, ("GREETER_GRACE",)),
        ((), {"GREETER_DRAIN_DELAY": "nan"}, ("GREETER_DRAIN_DELAY",)),
        ((), {"GREETER_MAX_NAME_CHARS": "0"}, ("GREETER_MAX_NAME_CHARS",)),
        ((), {"GREETER_MAX_MESSAGE_BYTES": "1e9"}, ("GREETER_MAX_MESSAGE_BYTES",)),
        ((), {"GREETER_LOG_LEVEL": "loud"}, ("GREETER_LOG_LEVEL", "debug")),
        (("--bind", ""), {}, ("--bind",)),
        (("--no-such-flag",), {}, ("--no-such-flag",)),
        (("--tls-cert", "/nonexistent/cert.pem"), {}, ("--tls-key",)),
        (("--tls-client-ca", "/etc/hostname"), {}, ("--tls-client-ca",)),
        (
            ("--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"),
            {},
            ("--tls-cert", "/nonexistent/cert.pem", "No such file"),
        ),
        (
            ("--tls-cert", "/etc/hostname", "--tls-key", "/etc/hostname"),
            {},
            ("--tls-cert/--tls-key", "PEM"),
        ),
    ],
)
def test_bad_settings_exit_2_with_one_line(args, env, words, monkeypatch, capsys):
    for name in [key for key in os.environ if key.startswith("GREETER_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # A free port unless the case is about the port, so a wrongly accepted setting shows as a
    # server that starts (and the test hangs) rather than as a bind error.
    port = () if "--port" in args or "GREETER_PORT" in env else ("--port", str(free_port()))
    with pytest.raises(SystemExit) as stopped:
        greeter_server.main([*port, *args])
    output = capsys.readouterr()
    assert_refused(stopped.value.code, output.out, output.err, 2, *words)


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        ((), {"GREETER_PORT": "abc"}, ("GREETER_PORT", "'abc'")),
        (("--workers", "0"), {}, ("--workers",)),
        (
            ("--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem"),
            {},
            ("--tls-cert",),
        ),
    ],
)
def test_the_console_script_refuses_bad_settings(args, env, words):
    result = run_server(*args, **env)
    assert_refused(result.returncode, result.stdout, result.stderr, 2, *words)


def test_flag_wins_over_environment(server_factory):
    port = free_port()
    server = server_factory("--port", str(port), env=clean_env(GREETER_PORT="abc"), wait=False)
    # The bad variable is overridden by the flag, so this server starts.
    assert server.wait_event("serving")["address"] == f"127.0.0.1:{port}"


def test_environment_configures_the_server(server_factory):
    server = Server(
        env=clean_env(GREETER_WORKERS="1", GREETER_REVISION="abc1234", GREETER_THREADS="3")
    )
    try:
        event = server.wait_event("serving")
        assert (event["workers"], event["threads"], event["commit"]) == (1, 3, "abc1234")
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_port_in_use_exits_1_with_a_clear_message(workers):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run_server("--bind", "127.0.0.1", "--port", port, "--workers", workers)
    assert_refused(
        result.returncode, result.stdout, result.stderr, 1, "cannot listen on 127.0.0.1:" + port
    )
