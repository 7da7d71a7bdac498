"""The options every command that calls the gateway takes: address, caller key and TLS."""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gateway_client.client import (
    authorization_metadata,
    check_address,
    holds_certificate,
    tls_credentials,
)
from service.option_variables import naming_variable, variable_default, variable_of

# `--model` left out: the model the quick start's gateway serves with no provider key set
# (`local_model.model`). clients/node/src/example.ts defaults to the same.
DEFAULT_MODEL = "gemma-3-270m"


def text_argument(value: str) -> str:
    """An argparse type for text sent in a request (a prompt, a model, a label).

    Python holds an argument's bytes that are not UTF-8 as lone surrogates, which no
    request can carry (protobuf raised a traceback): they are replaced, as those of
    standard input and of files are.
    """
    return value.encode("utf-8", "surrogateescape").decode("utf-8", errors="replace")


def _checked(check: Callable[[str], object], value: str) -> str:
    """`value`, which `check` took: its `ValueError` is a usage error (exit 2)."""
    try:
        check(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def caller_key(value: str) -> str:
    """--api-key: a key gRPC can send, checked before any call."""
    return _checked(authorization_metadata, value)


# A URL's schemes, which gRPC does not know: it looks `http://HOST:PORT` up as a host
# name, retries for seconds, and fails UNAVAILABLE, "Misformatted domain name".
_URL_SCHEMES = ("http://", "https://", "grpc://", "grpcs://")


def gateway_address(value: str) -> str:
    """--address: a target gRPC reads as it is written, checked before any call."""
    scheme = next((s for s in _URL_SCHEMES if value.lower().startswith(s)), None)
    if scheme is not None:
        tls = " with --tls" if scheme in ("https://", "grpcs://") else ""
        raise argparse.ArgumentTypeError(
            f"{value!r} is a URL: give HOST:PORT{tls} (no {scheme[:-3]}://)"
        )
    return _checked(check_address, value)


_YES = frozenset({"1", "true", "yes", "on"})
_NO = frozenset({"", "0", "false", "no", "off"})


def _tls_default(environ: Mapping[str, str]) -> bool | str:
    """`--tls`'s default from `$LLM_GATEWAY_TLS`: on or off, or the value itself when it is
    neither, refused by `connection` (a command that makes no call is not failed by it)."""
    value = environ.get("LLM_GATEWAY_TLS", "")
    word = value.strip().lower()
    if word in _YES or word in _NO:
        return word in _YES
    return value


def pem_file(value: str) -> bytes:
    """--ca-file, --cert-file, --key-file: a PEM file's bytes, read before any call."""
    try:
        data = Path(value).expanduser().read_bytes()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {value}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        # gRPC would only log its parse error and fail each call UNAVAILABLE: a DER file,
        # or the wrong file, is named here instead.
        raise argparse.ArgumentTypeError(f"{value} is not a PEM file (no -----BEGIN line)")
    return data


def ca_file(value: str) -> bytes:
    """--ca-file: a `pem_file` holding a certificate. gRPC takes any PEM as the CA (a key,
    a certificate request), trusts nothing, and fails each call UNAVAILABLE ("Failed to
    create security handshaker") once its retries are spent."""
    data = pem_file(value)
    if not holds_certificate(data):
        raise argparse.ArgumentTypeError(
            f"{value} holds no PEM certificate (no -----BEGIN CERTIFICATE----- line)"
        )
    return data


class PemFile(bytes):
    """A PEM file's bytes, and where its path was given: the option, or the environment
    variable standing in for it, which errors name (the user never typed the option)."""

    source: str

    def __new__(cls, data: bytes, source: str) -> PemFile:
        pem = super().__new__(cls, data)
        pem.source = source
        return pem


def _pem_option(flag: str, check: Callable[[str], bytes]) -> Callable[[str], PemFile]:
    """The argparse type of the PEM option `flag`: `check` (`pem_file`, `ca_file`), which
    reads it, remembering its source."""
    read = naming_variable(check)

    def parse(value: str) -> PemFile:
        variable = variable_of(value)
        source = flag if variable is None else f"environment variable {variable}"
        return PemFile(read(value), source)

    return parse


def system_ca_certificates() -> bytes | None:
    """The system's CA bundle (`$SSL_CERT_FILE`, else OpenSSL's default file), or None.

    gRPC does not read it: left to itself it trusts only the public roots it ships with,
    so a gateway whose private CA is installed on the system would fail `--tls`.
    """
    cafile = system_ca_file()
    if cafile is None:
        return None
    try:
        return Path(cafile).read_bytes()
    except OSError:
        return None


def system_ca_file() -> str | None:
    """The path of the system's CA bundle, as OpenSSL finds it (None: there is none)."""
    return ssl.get_default_verify_paths().cafile


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--address, --api-key and TLS, shared by every command that calls the gateway."""
    parser.add_argument(
        "--address",
        default=variable_default("LLM_GATEWAY_ADDRESS", "127.0.0.1:50051"),
        type=naming_variable(gateway_address),
        help="gateway HOST:PORT (default: $LLM_GATEWAY_ADDRESS or 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--api-key",
        default=variable_default("LLM_GATEWAY_API_KEY"),
        type=naming_variable(caller_key),
        help="caller key (default: $LLM_GATEWAY_API_KEY)",
    )
    tls = parser.add_argument_group("TLS (a gateway with server.tls)")
    tls.add_argument(
        "--tls",
        action="store_true",
        default=_tls_default(os.environ),
        help="connect with TLS, verifying the gateway against the system's CAs "
        "(default: on when $LLM_GATEWAY_TLS is 1, true, yes or on, or with --ca-file)",
    )
    for flag, variable, what, check in (
        (
            "--ca-file",
            "LLM_GATEWAY_CA_FILE",
            "CA certificate to verify the gateway with; implies --tls",
            ca_file,
        ),
        ("--cert-file", "LLM_GATEWAY_CERT_FILE", "client certificate (mutual TLS)", pem_file),
        ("--key-file", "LLM_GATEWAY_KEY_FILE", "the client certificate's private key", pem_file),
    ):
        # A string default goes through `type` at parse time, and only for the command
        # run: a stale variable is then a usage error there, not a crash of every command.
        tls.add_argument(
            flag,
            type=_pem_option(flag, check),
            default=variable_default(variable),
            metavar="PEM",
            help=f"{what} (default: ${variable})",
        )


def _source(pem: PemFile | None, flag: str) -> str:
    return flag if pem is None else pem.source


def connection(args: argparse.Namespace) -> dict[str, Any]:
    """`GatewayClient`'s keyword arguments for the connection options in `args`."""
    cert_file: PemFile | None = args.cert_file
    key_file: PemFile | None = args.key_file
    if (cert_file is None) != (key_file is None):
        given = cert_file or key_file
        where = "" if given is None or given.source.startswith("--") else f"{given.source}: "
        # A bad option: exit status 2, as argparse's own usage errors (1 is a failed call).
        print(f"llm-gateway: {where}--cert-file and --key-file go together", file=sys.stderr)
        raise SystemExit(2)
    implies_tls = args.ca_file is not None or args.cert_file is not None
    if isinstance(args.tls, str) and not implies_tls:  # neither on nor off: a guess either way
        print(
            f"llm-gateway: environment variable LLM_GATEWAY_TLS: {args.tls!r} is neither on "
            f"(1, true, yes, on) nor off (0, false, no, off)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    is_tls = args.tls is True or implies_tls
    if not is_tls:
        return {"api_key": args.api_key, "credentials": None}
    root_certificates = args.ca_file or system_ca_certificates()
    if args.ca_file is None and root_certificates is not None:
        _check_system_cas(root_certificates)
    try:
        credentials = tls_credentials(
            root_certificates=root_certificates,
            private_key=args.key_file,
            certificate_chain=args.cert_file,
        )
    except ValueError as exc:  # a key of another certificate: a bad option, as above
        sources = f"{_source(cert_file, '--cert-file')} and {_source(key_file, '--key-file')}"
        print(f"llm-gateway: {sources}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return {"api_key": args.api_key, "credentials": credentials}


def _check_system_cas(pem: bytes) -> None:
    """Refuse a system CA bundle that holds no certificate (a DER file, the wrong file in
    `$SSL_CERT_FILE`), naming it: `tls_credentials` would refuse it as though the
    `--cert-file` and `--key-file` not given were wrong. A usage error, as a bad `--ca-file`."""
    if holds_certificate(pem):
        return
    named = os.environ.get("SSL_CERT_FILE")
    where = "environment variable SSL_CERT_FILE: " if named else "the system's CA bundle "
    print(
        f"llm-gateway: {where}{system_ca_file()} holds no PEM certificate to verify the "
        "gateway with (give --ca-file)",
        file=sys.stderr,
    )
    raise SystemExit(2)
