"""Configuration: one YAML file plus environment overrides, loaded once and frozen.

Every section is a frozen dataclass that checks itself in `__post_init__`. A config
error names the file, the key and what is wrong. Environment variables of the form
`LLM_GATEWAY__SECTION__KEY=value` override scalar keys (values parsed as YAML), e.g.
`LLM_GATEWAY__SERVER__LISTEN=0.0.0.0:50051`.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import importlib
import inspect
import ipaddress
import itertools
import math
import os
import re
import ssl
import types
import typing
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import SplitResult, parse_qs, urlsplit

import yaml

from service.domain import CacheMode, TruncationMode
from service.hosts import ascii_host, is_loopback_host, listen_hosts_overlap
from service.text_encoding import NotMarkedText, marked_text
from service.upstream.think_tags import ThinkTags

ENV_PREFIX = "LLM_GATEWAY__"
# The source of a config error in a value a command-line flag gave.
COMMAND_LINE = "command line"
T = TypeVar("T")


class ConfigError(Exception):
    """A configuration problem, naming the file and key."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key or '(top level)'}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


def _require(condition: bool, problem: str) -> None:
    if not condition:
        raise ValueError(problem)


# What `api_key_env` and `redis_password_env` must look like: a key or password pasted
# there instead (`sk-...`) would be printed as the "variable" by logs, errors and `check`.
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Keys that are valid variable names all the same (`sk_live_51Hx...`, `ghp_...`,
# `AKIAIOSFODNN7EXAMPLE`) hold a run this long of letters and digits, mixed; the words of
# a variable's name (`HOLYSHEEP_API_KEY`, `AZURE_KEY_EASTUS2`) are shorter or all letters.
_KEY_LIKE_RUN = re.compile(r"[A-Za-z0-9]{16,}")
_VARIABLE_NAME_RULE = (
    "letters, digits and _, not starting with a digit, and not 16 or more letters and "
    "digits in a row, mixed, as in a key"
)
# The shortest time gRPC's channel arguments can take: a millisecond (under half of one,
# rounded, is 0).
_MIN_GRPC_S = 0.001


# As long as a request's model name may be (`validation.model_violations`).
MAX_MODEL_NAME = 256


def is_model_name(name: str) -> bool:
    """Whether `name` is a model name a request can carry: 1-256 printable characters."""
    return 0 < len(name) <= MAX_MODEL_NAME and name.isprintable()


def _is_variable_name(name: str) -> bool:
    return _VARIABLE_NAME.fullmatch(name) is not None and not _looks_like_a_key(name)


def _looks_like_a_key(text: str) -> bool:
    """Whether `text` reads as a key or password rather than a name: an OpenAI-style key
    (`sk-...`), or 16 or more letters and digits in a row, digits and letters both among
    them."""
    return text[:3].lower() == "sk-" or any(
        not run.isdigit() and not run.isalpha() for run in _KEY_LIKE_RUN.findall(text)
    )


def has_redis_credentials(url: str) -> bool:
    """Whether a Redis URL names a user or password: before its host, or as the `username`
    or `password` query parameter, which redis-py reads too (and prefers to its own
    `password` argument, so one there would also override `redis_password_env`)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    return (
        parts.username is not None
        or parts.password is not None
        or bool({"username", "password"} & {name.lower() for name in query})
    )


def _require_port(parts: SplitResult, key: str) -> None:
    """Refuse a URL whose port is not a number 0..65535: its client reads it only at
    start, and a bad one would fail the start with a traceback."""
    try:
        parts.port  # noqa: B018  (raises ValueError when not a number 0..65535)
    except ValueError:
        raise ValueError(f"{key}'s port must be a number 0..65535") from None


def _require_redis_address(url: str) -> None:
    """Refuse a Redis URL whose port or database is not a number: the clients read them
    only at start, and fail it with a traceback (the cache) or take database 0 unasked."""
    parts = urlsplit(url)
    _require_port(parts, "redis_url")
    if parts.scheme != "unix":  # a socket's path is the file; its database is `?db=N`
        database = parts.path.strip("/")
        _require(
            not database or re.fullmatch(r"[0-9]+", database) is not None,
            "redis_url's database (its path) must be a number, as in redis://HOST:PORT/0",
        )
    # redis-py reads `?db=` too (over the path), and raises on a value not a number.
    _require(
        all(re.fullmatch(r"[0-9]+", db) for db in parse_qs(parts.query).get("db", [])),
        "redis_url's db query parameter must be a number, as in unix:///PATH?db=0",
    )
    query = parse_qs(parts.query, keep_blank_values=True)
    if not query:
        return  # nothing for redis-py to read: not imported (most of a config error's CPU)
    unknown = sorted(set(query) - {"username", "password"} - _redis_url_options(parts.scheme))
    _require(
        not unknown,
        f"redis_url's query names options a {parts.scheme}:// connection does not take: "
        f"{', '.join(map(_shown_name, unknown))}",
    )
    _require_redis_option_values(query)


# TLS files a Redis URL's query names: read when the first connection opens.
_REDIS_FILE_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def _require_redis_option_values(query: Mapping[str, list[str]]) -> None:
    """Refuse an option value redis-py cannot read (`socket_timeout=abc`), or a TLS file
    that cannot be read: both fail the start with a traceback. Said by the option's name
    alone: a value could be anything, a secret pasted in the wrong place among them."""
    from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS

    for name, values in query.items():
        value = values[0]
        if not value:
            continue  # redis-py reads an empty option as none
        parser = URL_QUERY_ARGUMENT_PARSERS.get(name)
        try:
            if parser is not None:
                parser(value)
        except (TypeError, ValueError):
            raise ValueError(f"redis_url's {name} option has a value it does not take") from None
        _require(
            name not in _REDIS_FILE_OPTIONS or os.access(value, os.R_OK),
            f"redis_url's {name} names a file that cannot be read",
        )


# Options redis-py takes as text from a URL's query besides those it converts
# (`URL_QUERY_ARGUMENT_PARSERS`): a client name, and TLS files and modes.
_REDIS_TEXT_OPTIONS = frozenset(
    {"client_name", "ssl_ca_certs", "ssl_ca_path", "ssl_cert_reqs", "ssl_certfile"}
    | {"ssl_keyfile", "ssl_ciphers"}
)


def _redis_url_options(scheme: str) -> frozenset[str]:
    """The query options a Redis URL of `scheme` may carry: any other reaches redis-py's
    connection as an unknown argument and fails the start with a TypeError (an `ssl_`
    option on a redis:// URL too)."""
    from redis.asyncio.connection import (
        URL_QUERY_ARGUMENT_PARSERS,
        Connection,
        SSLConnection,
        UnixDomainSocketConnection,
    )

    connection = {"rediss": SSLConnection, "unix": UnixDomainSocketConnection}.get(
        scheme, Connection
    )
    accepted = {"max_connections"}  # the pool's own
    for cls in connection.__mro__:
        if "__init__" in vars(cls):
            accepted.update(inspect.signature(vars(cls)["__init__"]).parameters)
    return frozenset((set(URL_QUERY_ARGUMENT_PARSERS) | _REDIS_TEXT_OPTIONS) & accepted)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS for the gRPC port; with `client_ca_file`, client certificates (mTLS) too.

    `tenant_from_cert_subject`: a verified client certificate's subject common name
    names the caller's tenant, so no bearer key is needed.
    """

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    require_client_cert: bool = False
    tenant_from_cert_subject: bool = False

    def __post_init__(self) -> None:
        # `~/pki/server.pem` is the user's home, as in `auth.keys_file` and
        # `local_model.model_path`: grpc and the checks open the path as it is.
        for name in ("cert_file", "key_file", "client_ca_file"):
            path = getattr(self, name)
            if path is not None:
                object.__setattr__(self, name, os.path.expanduser(path))
        _require(
            (self.cert_file is None) == (self.key_file is None),
            "cert_file and key_file go together",
        )
        _require(
            self.client_ca_file is None or self.cert_file is not None,
            "client_ca_file needs cert_file and key_file",
        )
        _require(
            not (self.require_client_cert or self.tenant_from_cert_subject)
            or self.client_ca_file is not None,
            "require_client_cert and tenant_from_cert_subject need client_ca_file",
        )
        # grpc asks for a client certificate only when it requires one: without that, no
        # certificate could ever name a tenant and callers would silently need keys.
        _require(
            self.require_client_cert or not self.tenant_from_cert_subject,
            "tenant_from_cert_subject needs require_client_cert: true (without it no client "
            "certificate is asked for)",
        )

    @property
    def is_enabled(self) -> bool:
        """Whether the port speaks TLS."""
        return self.cert_file is not None


# What caller keys start with (`auth` issues them; it imports this module, not the reverse).
CALLER_KEY_PREFIX = "llmgw_"

# gRPC server options are C ints: a larger value fails the start with an OverflowError.
_GRPC_MAX_INT = 2**31 - 1


# The most worker processes `server.workers` (or `--workers`) may ask for: more than any
# machine's cores, and few enough that a typo (100000) is refused rather than forked.
MAX_WORKERS = 1024


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The gRPC listener and its lifecycle."""

    listen: str = "127.0.0.1:50051"
    grace_period_s: float = 10.0
    max_receive_message_bytes: int = 4 * 1024 * 1024
    max_in_flight_calls: int = 2000
    max_queued_calls: int = 0
    overload_retry_after_s: float = 1.0
    # Processes sharing the port: N, 0 for one per core, or unset for one per core when
    # nothing that must agree across processes is kept in one (see `service.workers`).
    workers: int | None = None
    # Refuse to start without caller auth on a non-loopback address unless forced.
    allow_insecure_public_listen: bool = False
    tls: TlsConfig = TlsConfig()
    # Connections older than this get a GOAWAY, so clients balancing over DNS
    # (dns:///headless) reconnect and discover new replicas. Grace: how long calls on
    # such a connection may still run; None means the longest call with no deadline of
    # its own, at least 300 s (`server.connection_age_options`).
    max_connection_age_s: float = 300.0
    max_connection_age_grace_s: float | None = None
    # A stream whose caller takes none of its messages this long is ended (0: never).
    stalled_stream_timeout_s: float = 60.0
    # A caller connection sending nothing this long is pinged; one that does not answer
    # within the timeout is gone (a crashed host, a dropped network path) and its calls
    # are cut, as when it cancels: TCP alone would not say so for hours.
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 20.0
    # A second port serving only grpc.health.v1, in plaintext: for probes that cannot
    # speak TLS (Kubernetes' native gRPC probes) when `tls` is on. Unset: none.
    health_listen: str | None = None

    def __post_init__(self) -> None:
        _require_address(self.listen, "listen")
        if self.health_listen is not None:
            _require_address(self.health_listen, "health_listen")
            _require(
                not listens_overlap(self.health_listen, self.listen),
                f"health_listen {self.health_listen} and listen {self.listen} would listen "
                "on the same port at a shared address (0.0.0.0 and [::] take the port at "
                "every address, localhost at 127.0.0.1 and [::1]): give health_listen "
                "another port",
            )
        _require(self.grace_period_s >= 0, "grace_period_s must be >= 0")
        _require(
            1024 <= self.max_receive_message_bytes <= _GRPC_MAX_INT,
            f"max_receive_message_bytes must be 1024..{_GRPC_MAX_INT}",
        )
        _require(self.max_in_flight_calls >= 1, "max_in_flight_calls must be >= 1")
        _require(self.max_queued_calls >= 0, "max_queued_calls must be >= 0")
        # gRPC is told to hold twice as many pending calls (`pending_call_options`).
        _require(
            self.max_in_flight_calls + self.max_queued_calls <= _GRPC_MAX_INT // 2,
            f"max_in_flight_calls + max_queued_calls must be <= {_GRPC_MAX_INT // 2}",
        )
        _require(self.overload_retry_after_s >= 0, "overload_retry_after_s must be >= 0")
        _require(
            self.workers is None or 0 <= self.workers <= MAX_WORKERS,
            f"workers must be 0..{MAX_WORKERS} (0: one per core)",
        )
        _require(self.max_connection_age_s >= _MIN_GRPC_S, "max_connection_age_s must be >= 0.001")
        _require(self.stalled_stream_timeout_s >= 0, "stalled_stream_timeout_s must be >= 0")
        # gRPC takes them in whole milliseconds: under half of one is 0, and a ping then
        # never answered in time cuts every call running past keepalive_time_s.
        _require(self.keepalive_time_s >= _MIN_GRPC_S, "keepalive_time_s must be >= 0.001")
        _require(self.keepalive_timeout_s >= _MIN_GRPC_S, "keepalive_timeout_s must be >= 0.001")
        grace = self.max_connection_age_grace_s
        _require(grace is None or grace >= 0, "max_connection_age_grace_s must be >= 0")

    @property
    def is_loopback(self) -> bool:
        """Whether the listen address is reachable only from this machine."""
        return is_loopback_host(host_and_port(self.listen)[0])


def host_and_port(address: str) -> tuple[str, int]:
    """A `HOST:PORT` address's host (an IPv6 one without its brackets) and port."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def listens_overlap(first: str, second: str) -> bool:
    """Whether two valid `HOST:PORT` addresses would bind a shared address and port (a
    port 0 is chosen free at each bind: never shared)."""
    (first_host, first_port), (second_host, second_port) = map(host_and_port, (first, second))
    return first_port == second_port != 0 and listen_hosts_overlap(first_host, second_host)


def _require_address(address: str, name: str) -> None:
    host, sep, port = address.rpartition(":")
    # ASCII digits: int() takes other scripts' digits (fullwidth ones) too; grpc does not.
    _require(bool(sep and host and port.isascii() and port.isdigit()), f"{name} must be HOST:PORT")
    # grpc reads `::1:50051` as one IPv6 address on its default port 443.
    _require(
        ":" not in host or (host.startswith("[") and host.endswith("]")),
        f"{name}'s IPv6 host goes in brackets, as in [::1]:50051",
    )
    # grpc reads brackets only around an IPv6 address: `[127.0.0.1]:50051` failed the
    # listen itself, said as a taken port, where `check` said ok.
    _require(
        not ("[" in host or "]" in host) or _is_bracketed_ipv6(host),
        f"{name}'s brackets hold an IPv6 address alone, as in [::1]:50051; write "
        "another host without them, as in 127.0.0.1:50051",
    )
    # gRPC takes the port modulo 65536: 70000 would quietly listen on 4464.
    _require(int(port) <= 65535, f"{name}'s port must be 0..65535")


def _is_bracketed_ipv6(host: str) -> bool:
    """Whether `host` is an IPv6 address (a zone allowed) in one pair of brackets."""
    if not (host.startswith("[") and host.endswith("]")):
        return False
    try:
        ipaddress.IPv6Address(host[1:-1])
    except ValueError:
        return False
    return True


_SPACE_OR_CONTROL = re.compile(r"[\x00-\x20\x7f]")
# What no HTTP header value may hold (RFC 9110: a tab may), so no key either.
_HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


# What a forward proxy's URL may be: `http://HOST:PORT` (`service.upstream.proxy`).
PROXY_URL_FORM = "http://HOST:PORT"


def proxy_url_problem(url: str, *, key: str, credentials_go: str | None) -> str | None:
    """What is wrong with a forward proxy's URL, in words that never repeat it (it may
    hold a password); None when it is a usable `http://HOST:PORT`.

    `credentials_go`: where a user or password must go instead (None: the URL may carry
    them, as `HTTPS_PROXY` conventionally does). A URL without a scheme is refused here;
    the environment's are read as `http://` first, as curl reads them.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError:
        return f"{key} must be {PROXY_URL_FORM}: its host or port cannot be read"
    if parts.scheme == "https":
        return (
            f"{key} must be {PROXY_URL_FORM}: TLS to the proxy (https://) is not supported "
            "(the tunnel to an https upstream is TLS end to end)"
        )
    if parts.scheme != "http":
        return (
            f"{key} must be {PROXY_URL_FORM}: only HTTP forward proxies (CONNECT) are "
            "supported, not SOCKS or other schemes"
        )
    if credentials_go is not None and (parts.username is not None or parts.password is not None):
        return f"{key} must not carry a user or password; put user:password in {credentials_go}"
    if not host:
        return f"{key} must be {PROXY_URL_FORM}: it names no host"
    if ascii_host(host) is None:
        return f"{key} must be {PROXY_URL_FORM}: its host is not a valid host name"
    if port is None or port == 0:
        # Tools disagree on the default (curl takes 1080, others 80): say it.
        return f"{key} must be {PROXY_URL_FORM}: it names no port"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return f"{key} must be {PROXY_URL_FORM}, without a path, query or fragment"
    return None


# Query parameters that carry a credential: one in `base_url` would sit in the config
# file (a ConfigMap) in clear, where `api_key_env` keeps the key out of it.
_CREDENTIAL_PARAMETERS = frozenset(
    {"key", "api_key", "api-key", "apikey", "access_token", "token", "password", "secret"}
)

# The request body fields the gateway writes from each request (`upstream.openai_json`):
# an upstream's `extra_body` may add fields, never replace these.
GATEWAY_BODY_FIELDS = frozenset(
    {
        "model", "messages", "stream", "stream_options", "tools", "tool_choice",
        "response_format", "temperature", "top_p", "max_tokens", "max_completion_tokens",
        "stop", "seed", "random_seed",
        "presence_penalty", "frequency_penalty",
    }
)  # fmt: skip


# A default an upstream's `extra_body` may set, which a request's own effort replaces.
REASONING_EFFORT_FIELD = "reasoning_effort"

# Fields that would change what an answer holds beyond what the caller asked: several
# choices (all billed, one relayed) or the legacy `functions`/`function_call` (calls of
# functions the caller never declared).
ANSWER_SHAPE_FIELDS = frozenset({"n", "best_of", "functions", "function_call"})


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One OpenAI-compatible provider endpoint.

    `models` maps the model name callers use to the name the upstream expects.
    The key is read from the environment variable `api_key_env`, never from the file.
    """

    name: str
    base_url: str
    models: Mapping[str, str]
    api_key_env: str | None = None
    timeout_s: float = 120.0
    # Once a stream's text flows, the longest wait for its next chunk (None: only
    # `timeout_s` bounds the stream). Lets `timeout_s` be long enough for long answers
    # while a stream that stalls still ends soon.
    stream_idle_timeout_s: float | None = None
    # The longest an attempt whose answer is streamed waits, from its start, for the
    # stream's first output (None: only `timeout_s` and the caller's deadline bound it).
    # Lets an upstream that takes the request and never answers fail over in seconds
    # while `timeout_s` stays long enough for long answers.
    first_output_timeout_s: float | None = None
    connect_timeout_s: float = 10.0
    max_connections: int = 100
    weight: int = 1
    max_concurrency: int = 50
    # The longest a call waits for this upstream's limits; None: `resilience.max_limit_wait_s`.
    max_limit_wait_s: float | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    # Keep the two per-minute buckets in `auth.redis_url`'s Redis, shared by every process
    # and replica: a provider's limit is per account (`service.shared_limits`).
    shared_limits: bool = False
    # The body field a request's `max_tokens` is sent in: OpenAI's reasoning models
    # (o-series, gpt-5) refuse `max_tokens` and take only `max_completion_tokens`.
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    # The body field a request's `seed` is sent in: Mistral's API takes only `random_seed`
    # and refuses `seed` (422, `extra_forbidden`).
    seed_field: Literal["seed", "random_seed"] = "seed"
    # The header the key goes in: `Authorization: Bearer KEY`, or Azure OpenAI's
    # `api-key: KEY` (its key authentication takes no bearer token).
    api_key_header: Literal["authorization", "api-key"] = "authorization"
    # How a JSON Schema response format is sent: OpenAI's `json_schema` object, or
    # `{"type": "json_object", "schema": ...}`, the only shape llama-cpp-python's server
    # (the local model) takes; it answers OpenAI's with HTTP 500.
    json_schema_format: Literal["openai", "json_object_schema"] = "openai"
    # llama-cpp-python's server answers a streamed request it cannot serve (a prompt over
    # its context window: the same request unary is a 400) with 200 and no event at all.
    # Set, such a stream is the request refused, not retried nor held against the
    # upstream's breaker; unset, it is a malformed answer, as from a provider.
    empty_stream_is_refusal: bool = False
    # Send unary calls as streams and read each whole, answering the caller as before:
    # llama-cpp-python's server looks for a gone client only between streamed chunks, so
    # a unary call's cancel stops its generation only this way.
    stream_unary_calls: bool = False
    # The field an assistant message's reasoning is sent back in: DeepSeek's thinking mode
    # reads `reasoning_content`; OpenRouter and newer vLLM read `reasoning`.
    reasoning_field: Literal["reasoning_content", "reasoning"] = "reasoning_content"
    # `fold`: system messages go into the first user message's text, as Gemma's chat
    # template puts them, for a server whose chat format drops the system role (the local
    # model's `gemma`: llama-cpp-python's formatter drops such messages, silently).
    # `merge`: they go as one system message, first, for a format that takes only the
    # first (llama-cpp-python's `chatml` and most others drop the rest, silently).
    system_messages: Literal["send", "fold", "merge"] = "send"
    # Whether the upstream takes tools: `false` for a server that would ignore a request's
    # tools and drop tool calls and results without a word (llama-cpp-python's plain chat
    # formats, the local model's `gemma` among them). Calls that use tools avoid it.
    takes_tools: bool = True
    # The texts (their start) with which the upstream's HTTP 500 refuses the request itself,
    # as a 400 would: the `raise_exception` messages of the local model's chat template,
    # which llama-cpp-python answers with 500 (`service.local_model.template_refusals`).
    # Set by the gateway, never by the file.
    request_refusals: frozenset[str] = field(
        default=frozenset(), repr=False, metadata={"set_by_gateway": True}
    )
    # Relay a `<think>...</think>` block opening the answer's text as reasoning: what
    # servers without a reasoning parser send (vLLM without `--reasoning-parser`, llama.cpp
    # without `--reasoning-format`). Off by default, as some models write such tags as text.
    # `forced_open`: the model's chat template opened the block, so the answer starts in it.
    think_tags: ThinkTags = "false"
    # Fields added to every request body sent to this upstream: a provider's own switches
    # (DeepSeek's `thinking`, vLLM's `chat_template_kwargs`), never one the gateway sets.
    extra_body: Mapping[str, object] = field(default_factory=dict, repr=False)
    # An HTTP forward proxy (`http://HOST:PORT`) every request to this upstream goes
    # through: in absolute form for an http upstream, a CONNECT tunnel for https. Unset:
    # `HTTPS_PROXY`/`HTTP_PROXY` and `NO_PROXY` decide when the client opens
    # (`service.upstream.proxy`).
    proxy_url: str | None = None
    # The environment variable holding the proxy's `user:password` (sent as
    # `Proxy-Authorization: Basic ...`): never in `proxy_url`, which sits in the file.
    proxy_authorization_env: str | None = None
    # Filled from `api_key_env` by `parse_config`; a file that sets it is refused.
    api_key: str | None = field(
        default=None, repr=False, compare=False, metadata={"from_environment": "api_key_env"}
    )
    # Filled from `proxy_authorization_env` by `parse_config`, as `api_key` is.
    proxy_authorization: str | None = field(
        default=None,
        repr=False,
        compare=False,
        metadata={"from_environment": "proxy_authorization_env"},
    )

    def limit_wait_s(self, default_s: float) -> float:
        """The longest a call waits for this upstream's limits: its own
        `max_limit_wait_s`, else `default_s` (`resilience.max_limit_wait_s`)."""
        return default_s if self.max_limit_wait_s is None else self.max_limit_wait_s

    @property
    def sends_key_in_clear(self) -> bool:
        """Whether its key would cross a network unencrypted: `http://` to another host."""
        parts = urlsplit(self.base_url)
        return (
            bool(self.api_key)
            and parts.scheme == "http"
            and not is_loopback_host(parts.hostname or "")
        )

    def __post_init__(self) -> None:
        _require(
            bool(self.name) and self.name.replace("-", "").replace("_", "").isalnum(),
            "name must be letters, digits, '-' or '_'",
        )
        parts = urlsplit(self.base_url)
        _require(
            parts.scheme in ("http", "https") and bool(parts.hostname),
            "base_url must be an http(s) URL",
        )
        # Written into each request line and Host header as it is: a space would break them.
        _require(
            _SPACE_OR_CONTROL.search(self.base_url) is None,
            "base_url must not contain spaces or control characters",
        )
        _require_port(parts, "base_url")
        _require(
            ascii_host(parts.hostname or "") is not None,
            "base_url's host must be a valid host name (no empty label, none over 63 characters, "
            "no ß, ς or zero-width joiner, which IDNA 2003 and 2008 write as two hosts: write "
            "its xn-- form)",
        )
        _require(
            parts.username is None and parts.password is None,
            "base_url must not carry credentials; use api_key_env",
        )
        in_query = sorted(
            {name.lower() for name in parse_qs(parts.query, keep_blank_values=True)}
            & _CREDENTIAL_PARAMETERS
        )
        _require(
            not in_query,
            f"base_url must not carry credentials (query parameter {', '.join(in_query)});"
            " use api_key_env",
        )
        _require(
            self.api_key_env is None or _is_variable_name(self.api_key_env),
            f"api_key_env must name an environment variable ({_VARIABLE_NAME_RULE}), "
            "not hold the key itself",
        )
        if self.proxy_url is not None:
            problem = proxy_url_problem(
                self.proxy_url, key="proxy_url", credentials_go="proxy_authorization_env"
            )
            _require(problem is None, problem or "")
        _require(
            self.proxy_authorization_env is None or _is_variable_name(self.proxy_authorization_env),
            f"proxy_authorization_env must name an environment variable "
            f"({_VARIABLE_NAME_RULE}), not hold the credentials themselves",
        )
        _require(len(self.models) > 0, "models must list at least one model")
        _require(
            all(is_model_name(name) for pair in self.models.items() for name in pair),
            "models must be named with 1-256 printable characters, as requests name them",
        )

        def named_in(fields: frozenset[str]) -> list[str]:
            # In any case: servers written in Go match JSON fields without it ("Model").
            return sorted(name for name in self.extra_body if name.lower() in fields)

        taken = named_in(GATEWAY_BODY_FIELDS)
        _require(
            not taken,
            f"extra_body must not set {', '.join(taken)}: the gateway sets it from each request",
        )
        shaping = named_in(ANSWER_SHAPE_FIELDS)
        _require(
            not shaping,
            f"extra_body must not set {', '.join(shaping)}: the gateway relays one answer, "
            "as content or tool_calls",
        )
        for name in self.extra_body:
            # A request's own effort replaces the default in this spelling only: another
            # would go beside it, and a server matching fields without case reads either.
            _require(
                name == REASONING_EFFORT_FIELD or name.lower() != REASONING_EFFORT_FIELD,
                f"extra_body sets {name}: write reasoning_effort in lower case, as a "
                "request's own effort replaces it",
            )
        secret = named_in(_CREDENTIAL_PARAMETERS)
        _require(
            not secret,
            f"extra_body must not carry credentials ({', '.join(secret)}); use api_key_env",
        )
        _require(self.timeout_s > 0 and self.connect_timeout_s > 0, "timeouts must be > 0")
        _require(
            self.stream_idle_timeout_s is None or self.stream_idle_timeout_s > 0,
            "stream_idle_timeout_s must be > 0 when set",
        )
        _require(
            self.first_output_timeout_s is None or self.first_output_timeout_s > 0,
            "first_output_timeout_s must be > 0 when set",
        )
        _require(self.max_connections >= 1, "max_connections must be >= 1")
        _require(self.weight >= 1, "weight must be >= 1")
        _require(self.max_concurrency >= 1, "max_concurrency must be >= 1")
        _require(
            self.max_limit_wait_s is None or self.max_limit_wait_s >= 0,
            "max_limit_wait_s must be >= 0",
        )
        # Past its connections a call would wait for one on the upstream's `timeout_s`, and
        # a timeout there would count against an upstream that answered everything in time.
        _require(
            self.max_connections >= self.max_concurrency,
            f"max_connections ({self.max_connections}) must be >= max_concurrency "
            f"({self.max_concurrency}): each call in flight needs a connection of its own",
        )
        _require(
            (self.requests_per_minute or 1) >= 1 and (self.tokens_per_minute or 1) >= 1,
            "requests_per_minute and tokens_per_minute must be >= 1 when set",
        )
        _require(
            not self.shared_limits or bool(self.requests_per_minute or self.tokens_per_minute),
            "shared_limits shares requests_per_minute and tokens_per_minute; set either",
        )


# A cent a token, ten times today's dearest model. A price far past it (1e300)
# overflowed the ledger's pico-dollar arithmetic: every call of the model failed INTERNAL.
MAX_PRICE_USD_PER_MILLION = 1e4


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A model's context window and price in USD per million tokens."""

    context_window: int
    input_usd_per_million: float
    output_usd_per_million: float
    cached_input_usd_per_million: float | None = None

    def __post_init__(self) -> None:
        _require(self.context_window >= 256, "context_window must be >= 256")
        prices = (
            self.input_usd_per_million,
            self.output_usd_per_million,
            self.cached_input_usd_per_million or 0.0,
        )
        _require(
            all(p >= 0 for p in prices),
            "prices must be >= 0 (input_usd_per_million, output_usd_per_million, "
            "cached_input_usd_per_million)",
        )
        _require(
            all(p <= MAX_PRICE_USD_PER_MILLION for p in prices),
            f"prices must be at most {MAX_PRICE_USD_PER_MILLION:.1e} USD per million tokens "
            "(a cent a token)",
        )


# The name the local model is served under, beside the configured upstreams.
LOCAL_MODEL_UPSTREAM = "local"


@dataclass(frozen=True, slots=True)
class LocalModelConfig:
    """The embedded llama.cpp server used when no provider key is set.

    `enabled`: `auto` starts it only when no other upstream is enabled.
    """

    enabled: Literal["auto", "always", "never"] = "auto"
    model: str = "gemma-3-270m"
    model_path: str = "~/.cache/llm-gateway/gemma3-270m-q4_k_m.gguf"
    chat_format: str = "gemma"
    context_window: int = 2048
    threads: int = 0
    startup_timeout_s: float = 180.0
    restart_backoff_s: float = 1.0
    # A running server that answers no health probe for this long (deadlocked, stopped,
    # starved) is killed and restarted.
    hang_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _require(
            is_model_name(self.model),
            "model must be named with 1-256 printable characters, as requests name it",
        )
        # A file's path: the model is assembled beside it, under a name made from its own.
        _require(
            Path(self.model_path).expanduser().name != "",
            "model_path must name a file, such as ~/.cache/llm-gateway/model.gguf",
        )
        _require(self.context_window >= 256, "context_window must be >= 256")
        _require(self.hang_timeout_s > 0, "hang_timeout_s must be > 0")
        _require(self.startup_timeout_s > 0, "startup_timeout_s must be > 0")
        _require(self.threads >= 0, "threads must be >= 0 (0: the CPUs the gateway may use)")
        # 0 (or less) would restart a crashing llama.cpp in a busy loop: doubling keeps it 0.
        _require(self.restart_backoff_s > 0, "restart_backoff_s must be > 0")


# The longest TTL: the most a request's `ttl_seconds` (uint32) can ask. Redis refuses a
# SET whose expiry overflows its milliseconds (past about 9e15 s): with such a TTL every
# write failed, each one turning the store off for `error_cooldown_s`, reads included.
MAX_TTL_S = 2**32 - 1


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The response cache: in-process memory by default, Redis to share across replicas.

    `cacheable_by_default` decides what a request without an explicit cache mode gets:
    `deterministic` caches only temperature-0 or seeded requests, `all` caches every
    request, `none` caches only requests that ask for it.
    """

    enabled: bool = True
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = ""
    redis_password_env: str | None = None
    key_prefix: str = "llmgw"
    default_ttl_s: int = 3600
    max_ttl_s: int = 7 * 24 * 3600
    max_entry_bytes: int = 1024 * 1024
    # The memory backend's bound: past it, the least recently used entries go first.
    memory_max_bytes: int = 256 * 1024 * 1024
    operation_timeout_s: float = 0.25
    error_cooldown_s: float = 1.0
    cacheable_by_default: Literal["deterministic", "all", "none"] = "deterministic"

    def __post_init__(self) -> None:
        # The ledger and auth use Redis once given a URL: a URL here with the memory
        # backend would leave each replica its own cache without a word.
        _require(
            self.backend == "redis" or not self.redis_url,
            "redis_url is set but backend is memory; set backend: redis to share the cache "
            "through Redis, or remove redis_url",
        )
        if self.backend == "redis":
            parts = urlsplit(self.redis_url)
            _require(
                parts.scheme in ("redis", "rediss") and bool(parts.hostname),
                "redis_url must be redis://HOST:PORT/DB when backend is redis",
            )
            _require(
                not has_redis_credentials(self.redis_url),
                "redis_url must not carry credentials; use redis_password_env",
            )
            _require_redis_address(self.redis_url)
        _require(1 <= self.default_ttl_s <= self.max_ttl_s, "need 1 <= default_ttl_s <= max_ttl_s")
        _require(self.max_ttl_s <= MAX_TTL_S, f"max_ttl_s must be at most {MAX_TTL_S}")
        _require(
            self.memory_max_bytes >= self.max_entry_bytes,
            "memory_max_bytes must be >= max_entry_bytes (an entry must fit)",
        )
        _require(self.max_entry_bytes >= 1024, "max_entry_bytes must be >= 1024")
        _require(self.operation_timeout_s > 0, "operation_timeout_s must be > 0")
        _require(self.error_cooldown_s >= 0, "error_cooldown_s must be >= 0")
        _require(bool(self.key_prefix), "key_prefix must not be empty")

    @property
    def uses_redis(self) -> bool:
        """Whether the cache connects to Redis: the redis backend, the cache enabled."""
        return self.enabled and self.backend == "redis"


# The most labels `defaults.max_labels` may allow a call, so the most a usage row can
# carry: a GetUsage filter of more matches nothing under any config, and is refused by
# its count before its entries are read (4 MiB hold 400,000).
MAX_LABELS = 256


@dataclass(frozen=True, slots=True)
class RequestDefaults:
    """What a request gets for fields it leaves unset."""

    truncation: TruncationMode = TruncationMode.NONE
    cache_mode: CacheMode = CacheMode.DEFAULT
    max_messages: int = 1000
    max_stop_sequences: int = 4
    max_labels: int = 32
    max_label_length: int = 256
    max_request_bytes: int = 2 * 1024 * 1024
    max_prompt_tokens: int = 1_000_000
    max_stop_length: int = 256

    def __post_init__(self) -> None:
        _require(self.max_messages >= 1, "max_messages must be >= 1")
        _require(self.max_prompt_tokens >= 1, "max_prompt_tokens must be >= 1")
        _require(self.max_stop_sequences >= 0, "max_stop_sequences must be >= 0")
        _require(0 <= self.max_labels <= MAX_LABELS, f"max_labels must be 0..{MAX_LABELS}")
        # 0 is no "unlimited" here: it would refuse every request, label or stop sequence.
        _require(
            min(self.max_request_bytes, self.max_label_length, self.max_stop_length) >= 1,
            "max_request_bytes, max_label_length and max_stop_length must be >= 1",
        )


_TENANT_NAME = re.compile(r"[A-Za-z0-9_.\-@:]{1,128}")
# One pattern match: a keys file of 10,000 lines is parsed on each change while serving.
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# The entry under `tenants` or `budgets` for every tenant without its own (never a
# tenant's name: `*` is not one).
ANY_TENANT = "*"


def is_tenant_name(name: str) -> bool:
    """Whether `name` is a valid tenant name."""
    return bool(_TENANT_NAME.fullmatch(name))  # `$` would also match before a final newline


@dataclass(frozen=True, slots=True)
class CallerKey:
    """One caller key, stored only as the SHA-256 hex digest of the key."""

    sha256: str
    tenant: str

    def __post_init__(self) -> None:
        _require(
            _SHA256_HEX.fullmatch(self.sha256) is not None,
            "sha256 must be 64 lowercase hex digits (the key's hash, never the key)",
        )
        _require(is_tenant_name(self.tenant), "tenant must be 1-128 of A-Z a-z 0-9 _ . - @ :")


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Caller authentication: `off` (local development) or bearer `keys`.

    Keys come from `keys` (hashes in this file), `keys_file` (lines of `HASH TENANT`,
    appended by `python -m service keys create`) and, with `redis_url`, the Redis hash
    `redis_key_prefix + "keys"`. `redis_url` also makes tenant limits shared by replicas.
    """

    mode: Literal["off", "keys"] = "off"
    keys: tuple[CallerKey, ...] = ()
    keys_file: str | None = None
    keys_file_check_s: float = 2.0  # how often a changed keys file is re-read
    # At most one `auth.rejected` line this often; those left out are told as it ends.
    rejected_log_interval_s: float = 60.0
    redis_url: str | None = None
    redis_password_env: str | None = None
    redis_key_prefix: str = "llm_gateway:"
    redis_timeout_s: float = 0.5
    # Auth off on a non-loopback address is refused unless this is set.
    allow_auth_off_on_public_listen: bool = False

    def __post_init__(self) -> None:
        if self.redis_url is not None:
            parts = urlsplit(self.redis_url)
            _require(
                parts.scheme in ("redis", "rediss", "unix"),
                "redis_url must be redis://, rediss:// or unix://",
            )
            _require(
                not has_redis_credentials(self.redis_url),
                "redis_url must not carry credentials; use redis_password_env",
            )
            _require_redis_address(self.redis_url)
        _require(self.redis_timeout_s > 0, "redis_timeout_s must be > 0")
        _require(self.keys_file_check_s >= 0, "keys_file_check_s must be >= 0")
        _require(self.rejected_log_interval_s > 0, "rejected_log_interval_s must be > 0")
        _require_one_tenant_a_key(self.keys)


def _require_one_tenant_a_key(keys: Sequence[CallerKey]) -> None:
    """Refuse a key listed again for another tenant, as a keys file does: its callers
    could not be told apart (the last entry would name them, silently)."""
    first: dict[str, int] = {}
    for index, key in enumerate(keys):
        at = first.setdefault(key.sha256, index)
        _require(
            keys[at].tenant == key.tenant,
            f"keys[{index}]: the key of keys[{at}] again, for another tenant",
        )


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """What one tenant may use; 0 means unlimited, an empty `allowed_models` all models.

    `is_admin`: the tenant may read every tenant's usage (GetUsage), not only its own.
    The entry `ANY_TENANT` is what each tenant without its own entry may use.
    """

    allowed_models: tuple[str, ...] = ()
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrent_calls: int = 0
    is_admin: bool = False

    def __post_init__(self) -> None:
        _require(
            min(self.requests_per_minute, self.tokens_per_minute, self.max_concurrent_calls) >= 0,
            "limits (requests_per_minute, tokens_per_minute, max_concurrent_calls) must be "
            ">= 0 (0: unlimited)",
        )

    def allows_model(self, model: str) -> bool:
        """Whether this tenant may call `model`."""
        return not self.allowed_models or model in self.allowed_models

    @property
    def has_rate_limits(self) -> bool:
        """Whether any per-minute or concurrency limit applies (state to keep per tenant)."""
        return bool(self.requests_per_minute or self.tokens_per_minute or self.max_concurrent_calls)


@dataclass(frozen=True, slots=True)
class ResilienceConfig:
    """Retries, backoff, retry budget and circuit breaking of upstream calls."""

    attempts: int = 3
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 8.0
    max_retry_after_s: float = 60.0
    retry_budget_ratio: float = 0.2
    retry_budget_window_s: float = 10.0
    retry_budget_min_retries: int = 10
    breaker_consecutive_failures: int = 10
    breaker_failure_ratio: float = 0.5
    breaker_min_calls: int = 20
    breaker_window_s: float = 30.0
    breaker_cool_down_s: float = 15.0
    key_rejected_cool_down_s: float = 300.0
    max_limit_wait_s: float = 5.0
    min_attempt_s: float = 0.05

    def __post_init__(self) -> None:
        _require(self.attempts >= 1, "attempts must be >= 1")
        _require(
            0 < self.backoff_base_s <= self.backoff_cap_s,
            "need 0 < backoff_base_s <= backoff_cap_s",
        )
        _require(self.max_retry_after_s >= 0, "max_retry_after_s must be >= 0")
        _require(self.retry_budget_ratio >= 0, "retry_budget_ratio must be >= 0")
        _require(self.retry_budget_window_s > 0, "retry_budget_window_s must be > 0")
        _require(self.retry_budget_min_retries >= 0, "retry_budget_min_retries must be >= 0")
        _require(self.breaker_consecutive_failures >= 1, "breaker_consecutive_failures >= 1")
        _require(0 < self.breaker_failure_ratio <= 1, "breaker_failure_ratio must be in (0, 1]")
        _require(self.breaker_min_calls >= 1, "breaker_min_calls must be >= 1")
        _require(self.breaker_window_s > 0, "breaker_window_s must be > 0")
        _require(self.breaker_cool_down_s > 0, "breaker_cool_down_s must be > 0")
        _require(self.key_rejected_cool_down_s > 0, "key_rejected_cool_down_s must be > 0")
        _require(self.max_limit_wait_s >= 0, "max_limit_wait_s must be >= 0")
        _require(self.min_attempt_s >= 0, "min_attempt_s must be >= 0")


@dataclass(frozen=True, slots=True)
class SummarizeConfig:
    """Limits and defaults of the Summarize RPC."""

    max_document_bytes: int = 2 * 1024 * 1024
    default_target_tokens: int = 256
    chunk_overlap_tokens: int = 64
    concurrency: int = 4  # chunk summaries in flight per call
    chunk_attempts: int = 3  # tries per chunk before the call fails
    retry_backoff_s: float = 0.2  # doubled on each further try
    max_levels: int = 6

    def __post_init__(self) -> None:
        _require(self.max_document_bytes >= 1, "max_document_bytes must be >= 1")
        # A caller may ask for no less (`summarize._MIN_TARGET_TOKENS`): a summary cut off.
        _require(self.default_target_tokens >= 32, "default_target_tokens must be >= 32")
        _require(self.chunk_overlap_tokens >= 0, "chunk_overlap_tokens must be >= 0")
        _require(self.concurrency >= 1, "concurrency must be >= 1")
        _require(self.chunk_attempts >= 1, "chunk_attempts must be >= 1")
        _require(self.retry_backoff_s >= 0, "retry_backoff_s must be >= 0")
        _require(self.max_levels >= 1, "max_levels must be >= 1")


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """Limits and defaults of the CompleteBatch RPC."""

    max_items: int = 1000
    default_concurrency: int = 8
    max_concurrency: int = 64
    # The share of a tenant's per-minute limits a paced batch leaves to its other calls.
    rate_left_to_other_calls: float = 0.1

    def __post_init__(self) -> None:
        _require(self.max_items >= 1, "max_items must be >= 1")
        _require(
            0 <= self.rate_left_to_other_calls < 1, "rate_left_to_other_calls must be in [0, 1)"
        )
        _require(self.max_concurrency >= 1, "max_concurrency must be >= 1")
        _require(
            1 <= self.default_concurrency <= self.max_concurrency,
            "default_concurrency must be in [1, max_concurrency]",
        )


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """Traces and metrics; exporters come from the standard `OTEL_*` environment.

    `OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER` (otlp, console, prometheus, none;
    default none) pick the exporters, so nothing leaves the process unless configured.
    """

    enabled: bool = True
    # Prompt and completion text on spans: off unless the operator opts in.
    capture_content: bool = False
    # A caller's W3C `baggage` passed on to upstreams: off, since a provider is a third
    # party and baggage carries whatever internal values callers put there (user ids).
    forward_baggage: bool = False
    service_name: str = "llm-gateway"
    prometheus_port: int | None = None
    prometheus_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        port = self.prometheus_port
        _require(port is None or 0 <= port <= 65535, "prometheus_port must be 0..65535")
        host = self.prometheus_host
        # Python's own servers read "" as every address; the endpoint resolves it, finds
        # nothing, and the start failed (status 1) where `check` said ok.
        _require(
            host != "",
            "prometheus_host must name a host: 0.0.0.0 for every address, 127.0.0.1 for "
            "this machine alone",
        )
        # The endpoint takes a bare host, as `server.listen`'s brackets are for its port.
        _require(
            not (host.startswith("[") and host.endswith("]")),
            f"prometheus_host must be a host without brackets: write {host[1:-1]}",
        )


# The longest `ledger.retention_days`: far past any need, and an expiry Redis takes. Past
# about 1e11 days its milliseconds overflow: Redis refused every write, and every call's
# usage and spend were lost (GetUsage empty, budgets never charged) while calls went on.
MAX_RETENTION_DAYS = 10**9


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    """Where usage is summed: in memory, or in Redis shared by every replica."""

    # May carry a password: never printed. Or name its variable in redis_password_env, as
    # the cache and auth do, so that one credential-free URL serves all three.
    redis_url: str | None = field(default=None, repr=False)
    redis_password_env: str | None = None
    key_prefix: str = "llm-gateway:usage"
    bucket_s: int = 3600
    retention_days: int = 62
    # Each Redis operation's bound: a hung Redis costs a call this much, not redis-py's 5 s.
    operation_timeout_s: float = 0.5
    # Rows (model, upstream and label set) a tenant may start in one bucket; the calls
    # past it are summed in one row per model and upstream, labelled `OVERFLOW_LABELS`.
    max_rows_per_tenant: int = 1000

    def __post_init__(self) -> None:
        _require(self.operation_timeout_s > 0, "operation_timeout_s must be > 0")
        _require(self.max_rows_per_tenant >= 1, "max_rows_per_tenant must be >= 1")
        if self.redis_url:  # checked here, or a typo only fails when the server starts
            _require(
                urlsplit(self.redis_url).scheme in ("redis", "rediss", "unix"),
                "redis_url must be redis://, rediss:// or unix://",
            )
            _require_redis_address(self.redis_url)
        _require(
            60 <= self.bucket_s <= 86400 and 86400 % self.bucket_s == 0,
            "bucket_s must divide a day and be >= 60",
        )
        _require(
            1 <= self.retention_days <= MAX_RETENTION_DAYS,
            f"retention_days must be 1..{MAX_RETENTION_DAYS}",
        )


# The largest budget: far past any spend, and still a number the ledger's arithmetic
# holds exactly (Redis's Lua compares whole dollars, exact in a double below 2^53).
MAX_BUDGET_USD = 1e15


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """A tenant's spending limit in USD per calendar period (UTC)."""

    usd: float
    period: Literal["day", "month"] = "month"
    # Output tokens reserved for a call that sets no `max_tokens` (0: its prompt only),
    # so that such calls in flight together cannot overrun the budget by their answers.
    reserve_output_tokens: int = 0

    def __post_init__(self) -> None:
        _require(self.usd >= 0, "usd must be >= 0")
        # The ledger counts in pico-dollars: past about 1e296 USD a limit is no float
        # there, and every call the budget checks failed INTERNAL.
        _require(
            self.usd <= MAX_BUDGET_USD,
            f"usd must be at most {MAX_BUDGET_USD:.1e} (as good as no limit)",
        )
        _require(self.reserve_output_tokens >= 0, "reserve_output_tokens must be >= 0")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The whole configuration."""

    server: ServerConfig = ServerConfig()
    upstreams: tuple[UpstreamConfig, ...] = ()
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    local_model: LocalModelConfig = LocalModelConfig()
    cache: CacheConfig = CacheConfig()
    defaults: RequestDefaults = RequestDefaults()
    resilience: ResilienceConfig = ResilienceConfig()
    summarize: SummarizeConfig = SummarizeConfig()
    batch: BatchConfig = BatchConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    ledger: LedgerConfig = LedgerConfig()
    budgets: Mapping[str, BudgetConfig] = field(default_factory=dict)
    auth: AuthConfig = AuthConfig()
    tenants: Mapping[str, TenantConfig] = field(default_factory=dict)
    source: str = "<defaults>"
    # {key path: the LLM_GATEWAY__... variable that set it}, so that errors found after
    # parsing (TLS files, the listen policy) can name the variable too.
    overrides: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    # {key path: the command-line flag that set it (`serve --listen`)}: the file and the
    # environment are then not to blame for its value.
    flags: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def error(
        self, key: str, problem: str, *, kind: type[ConfigError] = ConfigError
    ) -> ConfigError:
        """A config error on `key`, naming the flag that set it, or the variables that set
        it or a key under it."""
        if key in self.flags:
            return kind(COMMAND_LINE, self.flags[key], problem)
        return kind(self.source, key, _with_variables(problem, key, self.overrides))

    @property
    def enabled_upstreams(self) -> tuple[UpstreamConfig, ...]:
        """Upstreams whose key is present (or that need none)."""
        return tuple(u for u in self.upstreams if u.api_key_env is None or u.api_key)

    @property
    def secret_variables(self) -> frozenset[str]:
        """The environment variables this config reads secrets from: provider keys and
        Redis passwords, and the overrides that set a Redis URL (`ledger.redis_url` may
        carry its password)."""
        named = [u.api_key_env for u in self.upstreams]
        named += [u.proxy_authorization_env for u in self.upstreams]
        named += [
            self.cache.redis_password_env,
            self.auth.redis_password_env,
            self.ledger.redis_password_env,
        ]
        named += [v for k, v in self.overrides.items() if k.rpartition(".")[2] == "redis_url"]
        return frozenset(name for name in named if name)

    @property
    def wants_local_model(self) -> bool:
        """Whether the local model runs: `always`, or `auto` with no other upstream enabled."""
        enabled = self.local_model.enabled
        return enabled == "always" or (enabled == "auto" and not self.enabled_upstreams)


def _with_variables(
    problem: str, key: str, overrides: Mapping[str, str], *, section_check: bool = False
) -> str:
    """`problem`, saying which variables set `key`, keys under it, or a section above it
    whole (`LLM_GATEWAY__UPSTREAMS='[...]'` for `upstreams[0]`): the file may not hold the
    key at all.

    A section's own check (`section_check`: `server: grace_period_s must be >= 0`) names
    the keys it is about, and only their variables are named: one setting another key of
    the section (the image's listen address) is not to blame.
    """
    variables = [
        v
        for k, v in overrides.items()
        if k == key
        or key.startswith((f"{k}.", f"{k}["))
        or (
            k.startswith(f"{key}.")
            and (not section_check or _names_key(problem, k[len(key) + 1 :].split(".")[0]))
        )
    ]
    if variables:
        problem += f" (set from the environment: {', '.join(sorted(variables))})"
    return problem


def _names_key(problem: str, name: str) -> bool:
    """Whether `problem` names the key `name` as a word (`listen`, not in `health_listen`)."""
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", problem) is not None


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Turn YAML data into the annotated type, raising ValueError with the key path."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key)
    if origin is Literal:
        if isinstance(value, bool) and "off" in args:  # YAML 1.1 reads a bare `off` as false
            value = "on" if value else "off"
        elif isinstance(value, bool) and "true" in args:  # a switch with a third setting
            value = "true" if value else "false"
        if value not in args:
            raise ValueError(f"{key}: must be one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(typing.cast(type[Any], tp), value, key)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(str(value).lower())
        except ValueError:
            allowed = ", ".join(str(m.value) for m in tp)
            raise ValueError(f"{key}: must be one of {allowed}") from None
    if origin in (tuple,) and args and args[-1] is Ellipsis:
        if not isinstance(value, list):
            raise ValueError(f"{key}: must be a list")
        return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict, typing.Mapping):
        if key.endswith("models") and args[1] is str and isinstance(value, list):
            # `models: [a, b]` is shorthand for serving each under its own name.
            names = [_convert(str, v, f"{key}[{i}]") for i, v in enumerate(value)]
            value = dict(zip(names, names, strict=True))
        if not isinstance(value, dict):
            raise ValueError(f"{key}: must be a mapping")
        if args[1] is object:  # free-form data sent on as JSON (`extra_body`): keys kept
            if (problem := _json_shape_problem(value)) is not None:
                raise ValueError(f"{key}: {problem}")
            return _json_value(value, key)
        converted: dict[str, Any] = {}
        for name, item in value.items():
            # `4711:` and `"4711":` are two keys to YAML's loader, one name here.
            if str(name) in converted:
                raise ValueError(
                    f"{key}.{name}: duplicate key (written once as a number, once as text)"
                )
            converted[str(name)] = _convert(args[1], item, f"{key}.{name}")
        return converted
    if tp in (float, int) and (misreading := _yaml11_misreading(value)) is not None:
        raise ValueError(f"{key}: {misreading}")
    if tp in (float, int) and (misreading := _exponent_misreading(value, tp)) is not None:
        raise ValueError(f"{key}: {misreading}")
    if tp is float:
        # Infinity too: no wait, timeout, price or bound here means "forever" (a grace period
        # of `.inf` would hold a shutdown for ever).
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = _finite(value)
        if number is None:
            raise ValueError(f"{key}: must be a number")
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: must be an integer")
        # No setting means more past 64 bits, and some overflowed a float past about 1e308:
        # a rate failed every call INTERNAL, `resilience.attempts` the start.
        if not -(2**63) <= value < 2**63:
            raise ValueError(f"{key}: must be an integer of at most 64 bits")
        return int(value)  # not a `_WrittenInt`: the number alone
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: must be true or false")
        return value
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ValueError(f"{key}: must be a string")
        return value.written if isinstance(value, _WrittenInt | _WrittenFloat) else str(value)
    raise ValueError(f"{key}: unsupported type {tp}")


def _finite(value: int | float) -> float | None:
    """`value` as a float, or None when it is not finite: an integer past a float's range
    (about 1.8e308) is none either, where `math.isfinite` would raise OverflowError."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


# Levels of lists and mappings free-form JSON data may nest: orjson writes a request body
# of at most 254, and refused every call's (INTERNAL) past it.
MAX_JSON_DEPTH = 200


# Values (mappings, lists and scalars) free-form JSON data may hold in all, a YAML alias's
# counted again at each use, as every request body carries them so: ten lines of aliases
# of aliases (a "billion laughs") read as 10^10 values, and the load hung, eating memory.
MAX_JSON_VALUES = 100_000


class _JsonShapeError(Exception):
    """Free-form JSON data that no request body could carry."""


def _json_shape_problem(value: object) -> str | None:
    """Why `value` cannot go in a request body as it is: nested past `MAX_JSON_DEPTH`,
    holding itself (a YAML alias inside its own anchor: the walk recursed without end) or
    past `MAX_JSON_VALUES` values; None when it can. Stops at the first such value."""
    counted = 0
    on_path: set[int] = set()

    def walk(item: object, depth: int) -> None:
        nonlocal counted
        counted += 1
        if counted > MAX_JSON_VALUES:
            raise _JsonShapeError(
                f"must hold at most {MAX_JSON_VALUES} values in all (a YAML alias counts "
                "its anchor's again at each use)"
            )
        if not isinstance(item, dict | list):
            return
        if depth > MAX_JSON_DEPTH:
            raise _JsonShapeError(f"must nest at most {MAX_JSON_DEPTH} lists and mappings")
        if id(item) in on_path:
            raise _JsonShapeError("must not hold itself (a YAML alias inside its own anchor)")
        on_path.add(id(item))
        for child in item.values() if isinstance(item, dict) else item:
            walk(child, depth + 1)
        on_path.discard(id(item))

    try:
        walk(value, 1)
    except _JsonShapeError as exc:
        return str(exc)
    return None


def _json_value(value: Any, key: str) -> object:
    """`value` if JSON can carry it as it is: no dates, sets, NaN, integers past 64 bits
    or non-string keys."""
    if isinstance(value, _UnquotedLeadingZero):
        raise ValueError(f"{key}: {_yaml11_misreading(value)}, or quote it for text")
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int | float) and (misreading := _yaml11_misreading(value)) is not None:
        raise ValueError(f"{key}: {misreading}")
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:  # orjson writes no larger integer
            raise ValueError(f"{key}: must be an integer of at most 64 bits")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{key}: must be a finite number")
        return float(value)  # not a `_WrittenFloat`: orjson writes no subclass of float
    if isinstance(value, list):
        return [_json_value(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        for name in value:
            if not isinstance(name, str):
                raise ValueError(f"{key}: keys must be strings, got {_shown_name(name)!r}")
        # str(): an `_UnquotedLeadingZero` key (`08:`) as the str orjson takes as a key.
        return {str(name): _json_value(v, f"{key}.{name}") for name, v in value.items()}
    raise ValueError(f"{key}: must be JSON data (a mapping, list, string, number, bool or null)")


def _shown_name(name: object) -> str:
    """An unknown key as an error may show it: never a caller key pasted in its place
    (`llmgw_...`) nor another that looks like a key (`sk_live_...`), and no more than 32
    characters of anything else."""
    text = str(name)
    if text.startswith(CALLER_KEY_PREFIX):
        return CALLER_KEY_PREFIX + "…"
    if _looks_like_a_key(text):
        return "(a name that looks like a key)"
    return text if len(text) <= 32 else text[:32] + "…"


class _SectionCheckError(ValueError):
    """A section's `__post_init__` refused it: the problem names the keys it is about."""


def _required_fields(cls: type[Any]) -> list[str]:
    """The fields of a config section that have no default, in their order."""
    return [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]


def _build(cls: type[T], data: Any, key: str) -> T:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{key or '(top level)'}: must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    for secret in (f for f in fields if "from_environment" in f.metadata and f.name in data):
        variable = secret.metadata["from_environment"]
        problem = f"never read from the file; put it in the environment variable {variable} names"
        raise ValueError(f"{key + '.' if key else ''}{secret.name}: {problem}")
    names = {f.name for f in fields if f.init and "set_by_gateway" not in f.metadata}
    unknown = sorted(set(data) - names, key=str)  # YAML keys may be bools or numbers
    if unknown:
        # Never a key the file may not set: one filled from the environment, or set by
        # `parse_config` (`source`, `overrides`, `flags`).
        settable = {f.name for f in fields if f.init and not f.metadata} - set(_NOT_IN_THE_FILE)
        problem = f"unknown key{_did_you_mean(unknown[0], settable)}"
        raise ValueError(f"{key + '.' if key else ''}{_shown_name(unknown[0])}: {problem}")
    missing = [name for name in _required_fields(cls) if name not in data]
    if missing:
        raise ValueError(f"{key or '(top level)'}: missing required key(s): {', '.join(missing)}")
    kwargs = {
        name: _convert(hints[name], data[name], f"{key + '.' if key else ''}{name}")
        for name in names
        if name in data
    }
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{key or '(top level)'}: {exc}") from None
    except ValueError as exc:
        raise _SectionCheckError(f"{key or '(top level)'}: {exc}") from None


# Fields of `GatewayConfig` that `parse_config` and `serve`'s flags set, never the file.
_NOT_IN_THE_FILE = ("source", "overrides", "flags")


def _did_you_mean(unknown: object, names: set[str]) -> str:
    """` (did you mean 'listen'?)` for an unknown key a letter or two from one of `names`
    (`listne`, `Listen`, `redis-url`), else nothing: only a name of the config's own is shown."""
    import difflib  # only for a config refused: 2 ms of every start's import time

    written = str(unknown).lower().replace("-", "_")
    close = difflib.get_close_matches(written, sorted(names), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _key_in(node: dict[Any, Any], part: str, variable: str, path: list[str]) -> str | None:
    """The key of `node` that the lower-cased `part` of a variable's name means; None when
    `node` has none.

    Environment variable names are upper case by convention, so keys are matched without
    case: `LLM_GATEWAY__TENANTS__SEARCH__...` reaches a tenant the file names `Search`.
    """
    # Not a shortcut for an exact match: `search` beside `Search` is ambiguous all the same.
    # Any key as text, as the config will name it: YAML reads a tenant `4711:` as a number,
    # and a new "4711" beside it would replace its whole entry.
    matches = [key for key in node if str(key).lower() == part]
    if len(matches) > 1:
        names = ", ".join(sorted(map(str, matches)))
        raise ConfigError(variable, ".".join(path), f"matches more than one key: {names}")
    if not matches:
        return None
    key = matches[0]
    if not isinstance(key, str):  # the key as text, as the rest of the path names it
        node[str(key)] = node.pop(key)
    return str(key)


# Sections whose keys are names (of tenants, models), which a variable reaches but does not
# add: its name would be the lower-cased one, and names are case-sensitive, so the budget of
# `LLM_GATEWAY__BUDGETS__TEAMA__USD` went to a tenant "teama" while keys named `TeamA`.
_NAMED_ENTRIES = frozenset({"tenants", "budgets", "models"})


def _no_new_entry(variable: str, section: str, name: str) -> ConfigError:
    """The refusal of a variable that would add the entry `name` to `section`."""
    return ConfigError(
        variable,
        f"{section}.{name}",
        f"the file lists no entry {name!r} (in any case) under {section}; a variable changes "
        "an entry the file lists but adds none, as its name cannot say the name's case: add "
        f"the entry to the file, or set {section} whole, as in "
        f"{ENV_PREFIX}{section.upper()}='{{Name: {{...}}}}'",
    )


def _empty_over_the_file(variable: str, key: str, written: object) -> ConfigError:
    """The refusal of an empty variable for a key the file sets: a template's unfilled
    variable, most often, which took what the file set back to the default without a word
    (a tenant's limits, all of `resilience`, `auth.redis_url`: keys and limits then each
    process's own)."""
    if isinstance(written, dict):
        mend = "set its keys one variable each, or set it to {} to reset it"
        return ConfigError(
            variable,
            key,
            f"is empty, which would reset all the file sets there to its defaults: {mend}",
        )
    mend = "give it a value, or leave the variable out to keep the file's"
    return ConfigError(variable, key, f"is empty, which would unset what the file sets: {mend}")


def _override_value(raw: str) -> Any:
    """An override's value: `raw` read as YAML (numbers, booleans, `[a, b]`), else as it is.

    A value that is not YAML ("[::1]:50051", a flow list to YAML) or that YAML reads as a
    mapping without braces (the prefix "llm_gateway:") is the string it looks like.
    """
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader)  # names as written, as in the file
    except (yaml.YAMLError, RecursionError):
        return raw
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        return raw
    return value


def _override_paths(environ: Mapping[str, str]) -> dict[str, list[str]]:
    """Each `LLM_GATEWAY__...` variable's key path, lower-cased, in the order of names."""
    paths: dict[str, list[str]] = {}
    for name in sorted(environ):  # one order, so that an error names the same variable
        if not name.startswith(ENV_PREFIX):
            # LLM_GATEWAY_SERVER__LISTEN (one underscore short) would be ignored without a
            # word; the gateway's other variables (LLM_GATEWAY_CONFIG, ...) have no "__".
            if name.startswith(ENV_PREFIX[:-1]) and "__" in name:
                raise ConfigError(name, "", f"not an override: those start with {ENV_PREFIX}")
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            raise ConfigError(name, "", "names no key")
        paths[name] = path
    return paths


def _refuse_one_key_from_two(paths: Mapping[str, list[str]]) -> None:
    """Refuse two variables setting one key: both naming it (`LLM_GATEWAY__SERVER__LISTEN`
    and `LLM_GATEWAY__Server__Listen`), or one naming it and the other its section whole
    (`LLM_GATEWAY__SERVER='{grace_period_s: 3}'`, which put `listen` back to its default).

    One of them would win without a word, which one by the order of the environment.
    """
    for (first, first_path), (second, second_path) in itertools.combinations(paths.items(), 2):
        shorter = min(len(first_path), len(second_path))
        if first_path[:shorter] != second_path[:shorter]:
            continue
        if len(first_path) == len(second_path):
            raise ConfigError(
                first, ".".join(first_path), f"also set by {second}; set it in one variable"
            )
        (key, key_path), (whole, section) = sorted(
            [(first, first_path), (second, second_path)], key=lambda pair: -len(pair[1])
        )
        raise ConfigError(
            key,
            ".".join(key_path),
            f"also set by {whole}, which sets all of {'.'.join(section)}; set it in one variable",
        )


def _apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Set each `LLM_GATEWAY__...` variable's value in `data`; return {key path: variable}."""
    paths = _override_paths(environ)
    _refuse_one_key_from_two(paths)
    applied: dict[str, str] = {}
    for name, path in paths.items():
        node = data
        for index, part in enumerate(path):
            key = _key_in(node, part, name, path)
            if key is None and index == 1 and path[0] in _NAMED_ENTRIES:
                raise _no_new_entry(name, path[0], part)
            path[index] = part if key is None else key
            if index == len(path) - 1:
                break
            if node.get(path[index]) is None:  # absent, or a section with all keys commented out
                node[path[index]] = {}
            node = node[path[index]]
            if not isinstance(node, dict):
                raise ConfigError(name, ".".join(path), "cannot override inside a non-mapping")
        value = _override_value(environ[name])
        if value is None and node.get(path[-1]) not in (None, {}):
            raise _empty_over_the_file(name, ".".join(path), node[path[-1]])
        node[path[-1]] = value
        applied[".".join(path)] = name
    return applied


def parse_config(
    data: Any, *, source: str = "<inline>", environ: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Build a validated config from parsed YAML data and the environment."""
    env = os.environ if environ is None else environ
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, "", "must be a YAML mapping")
    # The caller's data stays as it was: overrides and `source` are written into a copy.
    data = copy.deepcopy(data)
    overrides = _apply_env_overrides(data, env)
    # Fields of GatewayConfig set here or by `serve`'s flags, never by the file: a `flags:`
    # there was taken, and blamed the command line for the file's own values.
    for name in _NOT_IN_THE_FILE:
        if name in data:
            raise ConfigError(source, name, "unknown key")
    data["source"] = source
    try:
        config = _build(GatewayConfig, data, "")
    except ValueError as exc:
        key, _, problem = str(exc).partition(": ")
        section_check = isinstance(exc, _SectionCheckError)
        problem = _with_variables(problem, key, overrides, section_check=section_check)
        raise ConfigError(source, key, problem) from None
    config = dataclasses.replace(config, overrides=overrides)
    names = [u.name for u in config.upstreams]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise config.error("upstreams", f"duplicate upstream name {duplicate!r}")
    if config.local_model.enabled == "always" and LOCAL_MODEL_UPSTREAM in names:
        # Two upstreams of one name would share a breaker, limiter and retry budget, and
        # their answers and costs could not be told apart.
        raise config.error(
            f"upstreams[{names.index(LOCAL_MODEL_UPSTREAM)}].name",
            f"the local model's upstream is {LOCAL_MODEL_UPSTREAM!r} "
            "(local_model.enabled: always); choose another name",
        )
    for section in ("tenants", "budgets"):
        tenants = getattr(config, section)
        bad_tenant = next((t for t in tenants if not (is_tenant_name(t) or t == ANY_TENANT)), None)
        if bad_tenant is not None:
            raise config.error(f"{section}.{_shown_name(bad_tenant)}", "not a valid tenant name")
    if config.tenants.get(ANY_TENANT, TenantConfig()).is_admin:
        # Every unlisted tenant, a mistyped key's included, would read all tenants' usage.
        raise config.error(
            f"tenants.{ANY_TENANT}.is_admin",
            "cannot be true: it would make every tenant without its own entry an admin; "
            "list admin tenants by name",
        )
    shared = next((i for i, u in enumerate(config.upstreams) if u.shared_limits), None)
    if shared is not None and not config.auth.redis_url:
        # Refused at load, not left to run each process at the whole account's rate.
        raise config.error(
            f"upstreams[{shared}].shared_limits",
            "needs auth.redis_url: the shared buckets are kept in that Redis",
        )
    _check_redis_password_env(config, env)
    _check_chat_format(config)
    upstreams = tuple(_with_api_key(config, i, u, env) for i, u in enumerate(config.upstreams))
    upstreams = tuple(_with_proxy_authorization(config, i, u, env) for i, u in enumerate(upstreams))
    config = dataclasses.replace(config, upstreams=upstreams)
    return _with_local_model_in_catalog(config)


def _with_api_key(
    config: GatewayConfig, index: int, upstream: UpstreamConfig, env: Mapping[str, str]
) -> UpstreamConfig:
    """`upstream` with the key its `api_key_env` holds (unset or empty: none, disabled).

    A key with a line break (a Secret's file with its trailing newline) is refused: no
    header can carry it, and every call would fail inside the gateway, INTERNAL. So is
    one with another control character (a terminal's escape pasted with it): sent as it
    is, the upstream refused every request with 400, which callers were told was theirs.
    """
    variable = upstream.api_key_env
    if variable is None:
        return upstream
    key = env.get(variable) or None
    # Said without the value: it is the key.
    if key is not None and ("\r" in key or "\n" in key):
        raise config.error(
            f"upstreams[{index}].api_key_env",
            f"the environment variable {variable} holds a line break (a file's trailing "
            "newline?); a key is one line",
        )
    if key is not None and _HEADER_CONTROL.search(key):
        raise config.error(
            f"upstreams[{index}].api_key_env",
            f"the environment variable {variable} holds a control character; a key is "
            "printable text",
        )
    return dataclasses.replace(upstream, api_key=key)


def _with_proxy_authorization(
    config: GatewayConfig, index: int, upstream: UpstreamConfig, env: Mapping[str, str]
) -> UpstreamConfig:
    """`upstream` with the proxy credentials its `proxy_authorization_env` holds.

    A named variable that is unset or empty is refused, as a Redis password's is: going
    through the proxy without them would fail every connection far from the cause. Only
    an enabled upstream's is read (a disabled one, its key unset, opens no connection).
    """
    variable = upstream.proxy_authorization_env
    if variable is None or (upstream.api_key_env is not None and not upstream.api_key):
        return upstream
    value = env.get(variable)
    key = f"upstreams[{index}].proxy_authorization_env"
    if not value:
        state = "empty" if variable in env else "not set"
        raise config.error(
            key,
            f"the environment variable {variable} is {state}; set it to the proxy's "
            "user:password, or remove proxy_authorization_env to send none",
        )
    if ":" not in value or any(c in value for c in "\r\n"):
        # Said without the value: it is a password, or part of one.
        raise config.error(
            key, f"the environment variable {variable} must hold user:password on one line"
        )
    return dataclasses.replace(upstream, proxy_authorization=value)


def _with_local_model_in_catalog(config: GatewayConfig) -> GatewayConfig:
    """`config`, its catalog holding the local model when it serves: an entry the file does
    not list has the `n_ctx` the gateway starts llama.cpp with as its window (not the
    catalog's default for unknown models), and its tokens cost nothing; one it lists keeps
    its prices, its window held to that `n_ctx`.

    The smaller of the two, not a config error: prompts are fitted per model, before an
    upstream is picked, so they must fit every upstream serving it, and a larger window in
    the file may be a provider's beside the local model (`enabled: always`), or a file
    shared with gateways where a key turns the local model off (`enabled: auto`).
    """
    local = config.local_model
    if not config.wants_local_model:
        return config
    listed = config.models.get(local.model)
    if listed is None:
        entry = ModelConfig(
            context_window=local.context_window,
            input_usd_per_million=0.0,
            output_usd_per_million=0.0,
        )
    elif listed.context_window > local.context_window:
        entry = dataclasses.replace(listed, context_window=local.context_window)
    else:
        return config
    return dataclasses.replace(config, models={**config.models, local.model: entry})


# `--chat_format` names llama.cpp reads from the model file itself (its GGUF's chat
# templates, `chat_template.default` and any named one), beside the registered formats.
GGUF_TEMPLATE_FORMAT = "chat_template."


@functools.cache
def llama_chat_formats() -> frozenset[str] | None:
    """The chat formats llama-cpp-python registers; None without the `local` extra."""
    try:  # by name: mypy then needs no `local` extra either
        chat_format = importlib.import_module("llama_cpp.llama_chat_format")
    except (ImportError, OSError, RuntimeError):  # absent, or its library cannot load
        return None
    return frozenset(chat_format.LlamaChatCompletionHandlerRegistry()._chat_handlers)


def _check_chat_format(config: GatewayConfig) -> None:
    """Refuse a `local_model.chat_format` llama.cpp does not know: its server starts with
    one and then answers every completion with HTTP 500. Unchecked without llama.cpp, or
    when the local model does not run: reading the formats loads llama.cpp's library into
    this process (about 0.2 s and 30 MB), which only the model's own process needs."""
    if not config.wants_local_model:
        return
    chat_format = config.local_model.chat_format
    formats = llama_chat_formats()
    if formats is None or chat_format in formats or chat_format.startswith(GGUF_TEMPLATE_FORMAT):
        return
    raise config.error(
        "local_model.chat_format",
        f"{chat_format!r} is not a chat format llama.cpp knows; one of {', '.join(sorted(formats))}"
        f", or {GGUF_TEMPLATE_FORMAT}NAME for a template in the model file",
    )


def redis_password(variable: str | None, environ: Mapping[str, str]) -> str | None:
    """The Redis password held by the variable a section's `redis_password_env` names;
    None when it names none (`parse_config` has refused a named one that is unset)."""
    return (environ.get(variable) or None) if variable else None


def _check_redis_password_env(config: GatewayConfig, env: Mapping[str, str]) -> None:
    """Refuse a named Redis password variable that is unset or empty.

    Whoever named it expects a password to be used: connecting without one would hide the
    missing secret (until Redis refuses every command, a failure far from its cause). Not
    named: no password. Only sections that connect to Redis are checked (not a disabled
    cache: a staging overlay turning it off need not carry its password). Any named one
    must be a variable's name, as `api_key_env`: a password written there is never shown.
    """
    named = {
        "cache.redis_password_env": (config.cache.redis_password_env, config.cache.uses_redis),
        "auth.redis_password_env": (
            config.auth.redis_password_env,
            config.auth.redis_url is not None,
        ),
        "ledger.redis_password_env": (
            config.ledger.redis_password_env,
            bool(config.ledger.redis_url),
        ),
    }
    for key, (variable, connects) in named.items():
        if variable and not _is_variable_name(variable):
            problem = (
                f"must name an environment variable ({_VARIABLE_NAME_RULE}), "
                "not hold the password itself"
            )
            raise config.error(key, problem)
        if variable and connects and not env.get(variable):
            state = "empty" if variable in env else "not set"
            problem = (
                f"the environment variable {variable} is {state}; set it to the Redis "
                "password, or remove redis_password_env to connect without one"
            )
            raise config.error(key, problem)


class _WrittenInt(int):
    """An integer YAML 1.1 reads from a plain text that does not read back as it (`007`
    as 7, `0x1F` as 31), with that text: a number where the config wants one, the text
    where it wants a string (`tenant: 007`, the tenant a `007:` key names)."""

    written: str


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    value: int = loader.construct_yaml_int(node)
    return value if _reads_back(value, node) else _with_text(_WrittenInt(value), node)


class _WrittenFloat(float):
    """A float YAML 1.1 reads from a plain text that does not read back as it (`1.10` as
    1.1, `.inf` as inf), with that text, as `_WrittenInt`: `tenant: 1.10` names the tenant
    a `1.10:` key does, not a tenant "1.1"."""

    written: str


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    value: float = loader.construct_yaml_float(node)
    return value if _reads_back(value, node) else _with_text(_WrittenFloat(value), node)


def _reads_back(value: float, node: yaml.ScalarNode) -> bool:
    """Whether the number YAML read from `node` prints as its text (or it was quoted)."""
    return node.style is not None or str(value) == node.value


_Written = TypeVar("_Written", _WrittenInt, _WrittenFloat)


def _with_text(number: _Written, node: yaml.ScalarNode) -> _Written:
    number.written = node.value
    return number


def _key_as_written(node: yaml.ScalarNode, key: Any) -> Any:
    """A plain key YAML 1.1 reads as a value that does not read back as its text (`007`
    as 7, `no` as false, `null` as None), as written: keys here are names, and a tenant
    `007:` must be the tenant its keys file, `keys create` and certificates name `007`,
    not a tenant "7". One that reads back (`4711`) is named as text later."""
    if node.style is None and not isinstance(key, str) and str(key) != node.value:
        return node.value
    return key


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping, and keeping keys as
    written (`_key_as_written`).

    PyYAML keeps the last value of a repeated key, so a second `server:` section (or
    `timeout_s:` line) would silently drop the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # `<<: *base` merges are meant to be overridden
            key = _key_as_written(key_node, self.construct_object(key_node, deep=deep))
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        # Built here with the keys as written, not by PyYAML's loader: it keys by value,
        # and of `007:` and `7:` (two tenants) it kept the later one alone.
        self.flatten_mapping(node)  # `<<: *base`: its keys first, the mapping's own after
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key_node, yaml.ScalarNode):
                key = _key_as_written(key_node, key)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    "found unhashable key",
                    key_node.start_mark,
                )
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)
# YAML 1.2's octal, `0o17`: what the error on a YAML 1.1 octal (`017`) says to write when
# octal is meant. PyYAML's int constructor reads it already (Python's int() takes `0o`).
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?0o[0-7_]+$"), list("-+0")
)

# An integer YAML 1.1 reads as octal (`017`: 15), or would were it not for an 8 or 9 (`08`,
# then text): a leading zero is padding to most readers.
_LEADING_ZERO = re.compile(r"[-+]?0[0-9_]+")


class _UnquotedLeadingZero(str):
    """A plain (unquoted) `08` or `-09_5`: text to YAML 1.1, a number to its writer. Told
    apart from a quoted `'08'` for `extra_body`, where text is as good as a number, so that
    `top_k: 08` is refused as `top_k: 017` is rather than sent as the string "08"."""


def _construct_unquoted_leading_zero(
    loader: yaml.SafeLoader, node: yaml.ScalarNode
) -> _UnquotedLeadingZero:
    return _UnquotedLeadingZero(loader.construct_scalar(node))


_UniqueKeyLoader.add_constructor(
    "tag:llm-gateway,2025:unquoted-leading-zero", _construct_unquoted_leading_zero
)
# After YAML 1.1's int resolvers (the first char's list is tried in order): only what
# none of them read, a leading zero with an 8 or 9 among its digits.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:llm-gateway,2025:unquoted-leading-zero",
    re.compile(r"^[-+]?0[0-9_]*[89][0-9_]*$"),
    list("-+0"),
)


def _yaml11_misreading(value: object) -> str | None:
    """How YAML 1.1 read a number written with a leading zero (as octal) or with colons (in
    base 60, as a time), unlike what its writer meant; None for any other value.

    `attempts: 017` is 15 and `attempts: 1:30` 90 to YAML 1.1 (YAML 1.2 and JSON read
    neither so): the error says what was read and what to write.
    """
    if isinstance(value, str) and _LEADING_ZERO.fullmatch(value):
        decimal = int(value.replace("_", ""), 10)
        return f"{value} is no number in YAML 1.1, where a leading 0 means octal: write {decimal}"
    if not isinstance(value, _WrittenInt | _WrittenFloat):
        return None
    text = value.written
    read = str(int(value) if isinstance(value, int) else float(value))
    if ":" in text:
        return f"{text} reads as {read} in YAML 1.1 (base 60, as a time): write {read}"
    if _LEADING_ZERO.fullmatch(text):
        sign = "-" if text.startswith("-") else ""
        digits = text.lstrip("+-").replace("_", "").lstrip("0") or "0"
        return (
            f"{text} reads as {read} in YAML 1.1: write {sign}{digits}, "
            f"or {sign}0o{digits} if you mean octal"
        )
    return None


# A number with an exponent, as YAML 1.2, JSON and Python write it (`1e3`, `1.5e3`,
# `2e-1`): text to YAML 1.1, which reads an exponent only after a dot and with its sign.
_TEXT_EXPONENT = re.compile(r"[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9][0-9_]*)[eE][-+]?[0-9]+")


def _exponent_misreading(value: object, tp: type[float] | type[int]) -> str | None:
    """What to write for a number YAML 1.1 read as text for its exponent (`1e3`: a "must
    be a number" alone left its writer no wiser); None for any other value, and for a
    fraction where an integer goes (that error says it already)."""
    if not isinstance(value, str) or _TEXT_EXPONENT.fullmatch(value) is None:
        return None
    number = float(value.replace("_", ""))
    if not math.isfinite(number):
        return None  # past a float's range: "must be a number" says it
    if tp is int:
        if not number.is_integer():
            return None
        write = str(int(number))
    else:
        mantissa, exponent = re.split("[eE]", value)
        mantissa += "" if "." in mantissa else ".0"
        # A digit before the dot: YAML 1.1 reads `.5e+1` but not `-.5e+1`, whose error
        # told its writer to write it as written.
        mantissa = re.sub(r"^([-+]?)\.", r"\g<1>0.", mantissa)
        write = f"{mantissa}e{'' if exponent[0] in '+-' else '+'}{exponent}"
    problem = f"{value} is no number in YAML 1.1, which reads an exponent only after a dot "
    return problem + f"and with its sign: write {write}"


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    found = ((exc.problem, exc.problem_mark), (exc.context, exc.context_mark))
    return "; ".join(
        f"{text} at line {mark.line + 1}, column {mark.column + 1}"
        for text, mark in found
        if text and mark
    )


def _config_text(raw: bytes, source: str) -> str:
    """The config file's bytes as text, in the encoding its byte order mark names (UTF-16
    or UTF-32, as Windows tools save; else UTF-8, a mark left out)."""
    try:
        return marked_text(raw)
    except NotMarkedText as exc:
        raise ConfigError(
            source, "", f"not {exc.name} text: line {exc.line} has a byte that is not {exc.name}"
        ) from None


def load_config(path: str | Path, *, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read, override and validate the YAML config file at `path`."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror}") from None
    text = _config_text(raw, source)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        # Only the line and column: PyYAML's message quotes the line, which may hold a
        # password (ledger.redis_url may carry one).
        raise ConfigError(source, "", f"not valid YAML: {_yaml_problem(exc)}") from None
    except yaml.YAMLError:
        raise ConfigError(source, "", "not valid YAML") from None
    except RecursionError:  # PyYAML reads each level of nesting in a call of its own
        raise ConfigError(source, "", "not valid YAML: nested too deeply") from None
    config = parse_config(data, source=source, environ=environ)
    _check_tls_files(config)
    return config


def _check_tls_files(config: GatewayConfig) -> None:
    """Refuse certificate files the server could not read, now rather than at listen time."""
    tls = config.server.tls
    files = {
        "cert_file": tls.cert_file,
        "key_file": tls.key_file,
        "client_ca_file": tls.client_ca_file,
    }
    for key, path in files.items():
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            problem = f"cannot read {path}: {exc.strerror}"
            raise config.error(f"server.tls.{key}", problem) from None
    _check_tls_contents(config)


def _check_tls_contents(config: GatewayConfig) -> None:
    """Refuse certificate files grpc could not use: it would fail the listen itself, and
    the start would blame the address."""
    tls = config.server.tls
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # judge the files, not the key sizes grpc takes
    for key, path in (("cert_file", tls.cert_file), ("client_ca_file", tls.client_ca_file)):
        if path is None:
            continue
        try:
            context.load_verify_locations(cafile=path)
        except ssl.SSLError:
            raise config.error(f"server.tls.{key}", f"no PEM certificate in {path}") from None
    if tls.cert_file is None or tls.key_file is None:
        return
    try:
        # A password callback, so that an encrypted key fails here rather than prompting.
        context.load_cert_chain(tls.cert_file, tls.key_file, password=lambda: b"")
    except ssl.SSLError as exc:
        problem = (
            "not the private key of cert_file's certificate"
            if exc.reason == "KEY_VALUES_MISMATCH"
            else f"no unencrypted PEM private key in {tls.key_file}"
        )
        raise config.error("server.tls.key_file", problem) from None
