#!/usr/bin/env python3
"""The lab's throwaway certificate authority.

Makes a CA, a server certificate whose subjectAltNames are the lab hosts' addresses and
names, and a client certificate for mutual TLS, all in one folder (by default the lab's
state dir, `.lab/<LAB_NAME>/tls`). These files exist so the lab can exercise the role's TLS
option end to end; they are NOT for production: a real fleet gets its certificates from the
organisation's PKI and hands their paths to the role the same way.

The CA is kept across runs (so certificates already on hosts stay valid); the server and
client certificates are issued anew on every run, so the SANs always match the hosts given.
Private keys are written 0600. Run with the controller's virtualenv (it has `cryptography`):

    .venv/bin/python lab/tls.py --san 10.77.0.11 --san greeter-1 [--dir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import pathlib
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = pathlib.Path(__file__).resolve().parent.parent
CA_DAYS = 30
LEAF_DAYS = 7


def _write(path: pathlib.Path, data: bytes, mode: int) -> None:
    """Write atomically with the final mode from the start: a key is never world-readable."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "greeter lab (throwaway)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def load_or_make_ca(folder: pathlib.Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Reuse the folder's CA when it is present and valid for another day, else make one."""
    cert_path, key_path = folder / "ca.pem", folder / "ca.key"
    now = datetime.datetime.now(datetime.timezone.utc)
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey) and cert.not_valid_after_utc > now + (
            datetime.timedelta(days=LEAF_DAYS)
        ):
            return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("greeter lab CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    sans: list[str],
    usage: x509.ObjectIdentifier,
) -> tuple[bytes, bytes]:
    """Issue a leaf certificate; returns (certificate PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def make(folder: pathlib.Path, sans: list[str]) -> dict[str, pathlib.Path]:
    """Write ca.pem/ca.key, server.pem/server.key and client.pem/client.key into folder."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_cert, ca_key = load_or_make_ca(folder)
    written = {"ca": folder / "ca.pem", "ca_key": folder / "ca.key"}
    for role, usage, common_name, names in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH, sans[0], sans),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH, "greeter lab client", []),
    ):
        cert_pem, key_pem = issue(ca_cert, ca_key, common_name, names, usage)
        _write(folder / f"{role}.key", key_pem, 0o600)
        _write(folder / f"{role}.pem", cert_pem, 0o644)
        written[role] = folder / f"{role}.pem"
        written[f"{role}_key"] = folder / f"{role}.key"
    return written


def main(argv: list[str] | None = None) -> int:
    lab_name = os.environ.get("LAB_NAME", "demo")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir",
        type=pathlib.Path,
        default=REPO / ".lab" / lab_name / "tls",
        help="where to write the files (default: %(default)s, from LAB_NAME)",
    )
    parser.add_argument(
        "--san",
        action="append",
        required=True,
        help="a host address or name the server certificate is valid for (repeat)",
    )
    args = parser.parse_args(argv)
    sans = list(dict.fromkeys(s.strip() for s in args.san if s.strip()))
    if not sans:
        parser.error("--san needs at least one non-empty address or name")
    written = make(args.dir, sans)
    for label, path in written.items():
        print(f"{label}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
