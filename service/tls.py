"""Server TLS settings: the certificate, its key and an optional client CA (mutual TLS).

They travel as environment variables, so one setting reaches every process that needs it: the
`attnserve serve` supervisor, Ray's HAProxy (through `attnserve-haproxy`, which terminates TLS on
the public gRPC port), the plain server, and the images (docker-compose, KubeRay). Files are read
again when they change, so a renewed certificate needs no restart.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

CERT_ENV, KEY_ENV, CLIENT_CA_ENV = "ATTNSERVE_TLS_CERT", "ATTNSERVE_TLS_KEY", "ATTNSERVE_TLS_CLIENT_CA"
# Where the TLS gRPC port listens (HAProxy's bind address; default: the serve config's host).
HOST_ENV = "ATTNSERVE_TLS_HOST"


@dataclass(frozen=True)
class ServerTls:
    """PEM files of a TLS server; with client_ca, clients must present a certificate it signed."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_env(cls) -> ServerTls | None:
        """The settings of $ATTNSERVE_TLS_CERT / _KEY / _CLIENT_CA; None when no certificate is set.

        Raises:
            ValueError: if only one of the certificate and the key is set.
        """
        cert, key, ca = (os.environ.get(k) for k in (CERT_ENV, KEY_ENV, CLIENT_CA_ENV))
        if not cert and not key:
            if ca:
                raise ValueError(f"{CLIENT_CA_ENV} needs {CERT_ENV} and {KEY_ENV} (mutual TLS is TLS)")
            return None
        if not (cert and key):
            raise ValueError(f"TLS needs both {CERT_ENV} and {KEY_ENV}")
        return cls(Path(cert), Path(key), Path(ca) if ca else None)

    def to_env(self) -> dict[str, str]:
        """The environment variables that carry these settings (absolute paths)."""
        env = {CERT_ENV: str(self.cert.resolve()), KEY_ENV: str(self.key.resolve())}
        if self.client_ca:
            env[CLIENT_CA_ENV] = str(self.client_ca.resolve())
        return env

    def files(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())

    def stamp(self) -> tuple:
        """Changes when any of the files changes (inode, size, mtime); None entries for missing ones."""
        stamps = []
        for f in self.files():
            try:
                st = os.stat(f)
                stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def validate(self) -> None:
        """Loads the files as a TLS server would.

        Raises:
            ValueError: if a file is unreadable, not PEM, or the key does not match the certificate.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca:
                context.load_verify_locations(self.client_ca)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"TLS files {', '.join(map(str, self.files()))} unusable: {e}") from None

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """The certificate chain, the key and the client CA, as PEM bytes.

        Raises:
            OSError: if a file cannot be read.
        """
        return (
            self.cert.read_bytes(),
            self.key.read_bytes(),
            self.client_ca.read_bytes() if self.client_ca else None,
        )


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """grpc server credentials that pick up changed files at the next handshake (no restart)."""
    cert, key, ca = tls.read()
    last = [tls.stamp()]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        stamp = tls.stamp()
        if stamp == last[0]:
            return None
        try:
            tls.validate()
            cert, key, ca = tls.read()
        except (OSError, ValueError):  # a half-written renewal: keep serving the last good files
            return None
        last[0] = stamp
        return grpc.ssl_server_certificate_configuration([(key, cert)], ca)

    return grpc.dynamic_ssl_server_credentials(
        grpc.ssl_server_certificate_configuration([(key, cert)], ca),
        fetch,
        require_client_authentication=ca is not None,
    )


@dataclass(frozen=True)
class ClientTls:
    """What a client trusts (ca; None: the system's roots) and shows (cert and key, for mutual TLS).

    server_name: the name the server's certificate must carry, when it is not the target's host.
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """grpc channel credentials.

        Raises:
            ValueError: if only one of cert and key is given.
            OSError: if a file cannot be read.
        """
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both --tls-cert and --tls-key")
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )
