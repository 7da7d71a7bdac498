"""The connection options every calling command takes: address, caller key and TLS."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gateway_client.commands import batch, complete, summarize
from gateway_client.connection import DEFAULT_MODEL, add_connection_arguments, connection
from service.config import LocalModelConfig
from tests.integration.pki import make_ca


def parse(*argv: str, environ: dict[str, str] | None = None) -> argparse.Namespace:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (environ or {}).items():
            patch.setenv(name, value)
        parser = argparse.ArgumentParser()
        add_connection_arguments(parser)
        return parser.parse_args(argv)


def test_plaintext_by_default() -> None:
    assert connection(parse())["credentials"] is None


def test_the_address_comes_from_the_flag_then_the_environment_then_loopback() -> None:
    """An empty $LLM_GATEWAY_ADDRESS counts as unset, as the TLS variables do: before,
    it was the address, and every call failed with an invalid target."""
    environ = {"LLM_GATEWAY_ADDRESS": "gw:443"}
    assert parse("--address", "flag:1", environ=environ).address == "flag:1"
    assert parse(environ=environ).address == "gw:443"
    assert parse(environ={"LLM_GATEWAY_ADDRESS": ""}).address == "127.0.0.1:50051"


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:50051",
        "[::1]:50051",
        "::1",
        "localhost",
        "dns:///gw.example:65535",
        "unix:/run/gw",
    ],
)
def test_a_target_grpc_reads_as_written_is_taken(address: str) -> None:
    assert parse("--address", address).address == address


@pytest.mark.parametrize(
    ("address", "hint"),
    [
        ("http://127.0.0.1:50051", "give HOST:PORT (no http://)"),
        ("HTTPS://gw.example.com", "give HOST:PORT with --tls (no https://)"),
        ("grpc://gw:50051", "give HOST:PORT (no grpc://)"),
    ],
)
def test_a_url_for_an_address_is_a_usage_error_saying_what_to_give(
    address: str, hint: str, capsys
) -> None:
    """gRPC looked a URL up as a host name, and every call failed UNAVAILABLE after
    seconds of retries ("Misformatted domain name"), the scheme unnamed."""
    with pytest.raises(SystemExit) as caught:
        parse("--address", address)
    assert caught.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"is a URL: {hint}")


@pytest.mark.parametrize(
    "address",
    [
        "",
        "127.0.0.1:115587",
        "[::1]:65536",
        "dns:///gw:70000",
        "dns:gw:70000",
        "dns://ns/gw:70000",
        "127.0.0.1:-15485",
        "127.0.0.1:+50051",
        "127.0.0.1: 50051",
        "127.0.0.1:",
        "127.0.0.1:0",
    ],
)
def test_an_address_grpc_would_misread_is_a_usage_error(address: str, capsys) -> None:
    """gRPC takes a port past 65535 modulo 65536 (another port, maybe another service's),
    reads a signed one its own way (`-15485` is 50051), an empty one as 443, and an empty
    target fails every call: all are refused before any call."""
    with pytest.raises(SystemExit) as caught:
        parse("--address", address)
    assert caught.value.code == 2
    assert "argument --address" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [("--tls",), ("--ca-file", "{pem}"), ("--cert-file", "{pem}", "--key-file", "{key}")]
)
def test_any_tls_option_makes_the_channel_secure(tmp_path: Path, argv: tuple[str, ...]) -> None:
    pem, key = make_ca(tmp_path, "client")  # a certificate and its own key
    args = parse(*(a.format(pem=pem, key=key) for a in argv))
    assert connection(args)["credentials"] is not None


def test_the_ca_file_comes_from_the_environment(tmp_path: Path) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_bytes(b"-----BEGIN CERTIFICATE-----\nca bytes\n")
    args = parse(environ={"LLM_GATEWAY_CA_FILE": str(pem)})
    assert args.ca_file == b"-----BEGIN CERTIFICATE-----\nca bytes\n"
    assert connection(args)["credentials"] is not None


def test_an_unreadable_pem_file_is_a_usage_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        parse("--ca-file", str(tmp_path / "missing.pem"))
    assert caught.value.code == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--ca-file", "--cert-file", "--key-file"])
def test_a_file_that_is_not_pem_is_a_usage_error(tmp_path: Path, capsys, flag: str) -> None:
    """A DER certificate (or the wrong file) named as a PEM one: exit 2 naming it. Before,
    gRPC logged its parse error and every call failed UNAVAILABLE, as if the gateway
    were down."""
    der = tmp_path / "ca.der"
    der.write_bytes(b"\x30\x82\x03\x0a\x30\x82\x01\xf2")
    with pytest.raises(SystemExit) as caught:
        parse(flag, str(der))
    assert caught.value.code == 2
    assert "is not a PEM file" in capsys.readouterr().err


def test_a_certificate_without_its_key_is_a_usage_error(tmp_path: Path, capsys) -> None:
    """A bad option exits 2 (README), as argparse's own usage errors do, not 1 (a failed
    call)."""
    pem = tmp_path / "client.pem"
    pem.write_bytes(b"-----BEGIN CERTIFICATE-----\ncert\n")
    for argv in (("--cert-file", str(pem)), ("--key-file", str(pem))):
        with pytest.raises(SystemExit) as caught:
            connection(parse(*argv))
        assert caught.value.code == 2
        assert "--cert-file and --key-file go together" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--ca-file", "--cert-file", "--key-file"])
def test_an_unreadable_pem_file_from_the_environment_is_a_usage_error_naming_it(
    tmp_path: Path, capsys, flag: str
) -> None:
    """The variable is named, not the flag the user never typed."""
    variable = "LLM_GATEWAY_" + flag.removeprefix("--").replace("-", "_").upper()
    gone = tmp_path / "gone.pem"
    with pytest.raises(SystemExit) as caught:
        parse(environ={variable: str(gone)})
    assert caught.value.code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith(
            f"error: environment variable {variable}: cannot read {gone}: No such file or directory"
        )
    )


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        ((), "environment variable LLM_GATEWAY_ADDRESS"),
        (("--address", "gw:70000"), "argument --address"),
    ],
)
def test_a_refused_address_names_where_it_came_from(argv, named: str, capsys) -> None:
    """An address refused from $LLM_GATEWAY_ADDRESS names the variable; from --address
    (which wins over the variable), the flag. Before, both named --address."""
    with pytest.raises(SystemExit) as caught:
        parse(*argv, environ={"LLM_GATEWAY_ADDRESS": "gw:70000"})
    assert caught.value.code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith(f"error: {named}: 'gw:70000': the port must be 1..65535, in digits alone")
    )


def test_a_flag_given_leaves_its_variable_unread() -> None:
    """A bad variable is no error when its flag is given: the flag wins."""
    args = parse("--address", "gw:1", environ={"LLM_GATEWAY_ADDRESS": "gw:70000"})
    assert args.address == "gw:1"


def test_a_stale_pem_variable_does_not_stop_commands_that_take_no_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """`llm-gateway serve` reads no client certificate: a stale variable is not its
    business."""
    from gateway_client.cli import main

    monkeypatch.setenv("LLM_GATEWAY_CERT_FILE", str(tmp_path / "gone.pem"))
    with pytest.raises(SystemExit) as caught:
        main(["serve", "--help"])
    assert caught.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_llm_gateway_help_speaks_to_its_user(capsys: pytest.CaptureFixture[str]) -> None:
    """`llm-gateway --help` says what the tool does, not how its source is laid out:
    it printed the module docstring, `gateway_client/commands/` and `register(subparsers)`
    included."""
    from gateway_client.cli import main

    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert "run the gateway, or call it from a shell" in out
    assert "register(subparsers)" not in out
    assert "gateway_client/" not in out


@pytest.mark.parametrize(
    ("value", "is_tls"), [("1", True), ("true", True), ("0", False), ("", False)]
)
def test_llm_gateway_tls_reads_as_a_yes_or_no(value: str, is_tls: bool) -> None:
    assert parse(environ={"LLM_GATEWAY_TLS": value}).tls is is_tls


@pytest.mark.parametrize("value", ["maybe", "tls", "2"])
def test_an_llm_gateway_tls_neither_on_nor_off_is_a_usage_error(value: str, capsys) -> None:
    """Before, any value but 1, true, yes or on connected in plaintext: a typo of "on"
    sent the caller key unencrypted. Now the calling command exits 2 naming the variable;
    a flag that says TLS still wins, and parsing alone (a command that calls nothing) is
    not failed by it."""
    args = parse(environ={"LLM_GATEWAY_TLS": value})
    with pytest.raises(SystemExit) as caught:
        connection(args)
    assert caught.value.code == 2
    error = capsys.readouterr().err
    assert f"environment variable LLM_GATEWAY_TLS: {value!r} is neither on" in error
    assert parse("--tls", environ={"LLM_GATEWAY_TLS": value}).tls is True


def test_an_llm_gateway_tls_neither_on_nor_off_is_moot_beside_a_ca_file(tmp_path: Path) -> None:
    """`--ca-file` (or `$LLM_GATEWAY_CA_FILE`) means TLS whatever the variable says, as
    `--tls` does: a malformed one beside it decides nothing and is not refused."""
    ca, _ = make_ca(tmp_path, "ca")
    args = parse("--ca-file", str(ca), environ={"LLM_GATEWAY_TLS": "maybe"})
    assert connection(args)["credentials"] is not None


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        (complete, ["complete", "hi"]),
        (batch, ["batch", "in", "-o", "out"]),
        (summarize, ["summarize", "doc"]),
    ],
)
def test_the_default_model_is_the_quick_starts_local_model(command, argv) -> None:
    """`--model` left out asks for the model a gateway serves with no provider key set,
    the one the quick start calls."""
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    assert parser.parse_args(argv).model == DEFAULT_MODEL == LocalModelConfig().model
