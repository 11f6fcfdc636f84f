"""Pilot certificates: what a TLS client of the SuperLink will accept, checked with real handshakes."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from server.deploy.pki import (
    PkiError,
    PkiPaths,
    check_pki_files,
    make_ca,
    make_server_certificate,
    verify_server_certificate,
    write_pilot_pki,
)


def _handshake(paths: PkiPaths, ca_file: Path, server_hostname: str) -> None:
    """A TLS server on 127.0.0.1 with the pilot certificate; a client verifying it with `ca_file`."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(paths.server_cert, paths.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(ca_file))
        client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            tls.sendall(b"x")
    finally:
        listener.close()
        thread.join(timeout=10)


def test_pilot_certificate_passes_a_strict_tls_handshake(tmp_path: Path) -> None:
    paths = write_pilot_pki(tmp_path, ["coordinator.example.org", "127.0.0.1"])
    _handshake(paths, paths.ca_cert, "127.0.0.1")
    _handshake(paths, paths.ca_cert, "coordinator.example.org")


def test_wrong_name_and_foreign_ca_are_rejected(tmp_path: Path) -> None:
    paths = write_pilot_pki(tmp_path / "a", ["127.0.0.1"])
    other = write_pilot_pki(tmp_path / "b", ["127.0.0.1"])
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(paths, paths.ca_cert, "coordinator.example.org")  # not in the SANs
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(paths, other.ca_cert, "127.0.0.1")  # a client holding another CA


def test_certificate_contents(tmp_path: Path) -> None:
    paths = write_pilot_pki(tmp_path, ["coordinator", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coordinator"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    for key in (paths.ca_key, paths.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_existing_set_is_not_overwritten_by_accident(tmp_path: Path) -> None:
    write_pilot_pki(tmp_path, ["127.0.0.1"])
    with pytest.raises(PkiError, match="exists"):
        write_pilot_pki(tmp_path, ["127.0.0.1"])
    write_pilot_pki(tmp_path, ["127.0.0.1"], overwrite=True)


def test_checking_a_hospital_pki_set(tmp_path: Path) -> None:
    """A hospital PKI: root CA -> issuing CA -> server certificate, chain in server.pem."""
    root_key, root = _hospital_ca("Hospital Root CA", path_length=1)
    issuing_key, issuing = _hospital_ca("Hospital Issuing CA", path_length=0, issuer=(root_key, root))
    server_key, server = make_server_certificate(issuing_key, issuing, ["fl.hospital.example"])
    directory = tmp_path / "pki"
    directory.mkdir()
    paths = PkiPaths(directory)
    paths.ca_cert.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(
        server.public_bytes(serialization.Encoding.PEM) + issuing.public_bytes(serialization.Encoding.PEM)
    )
    paths.server_key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    assert check_pki_files(paths, "fl.hospital.example").subject == server.subject
    with pytest.raises(PkiError, match="not valid for"):
        check_pki_files(paths, "127.0.0.1")
    _, pilot_root = make_ca()
    with pytest.raises(PkiError):
        verify_server_certificate(server, [pilot_root], "fl.hospital.example", [issuing])  # another root
    _, other_key_server = make_server_certificate(issuing_key, issuing, ["fl.hospital.example"])
    paths.server_cert.write_bytes(other_key_server.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(PkiError, match="is not the key"):
        check_pki_files(paths, "fl.hospital.example")


def _hospital_ca(common_name: str, path_length: int, issuer=None):  # type: ignore[no-untyped-def]
    """A CA of the hospital's own PKI, built here without pmfl (self-signed if no issuer)."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, common_name)])
    issuer_key, issuer_cert = issuer if issuer else (key, None)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()), critical=False
        )
    return key, builder.sign(issuer_key, hashes.SHA384())
