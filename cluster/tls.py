"""TLS material for the embedded broker: a one-off CA and a broker keystore.

Made with ``cryptography``: a self-signed CA (its private key is thrown away once the broker
certificate is signed, so nothing can mint another certificate it vouches for) and a PKCS#12
keystore with the broker's key and certificate for ``127.0.0.1`` and ``localhost``. The broker
reads the keystore; clients verify the broker against the CA's PEM.
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
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class BrokerTLS:
    """Where the CA certificate (PEM) and the broker keystore (PKCS#12) were written."""

    ca_file: Path
    keystore: Path
    keystore_password: str

    def __repr__(self) -> str:  # the keystore password never shows
        return f"BrokerTLS(ca_file={self.ca_file!s}, keystore={self.keystore!s})"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca_and_keystore(
    directory: Path, keystore_password: str, *, days: int = 2, ca_name: str = "framecast test CA"
) -> BrokerTLS:
    """A CA (``ca.pem``) and a broker key+certificate for 127.0.0.1/localhost (``broker.p12``,
    mode 0600), both valid for ``days``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(ca_name))
        .issuer_name(_name(ca_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    keystore = directory / "broker.p12"
    blob = pkcs12.serialize_key_and_certificates(
        b"broker",
        key,
        cert,
        [ca_cert],
        serialization.BestAvailableEncryption(keystore_password.encode()),
    )
    fd = os.open(keystore, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(blob)
    keystore.chmod(0o600)
    return BrokerTLS(ca_file=ca_file, keystore=keystore, keystore_password=keystore_password)


def certificate_days_left(pem_file: Path) -> float:
    """Days until the (first) certificate in a PEM file expires; negative once it has."""
    cert = x509.load_pem_x509_certificate(pem_file.read_bytes())
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    return left.total_seconds() / 86400
