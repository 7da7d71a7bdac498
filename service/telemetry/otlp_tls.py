"""The TLS files an OTLP exporter reads, checked before it is built.

Each OTLP exporter takes a CA to trust the collector by (`OTEL_EXPORTER_OTLP_CERTIFICATE`)
and a client certificate and key to show it (`..._CLIENT_CERTIFICATE`, `..._CLIENT_KEY`),
each by its signal's own variable (`OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE`) or the
general one, and neither checks them as it is built. The gRPC exporter logged a file it
could not open with a traceback and trusted the system's roots in place of the CA asked
for (a directory, it raised for); the HTTP one failed every export. Which variables each
reads follows the exporters' own rules (opentelemetry-exporter-otlp-proto-grpc and -http
1.45), so one they do not read is no error here either.

But for one: the gRPC exporter reads a client certificate and key only beside a CA of
its own group (the signal's or the general), so a pair set without one, or by the
signal's variables beside the general CA, was silently not shown: the collector that
asks for it refused every export. With such a pair on a secure channel the gateway
gives the exporter its credentials itself (`grpc_client_credentials`), each file by the
signal's variable, else the general one, as the OTLP specification has it; no CA, the
roots the exporter trusts without one.
"""

from __future__ import annotations

import os
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from grpc import ChannelCredentials, ssl_channel_credentials

_OTLP = "OTEL_EXPORTER_OTLP_"


@dataclass(frozen=True, slots=True)
class _TlsVariables:
    """The variables (not their values) whose files one exporter reads; None for none."""

    ca: str | None
    client_certificate: str | None
    client_key: str | None
    # The HTTP exporter (requests) also takes a directory of CA certificates, and a
    # client certificate file that holds its key too, in place of a key file.
    http: bool = False


def tls_file_problem(
    environ: Mapping[str, str], signal: str, *, grpc: bool
) -> tuple[str, str] | None:
    """The variable, and its problem, of a TLS file the OTLP exporter of `signal` (gRPC
    or HTTP) reads and cannot use: one it cannot read, a CA or client certificate that
    holds no PEM certificate, a client key that is no unencrypted PEM key matching its
    certificate. None when there is none. The problem names the file, never its text."""
    variables = _grpc_variables(environ, signal) if grpc else _http_variables(environ, signal)
    if variables.ca is not None:
        problem = _ca_problem(environ[variables.ca], directory_ok=variables.http)
        if problem is not None:
            return variables.ca, problem
    return _client_problem(environ, variables)


def _set(environ: Mapping[str, str], *variables: str) -> str | None:
    """The first of `variables` set to a value that is not empty (as the exporters skip an
    empty one)."""
    return next((variable for variable in variables if environ.get(variable)), None)


def grpc_client_credentials(environ: Mapping[str, str], signal: str) -> ChannelCredentials | None:
    """The credentials the gateway gives the gRPC OTLP exporter of `signal`: for a client
    certificate it would not show (`_gateway_reads`), else None (it reads its own)."""
    variables = _gateway_reads(environ, signal)
    if variables is None:
        return None

    def read(variable: str | None) -> bytes | None:
        return None if variable is None else Path(environ[variable]).read_bytes()

    return ssl_channel_credentials(
        root_certificates=read(variables.ca),
        private_key=read(variables.client_key),
        certificate_chain=read(variables.client_certificate),
    )


def _gateway_reads(environ: Mapping[str, str], signal: str) -> _TlsVariables | None:
    """The files the gateway reads for the gRPC exporter of `signal` in its place: where
    a client certificate or key is set (the signal's own pair, else the general), the
    channel is secure and no credential provider is to be used; each file by the signal's
    variable, else the general one. None where the exporter reads its own."""
    own = f"{_OTLP}{signal}_"
    if _grpc_provider(environ, signal) or not _grpc_secure(environ, signal):
        return None
    pair = own if _set(environ, f"{own}CLIENT_CERTIFICATE", f"{own}CLIENT_KEY") else _OTLP
    if not _set(environ, f"{pair}CLIENT_CERTIFICATE", f"{pair}CLIENT_KEY"):
        return None
    return _TlsVariables(
        _set(environ, f"{own}CERTIFICATE", f"{_OTLP}CERTIFICATE"),
        _set(environ, f"{pair}CLIENT_CERTIFICATE"),
        _set(environ, f"{pair}CLIENT_KEY"),
    )


def _reads_own_group(environ: Mapping[str, str], signal: str) -> bool:
    """Whether the gRPC exporter of `signal` takes its signal's own TLS variables (or
    credential provider): when its CA variable is set and its `_INSECURE` is not true."""
    own = f"{_OTLP}{signal}_"
    own_insecure = environ.get(f"{own}INSECURE")
    return f"{own}CERTIFICATE" in environ and (own_insecure or "").lower() != "true"


def _grpc_provider(environ: Mapping[str, str], signal: str) -> str | None:
    """The credential provider the gRPC exporter of `signal` uses (by name), if any."""
    scope = f"{signal}_" if _reads_own_group(environ, signal) else ""
    return environ.get(f"OTEL_PYTHON_EXPORTER_OTLP_GRPC_{scope}CREDENTIAL_PROVIDER") or None


