"""`attnserve certs`: a private CA, a server certificate and a client certificate, for TLS and
mutual TLS on a test or internal deployment (production certificates come from your own CA).

Writes into one folder: ca.crt / ca.key (the CA), server.crt / server.key (for `attnserve serve
--tls-cert --tls-key`, valid for the given host names and IP addresses), client.crt / client.key
(for `--tls-cert --tls-key` of a client when the server asks for a client certificate, signed by
the same CA, which is then also the server's `--tls-client-ca`). Keys are ECDSA P-256, mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_NAMES = ("localhost", "127.0.0.1", "attnserve")


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as PEM bytes."""

    cert: bytes
    key: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def issue(
    common_name: str,
    ca: Issued | None = None,
    names: tuple[str, ...] = (),
    client: bool = False,
    days: int = 365,
) -> Issued:
    """A certificate: a self-signed CA when `ca` is None, else a leaf signed by it.

    Args:
        common_name: the subject's CN.
        ca: the issuing CA; None makes a CA.
        names: DNS names and IP addresses the (server) certificate is valid for.
        client: a client certificate (clientAuth) instead of a server one (serverAuth).
        days: validity from now (starting a minute ago, for clock skew).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    if ca is None:
        builder = builder.issuer_name(_name(common_name)).add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        )
        signer = key
    else:
        ca_cert = x509.load_pem_x509_certificate(ca.cert)
        signer = serialization.load_pem_private_key(ca.key, password=None)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            builder.issuer_name(ca_cert.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName([_alt_name(n) for n in names]),
                                            critical=False)  # fmt: skip
    cert = builder.sign(signer, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _alt_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def write(issued: Issued, folder: Path, stem: str) -> None:
    """Writes stem.crt and stem.key (the key readable by its owner only)."""
    (folder / f"{stem}.crt").write_bytes(issued.cert)
    key = folder / f"{stem}.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(issued.key)


def make_all(folder: Path, names: tuple[str, ...] = DEFAULT_NAMES, days: int = 365) -> list[Path]:
    """Writes a CA, a server certificate for `names` and a client certificate; the files written.

    Raises:
        FileExistsError: if the folder already holds a ca.crt (never overwrite a CA silently).
    """
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "ca.crt").exists():
        raise FileExistsError(f"{folder / 'ca.crt'} exists; remove the folder's certificates first")
    ca = issue("attnserve CA", days=days)
    write(ca, folder, "ca")
    write(issue(names[0], ca, names, days=days), folder, "server")
    write(issue("attnserve client", ca, client=True, days=days), folder, "client")
    return sorted(folder.glob("*.crt")) + sorted(folder.glob("*.key"))
