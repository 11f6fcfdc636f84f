"""Certificates for a pilot: a private CA and a SuperLink server certificate, made with `cryptography`.

Why: Flower's SuperLink serves TLS only (no client certificates); sites trust the server because
its certificate chains to a CA they hold and names the address they dial (subject alternative
names). A pilot makes its own CA here; a hospital network with its own PKI skips `make_ca` and
checks its issued certificate with `verify_server_certificate` before starting the SuperLink.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"


class PkiError(ValueError):
    """A certificate set is missing, malformed, or does not fit the address the sites use."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def san_entry(host: str) -> x509.GeneralName:
    """An IP address SAN for IP literals, a DNS name otherwise (TLS clients match them differently).

    Args:
        host: A host name or IP address.

    Returns:
        The subject alternative name entry for it.
    """
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Signatures only (ECDSA); a CA also signs certificates and revocation lists."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(
    common_name: str = "pmfl pilot CA", organization: str = "pmfl", days: int = 825
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign server certificates only (path length 0).

    Path length 0, so that a leaked pilot CA cannot be used to mint intermediate CAs.

    Args:
        common_name: The CA's common name.
        organization: The CA's organisation.
        days: How long the CA certificate is valid.

    Returns:
        The CA's private key (EC P-384) and its certificate.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name(common_name, organization)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: list[str],
    days: int = 397,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for the SuperLink, valid for every name or IP in `hosts`.

    Args:
        ca_key: The CA's private key, which signs the certificate.
        ca_cert: The CA's certificate.
        hosts: The names and IPs the sites dial; the first is also the subject's common name.
        days: How long the certificate is valid (default 397, within the 398-day maximum many TLS clients
            enforce).

    Returns:
        The server's private key (EC P-384) and its certificate.

    Raises:
        PkiError: When `hosts` is empty.
    """
    if not hosts:
        raise PkiError("a server certificate needs at least one host name or IP address")
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0], "pmfl"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([san_entry(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def verify_server_certificate(
    cert: x509.Certificate,
    ca: list[x509.Certificate],
    host: str,
    intermediates: list[x509.Certificate] | None = None,
) -> None:
    """Raise PkiError unless `cert` chains to `ca` and is valid for `host` (as a TLS client checks).

    Checking as a client would catches a certificate set that sites would refuse before any site
    tries to connect.

    Args:
        cert: The server certificate.
        ca: The trusted CA certificates.
        host: The address the sites dial.
        intermediates: Intermediate certificates between `cert` and `ca`, if any.

    Raises:
        PkiError: When the certificate does not verify for `host` under `ca`.
    """
    from cryptography.x509 import verification as v

    entry = san_entry(host)
    subject = v.IPAddress(entry.value) if isinstance(entry, x509.IPAddress) else v.DNSName(host)
    verifier = v.PolicyBuilder().store(v.Store(ca)).build_server_verifier(subject)
    try:
        verifier.verify(cert, intermediates or [])
    except v.VerificationError as exc:
        raise PkiError(f"server certificate is not valid for {host!r} under this CA: {exc}") from exc


# -- files ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PkiPaths:
    """Where a coordinator's certificate set lives (the CA key only for a pilot CA)."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.directory / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.directory / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.directory / SERVER_KEY


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_pilot_pki(directory: Path, hosts: list[str], overwrite: bool = False) -> PkiPaths:
    """Make a CA and a server certificate for `hosts` in `directory` (keys readable by owner only).

    Args:
        directory: Where to write the certificate set.
        hosts: The names and IPs the sites dial.
        overwrite: Replace an existing certificate set.

    Returns:
        The paths of the written files.

    Raises:
        PkiError: When a certificate set exists and `overwrite` is not set.
    """
    paths = PkiPaths(Path(directory))
    existing = [p for p in (paths.ca_cert, paths.server_cert) if p.exists()]
    if existing and not overwrite:
        raise PkiError(f"{existing[0]} exists; pass overwrite to replace the certificate set")
    ca_key, ca_cert = make_ca()
    server_key, server_cert = make_server_certificate(ca_key, ca_cert, hosts)
    _write(paths.ca_key, _key_pem(ca_key), private=True)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths.server_key, _key_pem(server_key), private=True)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return paths


def check_pki_files(paths: PkiPaths, host: str) -> x509.Certificate:
    """Check a certificate set on disk (a pilot's or the hospital PKI's) for the address `host`.

    Args:
        paths: The certificate set's paths.
        host: The address the sites dial.

    Returns:
        The server certificate (the chain's leaf), for the caller to report its subject and validity.

    Raises:
        PkiError: When a file is missing or unreadable, the key is not the certificate's, or the
            certificate is not valid for `host` under the CA.
    """
    for path in (paths.ca_cert, paths.server_cert, paths.server_key):
        if not path.is_file():
            raise PkiError(f"missing {path}")
    try:
        ca = x509.load_pem_x509_certificates(paths.ca_cert.read_bytes())
        chain = x509.load_pem_x509_certificates(paths.server_cert.read_bytes())
        key = serialization.load_pem_private_key(paths.server_key.read_bytes(), password=None)
    except ValueError as exc:
        raise PkiError(f"cannot read the certificate set in {paths.directory}: {exc}") from exc
    leaf = chain[0]
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise PkiError(f"{paths.server_key} is not the key of {paths.server_cert}")
    verify_server_certificate(leaf, ca, host, chain[1:])
    return leaf