def _grpc_variables(environ: Mapping[str, str], signal: str) -> _TlsVariables:
    """The files the gRPC exporter reads: those the gateway reads in its place, if any
    (`_gateway_reads`); else the signal's own CA, client certificate and key when its CA
    variable is set and its `_INSECURE` is not true (even where the channel then turns
    out insecure), unless its credential provider is set or that CA is empty; else the
    general ones, on a secure channel with no credential provider set. The client
    certificate and key only beside a CA."""
    gateway_reads = _gateway_reads(environ, signal)
    if gateway_reads is not None:
        return gateway_reads
    no_provider = not _grpc_provider(environ, signal)
    if _reads_own_group(environ, signal):
        return _grpc_group(environ, f"{_OTLP}{signal}_", read=no_provider)
    secure = _grpc_secure(environ, signal)
    return _grpc_group(environ, _OTLP, read=secure and no_provider)


def _grpc_group(environ: Mapping[str, str], prefix: str, *, read: bool) -> _TlsVariables:
    if not read or not environ.get(f"{prefix}CERTIFICATE"):
        return _TlsVariables(None, None, None)
    return _TlsVariables(
        f"{prefix}CERTIFICATE",
        _set(environ, f"{prefix}CLIENT_CERTIFICATE"),
        _set(environ, f"{prefix}CLIENT_KEY"),
    )


def _grpc_secure(environ: Mapping[str, str], signal: str) -> bool:
    """Whether the gRPC exporter of `signal` opens a secure channel: to an `https`
    endpoint always; else as its `_INSECURE` variable, the general one, or an endpoint
    that is not `http` says."""
    endpoint = environ.get(f"{_OTLP}{signal}_ENDPOINT") or environ.get(
        f"{_OTLP}ENDPOINT", "http://localhost:4317"
    )
    scheme = urllib.parse.urlparse(endpoint).scheme
    if scheme == "https":
        return True
    for variable in (f"{_OTLP}{signal}_INSECURE", f"{_OTLP}INSECURE"):
        if variable in environ:
            return environ[variable].lower() != "true"
    return scheme != "http"


def _http_variables(environ: Mapping[str, str], signal: str) -> _TlsVariables:
    """The files the HTTP exporter (requests) reads, each by the signal's variable or the
    general one: the CA for an `https` endpoint only, the client certificate and key on
    every export (each must be there, even for `http`)."""
    endpoint = environ.get(f"{_OTLP}{signal}_ENDPOINT") or environ.get(f"{_OTLP}ENDPOINT")
    ca = None
    if (endpoint or "").lower().startswith("https"):
        ca = _set(environ, f"{_OTLP}{signal}_CERTIFICATE", f"{_OTLP}CERTIFICATE")
    return _TlsVariables(
        ca,
        _set(environ, f"{_OTLP}{signal}_CLIENT_CERTIFICATE", f"{_OTLP}CLIENT_CERTIFICATE"),
        _set(environ, f"{_OTLP}{signal}_CLIENT_KEY", f"{_OTLP}CLIENT_KEY"),
        http=True,
    )


def _unreadable(path: str) -> str | None:
    """Why the file at `path` cannot be read, else None."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    return None


def _ca_problem(path: str, *, directory_ok: bool) -> str | None:
    """Why `path` is no CA file (or directory, where `directory_ok`) to trust, else None."""
    if directory_ok and os.path.isdir(path):
        return None
    problem = _unreadable(path)
    if problem is None and not _holds_certificate(path):
        problem = f"{path} holds no PEM certificate"
    return problem


def _holds_certificate(path: str) -> bool:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError:
        return False
    return True


def _client_problem(environ: Mapping[str, str], variables: _TlsVariables) -> tuple[str, str] | None:
    """The variable, and its problem, of a client certificate or key that cannot be read,
    that holds no PEM certificate or no unencrypted PEM key matching its certificate, or
    that is half a pair: a key without its certificate (no exporter uses it), a
    certificate without its key (the HTTP exporter's holding its key aside)."""
    for variable in (variables.client_certificate, variables.client_key):
        problem = None if variable is None else _unreadable(environ[variable])
        if variable is not None and problem is not None:
            return variable, problem
    certificate, key = variables.client_certificate, variables.client_key
    if certificate is None:
        if key is None:
            return None
        return key, f"a client key is used only with its certificate: set {_partner(key)}"
    if not _holds_certificate(environ[certificate]):
        return certificate, f"{environ[certificate]} holds no PEM certificate"
    if key is None and not variables.http:
        return certificate, (
            f"the gRPC exporter needs the client certificate's key: set {_partner(certificate)}"
        )
    if key is None and not _loads_key(environ[certificate], None):
        return certificate, (
            f"{environ[certificate]} holds no unencrypted PEM private key beside its "
            f"certificate: set {_partner(certificate)}"
        )
    if key is not None and not _loads_key(environ[certificate], environ[key]):
        return key, (
            f"{environ[key]} holds no unencrypted PEM private key that matches the "
            f"certificate in {certificate}"
        )
    return None


def _partner(variable: str) -> str:
    """The client key's variable for a client certificate's, and the other way round."""
    if variable.endswith("CLIENT_KEY"):
        return variable.removesuffix("KEY") + "CERTIFICATE"
    return variable.removesuffix("CERTIFICATE") + "KEY"


def _loads_key(certificate_path: str, key_path: str | None) -> bool:
    try:
        # A password asked for is refused, never prompted for on the terminal.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
            certificate_path, key_path, password=lambda: b""
        )
    except ssl.SSLError:
        return False
    return True
