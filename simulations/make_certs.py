"""Certificates and SuperNode keys for a TLS + node-authenticated Flower deployment.

    python simulations/make_certs.py --out certs --nodes 2 --host 127.0.0.1 --host localhost

writes into ``certs/``:

- ``ca.crt``, ``ca.key``: a self-signed certificate authority (give ``ca.crt`` to every
  SuperNode as ``--root-certificates`` and to ``flwr`` as ``root-certificates``);
- ``server.pem``, ``server.key``: the SuperLink's certificate for the ``--host`` names/IPs,
  signed by the CA (``flower-superlink --ssl-certfile/--ssl-keyfile/--ssl-ca-certfile``);
- ``node-<i>``, ``node-<i>.pub``: one P-384 key pair per SuperNode in OpenSSH format
  (``flower-supernode --auth-supernode-private-key node-<i>``,
  ``flwr supernode register node-<i>.pub``).

For real use, pass the SuperLink's public DNS name or IP as ``--host``, keep ``ca.key`` and
``node-<i>`` private, and give each data owner only its own key.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEM = serialization.Encoding.PEM
NO_PASSWORD = serialization.NoEncryption()


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, fmt) -> None:
    path.write_bytes(key.private_bytes(PEM, fmt, NO_PASSWORD))
    path.chmod(0o600)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certs(out: str | Path, nodes: int = 2, hosts: tuple[str, ...] = ("127.0.0.1",
               "localhost"), days: int = 365) -> Path:
    """Write the CA, the SuperLink certificate and ``nodes`` SuperNode key pairs to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fl-offsite CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256()))
    _write_key(out / "ca.key", ca_key, serialization.PrivateFormat.PKCS8)
    (out / "ca.crt").write_bytes(ca_cert.public_bytes(PEM))

    server_key = _key()
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256()))
    _write_key(out / "server.key", server_key, serialization.PrivateFormat.PKCS8)
    (out / "server.pem").write_bytes(server_cert.public_bytes(PEM))

    for i in range(1, nodes + 1):
        key = _key()
        _write_key(out / f"node-{i}", key, serialization.PrivateFormat.OpenSSH)
        (out / f"node-{i}.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="certs", help="directory to write (default: certs)")
    parser.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to make")
    parser.add_argument("--host", action="append", dest="hosts",
                        help="SuperLink DNS name or IP the certificate is valid for "
                             "(repeatable; default: 127.0.0.1 and localhost)")
    parser.add_argument("--days", type=int, default=365, help="validity (default: 365)")
    args = parser.parse_args(argv)
    out = make_certs(args.out, args.nodes, tuple(args.hosts or ("127.0.0.1", "localhost")),
                     args.days)
    print(f"wrote {out}/: ca.crt, ca.key, server.pem, server.key and "
          f"{args.nodes} SuperNode key pairs (node-<i>, node-<i>.pub)")


if __name__ == "__main__":
    main()
