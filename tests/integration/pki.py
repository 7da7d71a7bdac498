"""Test certificates made with the `openssl` command, as in the README's worked example."""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", *_KEY, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", key.name, "-out", cert.name, cwd=directory,
    )  # fmt: skip
    return cert, key


def issue(
    directory: Path,
    name: str,
    *,
    ca: tuple[Path, Path],
    common_name: str = "",
    extensions: str,
    subject: str = "",
) -> tuple[Path, Path]:
    """A certificate for `common_name` (or the whole `subject`, openssl's `/CN=a/O=b`, `+`
    between attributes of one RDN) signed by `ca`: (certificate, key)."""
    cert, key, csr = (directory / f"{name}{s}" for s in (".pem", ".key", ".csr"))
    ext = directory / f"{name}.ext"
    ext.write_text(extensions + "\n", encoding="ascii")
    _openssl("req", *_KEY, "-multivalue-rdn", "-subj", subject or f"/CN={common_name}",
             "-keyout", key.name, "-out", csr.name, cwd=directory)  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr.name, "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-days", "2", "-extfile", ext.name, "-out", cert.name, cwd=directory,
    )  # fmt: skip
    return cert, key


@dataclass(frozen=True, slots=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1, clients it signed, and a rogue client."""

    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_a: tuple[Path, Path]
    client_b: tuple[Path, Path]
    rogue_client: tuple[Path, Path]


def make_pki(directory: Path) -> Pki:
    """Everything a TLS/mTLS test needs, under `directory`."""
    ca = make_ca(directory, "ca")
    server = issue(
        directory, "server", ca=ca, common_name="127.0.0.1",
        extensions="subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth",
    )  # fmt: skip
    client = "extendedKeyUsage=clientAuth"
    rogue_ca = make_ca(directory, "rogue-ca")
    return Pki(
        ca=ca[0],
        ca_key=ca[1],
        server_cert=server[0],
        server_key=server[1],
        client_a=issue(directory, "team-a", ca=ca, common_name="team-a", extensions=client),
        client_b=issue(directory, "team-b", ca=ca, common_name="team-b", extensions=client),
        rogue_client=issue(
            directory, "rogue", ca=rogue_ca, common_name="team-a", extensions=client
        ),
    )


def https_server_context(directory: Path, name: str) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context with a certificate for the host `name`, and the CA that
    signed it (for a client to trust)."""
    ca = make_ca(directory, "server-ca")
    cert, key = issue(
        directory, "server-for-name", ca=ca, common_name=name,
        extensions=f"subjectAltName=DNS:{name}\nextendedKeyUsage=serverAuth",
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context, ca[0]
