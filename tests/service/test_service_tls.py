"""TLS and mutual TLS end to end, with a throwaway CA made for the test."""

import datetime
import ipaddress
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support.server import run_client


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
    (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{stem}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_ca(folder: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write(folder, name, cert, key)
    return cert, key


def issue(folder: Path, ca, stem: str, sans: list[x509.GeneralName], usage) -> None:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(stem))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(folder, stem, cert, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.pem signs server (127.0.0.1, localhost), named (greeter.test only) and client."""
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder, "ca")
    make_ca(folder, "other-ca")
    server_sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    issue(folder, ca, "server", server_sans, ExtendedKeyUsageOID.SERVER_AUTH)
    issue(folder, ca, "named", [x509.DNSName("greeter.test")], ExtendedKeyUsageOID.SERVER_AUTH)
    issue(folder, ca, "client", [x509.DNSName("client")], ExtendedKeyUsageOID.CLIENT_AUTH)
    return folder


def tls_flags(pki: Path, stem: str = "server", client_ca: bool = False) -> list[str]:
    flags = ["--workers", "1", "--tls-cert", str(pki / f"{stem}.pem")]
    flags += ["--tls-key", str(pki / f"{stem}.key")]
    return [*flags, "--tls-client-ca", str(pki / "ca.pem")] if client_ca else flags


def test_tls_hello_probe_and_bench_verify_against_the_ca(server_factory, pki):
    server = server_factory(*tls_flags(pki))
    assert server.wait_event("serving")["tls"] is True
    ca = ["--ca", str(pki / "ca.pem")]
    hello = run_client("hello", server.target, "Teste", *ca)
    assert (hello.returncode, hello.stdout) == (0, "Olá, Teste!\n")
    probe = run_client("probe", server.target, "--json", *ca)
    assert probe.returncode == 0
    assert json.loads(probe.stdout)[0]["health"] == "SERVING"
    bench = run_client("bench", server.target, "-n", "100", "-c", "4", "--json", *ca)
    assert bench.returncode == 0
    assert json.loads(bench.stdout)["status_codes"] == {"OK": 100}


def test_tls_server_refuses_plaintext_and_unknown_cas(server_factory, pki):
    server = server_factory(*tls_flags(pki))
    assert run_client("hello", server.target, "x", "--deadline", "3").returncode == 3
    other = run_client("hello", server.target, "x", "--ca", str(pki / "other-ca.pem"))
    assert other.returncode == 3


def test_server_name_override_verifies_a_cert_without_the_ip(server_factory, pki):
    server = server_factory(*tls_flags(pki, "named"))
    ca = ["--ca", str(pki / "ca.pem")]
    assert run_client("hello", server.target, "x", *ca).returncode == 3
    named = run_client("hello", server.target, "x", *ca, "--server-name", "greeter.test")
    assert (named.returncode, named.stdout) == (0, "Olá, x!\n")


def test_mutual_tls_requires_a_client_cert_signed_by_the_ca(server_factory, pki):
    server = server_factory(*tls_flags(pki, client_ca=True))
    assert server.wait_event("serving")["mtls"] is True
    ca = ["--ca", str(pki / "ca.pem")]
    assert run_client("hello", server.target, "x", *ca).returncode == 3
    client = ["--cert", str(pki / "client.pem"), "--key", str(pki / "client.key")]
    hello = run_client("hello", server.target, "x", *ca, *client)
    assert (hello.returncode, hello.stdout) == (0, "Olá, x!\n")
    probe = run_client("probe", server.target, *ca, *client)
    assert probe.returncode == 0
    # A client cert for the server's own key pair is not a client cert the CA vouches for.
    wrong = ["--cert", str(pki / "other-ca.pem"), "--key", str(pki / "other-ca.key")]
    assert run_client("hello", server.target, "x", *ca, *wrong).returncode == 3


def test_client_tls_files_must_be_readable(pki):
    result = run_client("hello", "127.0.0.1:1", "x", "--ca", str(pki / "missing.pem"))
    assert result.returncode == 2
    assert "--ca" in result.stderr
    assert "cannot read" in result.stderr


def test_probe_calls_a_tls_front_door_with_its_own_ca_and_cleartext_backends(server_factory, pki):
    """A balancer terminating TLS before cleartext backends: --balancer-ca (and its server name)
    are the front door's, the other TLS options the backends'."""
    front = server_factory(*tls_flags(pki, "named"))
    backend = server_factory("--workers", "1")
    ca, name = ["--balancer-ca", str(pki / "ca.pem")], ["--balancer-server-name", "greeter.test"]
    probe = run_client("probe", backend.target, "--balancer", front.target, *ca, *name, "--json")
    assert probe.returncode == 0, probe.stdout + probe.stderr
    rows = json.loads(probe.stdout)
    assert [(r["balancer"], r["ok"]) for r in rows] == [("front-door", True), ("", True)]
    # The same front door without its CA (cleartext) or with the wrong name fails its row only.
    for flags in ([], [*ca]):
        failed = json.loads(
            run_client("probe", backend.target, "--balancer", front.target, *flags, "--json").stdout
        )
        assert [(r["balancer"], r["ok"]) for r in failed] == [("front-door", False), ("", True)]
    unused = run_client("probe", backend.target, *ca)
    assert (unused.returncode, "--balancer-ca needs --balancer" in unused.stderr) == (2, True)
