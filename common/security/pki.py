"""Key material for a deployment: a dev CA + server TLS certificate, SuperNode auth keys.

All of it comes from `cryptography`. For production, use certificates from your own CA
(any PEM CA bundle, server certificate and key work the same way); the dev CA here is
for loopback and lab setups.

Flower 1.41 facts this encodes:
- the SuperLink's certificate must carry the SANs `localhost`, `IP:127.0.0.1` and
  `IP:::1` (its internal launcher connects over loopback; without the IP SANs runs stay
  `pending` forever), plus every name clients use to reach it;
- SuperNode authentication keys are EC NIST-curve keys in OpenSSH format, registered
  with `flwr supernode register KEY.pub FEDERATION`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpeft.common.errors import ConfigError
from fedpeft.common.files import atomic_write_bytes

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server.pem", "server.key"
NODE_KEY, NODE_PUBLIC_KEY = "node_key", "node_key.pub"


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the TLS material `make_dev_certificates` writes (the names the CLIs expect)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> TlsFiles:
        d = Path(directory)
        return cls(d / CA_CERT, d / SERVER_CERT, d / SERVER_KEY)

    def check(self, ca_only: bool = False) -> None:
        needed = (self.ca_cert,) if ca_only else (self.ca_cert, self.server_cert, self.server_key)
        missing = [str(p) for p in needed if not p.is_file()]
        if missing:
            raise ConfigError(f"TLS material missing: {', '.join(missing)} (make it with `peft-server certs --out DIR`)")


def _write_private(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    os.chmod(path, 0o644)


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # keep order, drop duplicates
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_dev_certificates(out_dir: Path, hosts: Sequence[str] = (), days: int = 365, overwrite: bool = False) -> TlsFiles:
    """A self-signed dev CA and a server certificate it signs, valid for loopback + `hosts`."""
    files = TlsFiles.in_dir(out_dir)
    if files.ca_cert.exists() and not overwrite:
        raise ConfigError(f"{files.ca_cert} exists; pass --overwrite to replace the CA (clients trusting it must be updated)")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpeft dev CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    names = [*LOOPBACK_NAMES, *hosts]
    server_cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])]))
        .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_public(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_public(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    _write_private(Path(out_dir) / "ca.key", ca_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return files


def make_node_key(out_dir: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """A SuperNode authentication key pair (EC P-384, OpenSSH format): (private, public)."""
    private_path, public_path = Path(out_dir) / NODE_KEY, Path(out_dir) / NODE_PUBLIC_KEY
    if private_path.exists() and not overwrite:
        raise ConfigError(f"{private_path} exists; pass --overwrite to replace it (re-register the new public key)")
    Path(out_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
    _write_public(public_path, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    return private_path, public_path
