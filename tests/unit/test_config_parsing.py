"""Unit tests for loading and validating the configuration (service.config)."""

from __future__ import annotations

import copy
import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from service.auth import KEY_PREFIX
from service.config import (
    ConfigError,
    GatewayConfig,
    RequestDefaults,
    ServerConfig,
    llama_chat_formats,
    load_config,
    parse_config,
)
from service.domain import CacheMode, TruncationMode
from service.hosts import ascii_host
from tests.secret_capture import register_secret

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config" / "gateway.yaml"
README = Path(__file__).resolve().parents[2] / "README.md"
PRESET_KEYS = {
    "holysheep": "HOLYSHEEP_API_KEY",
    "deepseek": "DEEPSEEK_API_KEY",
    "openai": "OPENAI_API_KEY",
}
SECRET = "sk-test-not-a-real-key-0123456789"
REDIS_CACHE = {"backend": "redis", "redis_url": "redis://127.0.0.1:6379/0"}


def upstream(name: str = "up", **fields: Any) -> dict[str, Any]:
    """One valid upstream entry, with `fields` replacing its keys."""
    return {"name": name, "base_url": "https://api.example.test/v1", "models": ["m"], **fields}


def parse(data: Any, **environ: str) -> GatewayConfig:
    """Parse `data` with exactly the environment `environ`."""
    return parse_config(copy.deepcopy(data), source="<test>", environ=environ)


def test_repo_config_has_the_presets() -> None:
    """The shipped config lists each provider preset with its key variable and models."""
    config = load_config(REPO_CONFIG, environ={})
    assert {u.name: u.api_key_env for u in config.upstreams} == PRESET_KEYS
    by_name = {u.name: u for u in config.upstreams}
    assert dict(by_name["holysheep"].models) == {"deepseek-v4": "deepseek-v4"}
    assert dict(by_name["deepseek"].models) == {"deepseek-v4": "deepseek-chat"}
    assert dict(by_name["openai"].models) == {"gpt-4": "gpt-4"}
    assert config.source == str(REPO_CONFIG)


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_a_config_file_in_utf16_or_utf32_after_its_mark_is_read(
    tmp_path: Path, encoding: str
) -> None:
    """A config file in UTF-16 or UTF-32 (either byte order) after its byte order mark,
    as Windows tools save it, reads as its UTF-8 self. Before, it was refused as not
    UTF-8 text."""
    text = REPO_CONFIG.read_text(encoding="utf-8")
    path = tmp_path / "gateway.yaml"
    path.write_bytes(("\ufeff" + text).encode(encoding))
    assert load_config(path, environ={}) == dataclasses.replace(
        load_config(REPO_CONFIG, environ={}), source=str(path)
    )


def test_first_output_timeout_is_unset_unless_given() -> None:
    """`first_output_timeout_s` is off by default (today's bounds alone), and a number
    given is the bound, whole seconds or not."""
    config = parse({"upstreams": [upstream("a"), upstream("b", first_output_timeout_s=15)]})
    assert [u.first_output_timeout_s for u in config.upstreams] == [None, 15.0]
    config = parse({"upstreams": [upstream(first_output_timeout_s=0.25)]})
    assert config.upstreams[0].first_output_timeout_s == 0.25


def test_repo_config_catalog_and_server() -> None:
    """The shipped config has the pricing catalog and a loopback listener."""
    config = load_config(REPO_CONFIG, environ={})
    assert {"deepseek-v4", "gpt-4", "claude-sonnet-4.5", "gemini-2.5-flash"} <= set(config.models)
    assert config.server.listen == "127.0.0.1:50051"
    assert config.server.is_loopback
    assert config.local_model.enabled == "auto"
    assert config.defaults.truncation is TruncationMode.NONE


def test_repo_config_all_disabled_without_keys() -> None:
    """Without any key variable set, no preset upstream is enabled."""
    config = load_config(REPO_CONFIG, environ={})
    assert config.enabled_upstreams == ()
    assert all(u.api_key is None for u in config.upstreams)


@pytest.mark.parametrize(("name", "variable"), sorted(PRESET_KEYS.items()))
def test_repo_config_enables_preset_with_key(name: str, variable: str) -> None:
    """Setting one preset's key variable enables that preset and no other."""
    config = load_config(REPO_CONFIG, environ={variable: SECRET})
    assert [u.name for u in config.enabled_upstreams] == [name]
    assert config.enabled_upstreams[0].api_key == SECRET


def test_repo_config_empty_key_counts_as_unset() -> None:
    """An empty key variable does not enable its preset."""
    config = load_config(REPO_CONFIG, environ={"OPENAI_API_KEY": ""})
    assert config.enabled_upstreams == ()


def test_api_key_never_in_repr() -> None:
    """The upstream key is kept on the config but never appears in its repr or str."""
    config = load_config(REPO_CONFIG, environ=dict.fromkeys(PRESET_KEYS.values(), SECRET))
    assert len(config.enabled_upstreams) == 3
    assert SECRET not in repr(config)
    assert SECRET not in str(config)
    assert all(SECRET not in repr(u) for u in config.upstreams)


def test_key_variables_are_read_from_environ_only() -> None:
    """A key is read from the given environ, not from the file and not from os.environ."""
    config = parse({"upstreams": [upstream(api_key_env="GW_UNIT_TEST_KEY")]})
    assert config.upstreams[0].api_key is None
    config = parse({"upstreams": [upstream(api_key_env="GW_UNIT_TEST_KEY")]}, GW_UNIT_TEST_KEY="k")
    assert config.upstreams[0].api_key == "k"


@pytest.mark.parametrize("variable", [{}, {"api_key_env": "GW_UNIT_TEST_KEY"}])
def test_a_key_in_the_file_is_refused_without_echoing_it(variable: dict[str, str]) -> None:
    """`api_key` in the file is a config error naming the key, never a key that is used.

    Before, an upstream without `api_key_env` sent the file's `api_key` upstream, though
    README and the shipped config say keys are never read from the file.
    """
    with pytest.raises(ConfigError) as caught:
        parse({"upstreams": [upstream(api_key=SECRET, **variable)]})
    assert caught.value.key == "upstreams[0].api_key"
    assert "never read from the file" in caught.value.problem
    assert SECRET not in str(caught.value)


def test_upstream_without_key_variable_is_enabled() -> None:
    """An upstream that names no key variable (a local server) is always enabled."""
    config = parse({"upstreams": [upstream()]})
    assert [u.name for u in config.enabled_upstreams] == ["up"]


def test_empty_config_is_all_defaults() -> None:
    """An empty document gives the defaults of every section."""
    config = parse(None)
    assert config.server == ServerConfig()
    assert config.defaults == RequestDefaults()
    assert config.upstreams == ()


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        pytest.param(["a", "b"], {"a": "a", "b": "b"}, id="list-shorthand"),
        pytest.param({"a": "x", "b": "y"}, {"a": "x", "b": "y"}, id="mapping"),
        pytest.param({"gpt-4": "gpt-4-0613"}, {"gpt-4": "gpt-4-0613"}, id="renamed"),
        pytest.param([1.5], {"1.5": "1.5"}, id="numbers-as-names"),
    ],
)
def test_models_list_shorthand_and_mapping(models: Any, expected: dict[str, str]) -> None:
    """`models: [a]` serves each under its own name; a mapping renames for the upstream."""
    config = parse({"upstreams": [upstream(models=models)]})
    assert dict(config.upstreams[0].models) == expected


@pytest.mark.parametrize(
    ("environ", "check"),
    [
        pytest.param(
            {"LLM_GATEWAY__SERVER__LISTEN": "0.0.0.0:6000"},
            lambda c: c.server.listen == "0.0.0.0:6000" and not c.server.is_loopback,
            id="listen",
        ),
        pytest.param(
            {"LLM_GATEWAY__SERVER__LISTEN": "[::1]:50051"},
            lambda c: c.server.listen == "[::1]:50051" and c.server.is_loopback,
            id="listen-ipv6",
        ),
        pytest.param(
            {"LLM_GATEWAY__SERVER__GRACE_PERIOD_S": "2.5"},
            lambda c: c.server.grace_period_s == 2.5,
            id="float-from-yaml",
        ),
        pytest.param(
            {"llm_gateway__server__workers": "3"},
            lambda c: c.server.workers == 1,
            id="prefix-is-case-sensitive",
        ),
        pytest.param(
            {"LLM_GATEWAY__Server__Max_In_Flight_Calls": "7"},
            lambda c: c.server.max_in_flight_calls == 7,
            id="path-case-insensitive",
        ),
        pytest.param(
            {"LLM_GATEWAY__DEFAULTS__TRUNCATION": "KEEP_RECENT"},
            lambda c: c.defaults.truncation is TruncationMode.KEEP_RECENT,
            id="enum-any-case",
        ),
        pytest.param(
            {"LLM_GATEWAY__AUTH__REDIS_KEY_PREFIX": "team:llm:"},
            lambda c: c.auth.redis_key_prefix == "team:llm:",
            id="a-string-yaml-reads-as-a-mapping",
        ),
        pytest.param(
            {"LLM_GATEWAY__SERVER__LISTEN": "[::1]:50051"},
            lambda c: c.server.listen == "[::1]:50051",
            id="a-string-yaml-cannot-read",
        ),
        pytest.param(
            {"LLM_GATEWAY__LOCAL_MODEL__ENABLED": "never"},
            lambda c: c.local_model.enabled == "never",
            id="new-section",
        ),
    ],
)
def test_env_overrides(environ: dict[str, str], check: Any) -> None:
    """`LLM_GATEWAY__SECTION__KEY` overrides the file's value, parsed as YAML."""
    assert check(parse({"server": {"listen": "127.0.0.1:50051", "workers": 1}}, **environ))


def test_env_override_beats_file() -> None:
    """An override replaces the value in the file and leaves its siblings alone."""
    data = {"server": {"listen": "127.0.0.1:1", "grace_period_s": 4}}
    config = parse(data, LLM_GATEWAY__SERVER__LISTEN="127.0.0.1:2")
    assert (config.server.listen, config.server.grace_period_s) == ("127.0.0.1:2", 4.0)


def test_an_env_override_into_a_list_is_an_error_naming_the_variable() -> None:
    """Upstreams are a list, set in the file: an override reaching into one is refused,
    naming the variable, rather than ignored."""
    data = {"upstreams": [upstream()]}
    with pytest.raises(ConfigError) as caught:
        parse(data, LLM_GATEWAY__UPSTREAMS__0__TIMEOUT_S="5")
    assert caught.value.source == "LLM_GATEWAY__UPSTREAMS__0__TIMEOUT_S"
    assert caught.value.problem == "cannot override inside a non-mapping"


def test_env_override_into_an_empty_section() -> None:
    """A section left empty (every key commented out, so YAML null) can still be overridden.

    Before, `server:` with nothing under it made LLM_GATEWAY__SERVER__LISTEN a config
    error, "cannot override inside a non-mapping", though the empty section itself is valid.
    """
    data = yaml.safe_load("server:\n  # listen: 127.0.0.1:50051\nledger:\n")
    config = parse(
        data,
        LLM_GATEWAY__SERVER__LISTEN="0.0.0.0:50051",
        LLM_GATEWAY__LEDGER__REDIS_URL="redis://127.0.0.1:6379/0",
    )
    assert config.server.listen == "0.0.0.0:50051"
    assert config.ledger.redis_url == "redis://127.0.0.1:6379/0"


def test_env_override_reaches_a_key_spelled_in_capitals() -> None:
    """Variable names are upper case, so a key the file spells with capitals (a tenant
    named `Search`) is found without case.

    Before, the override made a second tenant `search`, and `Search` kept its old limit.
    """
    data = {"tenants": {"Search": {"requests_per_minute": 10}, "ads": {}}}
    config = parse(data, LLM_GATEWAY__TENANTS__SEARCH__REQUESTS_PER_MINUTE="99")
    assert set(config.tenants) == {"Search", "ads"}
    assert config.tenants["Search"].requests_per_minute == 99


def test_env_override_matching_two_keys_is_an_error() -> None:
    """Two keys that differ only in case cannot be told apart by a variable's name."""
    data = {"tenants": {"Search": {}, "SEARCH": {}}}
    with pytest.raises(ConfigError) as caught:
        parse(data, LLM_GATEWAY__TENANTS__SEARCH__REQUESTS_PER_MINUTE="99")
    assert caught.value.key == "tenants.search.requests_per_minute"
    assert "SEARCH, Search" in caught.value.problem


def test_env_override_matching_a_lower_case_key_and_another_is_an_error() -> None:
    """A variable's name matches `search` and `Search` alike: neither is the one meant.

    Before, a key spelled exactly in lower case won without a word, so the override
    silently missed the tenant `Search` it may well have been written for.
    """
    data = {"tenants": {"Search": {}, "search": {}}}
    with pytest.raises(ConfigError) as caught:
        parse(data, LLM_GATEWAY__TENANTS__SEARCH__REQUESTS_PER_MINUTE="99")
    assert caught.value.key == "tenants.search.requests_per_minute"
    assert "Search, search" in caught.value.problem


@pytest.mark.parametrize(
    ("environ", "source", "key", "problem"),
    [
        pytest.param(
            {
                "LLM_GATEWAY__Server__Listen": "127.0.0.1:2",
                "LLM_GATEWAY__SERVER__LISTEN": "127.0.0.1:1",
            },
            "LLM_GATEWAY__SERVER__LISTEN",
            "server.listen",
            "also set by LLM_GATEWAY__Server__Listen; set it in one variable",
            id="one-key-in-two-cases",
        ),
        pytest.param(
            {
                "LLM_GATEWAY__SERVER__LISTEN": "127.0.0.1:1",
                "LLM_GATEWAY__SERVER": "{grace_period_s: 3}",
            },
            "LLM_GATEWAY__SERVER__LISTEN",
            "server.listen",
            "also set by LLM_GATEWAY__SERVER, which sets all of server; set it in one variable",
            id="a-key-and-its-section-whole",
        ),
        pytest.param(
            {
                "LLM_GATEWAY__SERVER": "{grace_period_s: 3}",
                "LLM_GATEWAY__SERVER__LISTEN": "127.0.0.1:1",
            },
            "LLM_GATEWAY__SERVER__LISTEN",
            "server.listen",
            "also set by LLM_GATEWAY__SERVER, which sets all of server; set it in one variable",
            id="a-section-whole-and-its-key",
        ),
        pytest.param(
            {"LLM_GATEWAY__Server": "{tls: {}}", "LLM_GATEWAY__SERVER__TLS__CERT_FILE": "/x"},
            "LLM_GATEWAY__SERVER__TLS__CERT_FILE",
            "server.tls.cert_file",
            "also set by LLM_GATEWAY__Server, which sets all of server; set it in one variable",
            id="a-section-two-levels-up",
        ),
    ],
)
def test_two_variables_setting_one_key_are_refused_naming_both(
    environ: dict[str, str], source: str, key: str, problem: str
) -> None:
    """Two variables that set one key, by name in two cases or one of them its whole
    section, are a config error naming both, whatever the environment's order.

    Before, the one the environment listed last won without a word: a section set whole
    after `LLM_GATEWAY__SERVER__LISTEN` put `listen` back to its default, 127.0.0.1:50051.
    """
    with pytest.raises(ConfigError) as refused:
        parse({}, **environ)
    assert (refused.value.source, refused.value.key) == (source, key)
    assert refused.value.problem == problem


def test_variables_setting_keys_side_by_side_are_taken() -> None:
    """Variables for sibling keys, or for keys that share only a name's start, are not
    one key set twice."""
    config = parse(
        {"tenants": {"a": {}, "ab": {}}},
        LLM_GATEWAY__SERVER__LISTEN="127.0.0.1:1",
        LLM_GATEWAY__SERVER__HEALTH_LISTEN="127.0.0.1:2",
        LLM_GATEWAY__TENANTS__A__REQUESTS_PER_MINUTE="1",
        LLM_GATEWAY__TENANTS__AB__REQUESTS_PER_MINUTE="2",
    )
    assert (config.server.listen, config.server.health_listen) == ("127.0.0.1:1", "127.0.0.1:2")
    assert [t.requests_per_minute for t in config.tenants.values()] == [1, 2]


@pytest.mark.parametrize(
    ("data", "variable", "key"),
    [
        pytest.param(
            {"auth": {"keys": [{"sha256": "a" * 64, "tenant": "TeamA"}]}},
            "LLM_GATEWAY__BUDGETS__TEAMA__USD",
            "budgets.teama",
            id="budget-of-a-tenant-the-file-does-not-list",
        ),
        pytest.param(
            {"budgets": {"TeamA": {"usd": 5}}},
            "LLM_GATEWAY__TENANTS__TEAMA__REQUESTS_PER_MINUTE",
            "tenants.teama",
            id="limits-of-a-tenant-only-budgets-lists",
        ),
        pytest.param({}, "LLM_GATEWAY__BUDGETS__TEAMA", "budgets.teama", id="a-whole-entry"),
        pytest.param(
            {}, "LLM_GATEWAY__MODELS__MYMODEL__CONTEXT_WINDOW", "models.mymodel", id="a-model"
        ),
    ],
)
def test_a_variable_adding_a_named_entry_is_refused(
    data: dict[str, Any], variable: str, key: str
) -> None:
    """A variable may change an entry of `tenants`, `budgets` or `models` the file lists,
    but not add one: its name is upper case by convention and the names are not.

    Before, `LLM_GATEWAY__BUDGETS__TEAMA__USD=10` made a budget for a tenant "teama" while
    keys were issued for `TeamA`, which stayed unbudgeted without a word.
    """
    with pytest.raises(ConfigError) as refused:
        parse(data, **{variable: "{usd: 10}" if variable.endswith("TEAMA") else "10"})
    assert (refused.value.source, refused.value.key) == (variable, key)
    section = key.partition(".")[0]
    assert refused.value.problem.startswith(
        f"the file lists no entry {key.partition('.')[2]!r} (in any case) under {section}; "
    )
    assert f"LLM_GATEWAY__{section.upper()}='{{Name: {{...}}}}'" in refused.value.problem


@pytest.mark.parametrize(
    ("variable", "key"),
    [
        ("LLM_GATEWAY__TENANTS__TEAMA", "tenants.TeamA"),
        ("LLM_GATEWAY__RESILIENCE", "resilience"),
    ],
)
def test_an_empty_variable_for_what_the_file_sets_is_refused(variable: str, key: str) -> None:
    """An empty variable for an entry or a section the file sets (a template's unfilled
    one, most often) is a config error naming it; `{}` resets it on purpose, and an empty
    one for a section the file leaves out, or for one optional value, is no change.

    Before, `LLM_GATEWAY__TENANTS__TEAMA=` took TeamA's rate limits away without a word,
    and `LLM_GATEWAY__RESILIENCE=` every resilience setting of the file."""
    data = {"tenants": {"TeamA": {"requests_per_minute": 5}}, "resilience": {"attempts": 5}}
    with pytest.raises(ConfigError) as refused:
        parse(data, **{variable: ""})
    assert (refused.value.source, refused.value.key) == (variable, key)
    assert "set it to {} to reset it" in refused.value.problem
    reset = parse(data, **{variable: "{}"})
    assert (reset.resilience.attempts, reset.tenants["TeamA"].requests_per_minute) != (5, 5)
    kept = parse(data, LLM_GATEWAY__CACHE="", LLM_GATEWAY__SERVER__WORKERS="")
    assert (kept.resilience.attempts, kept.tenants["TeamA"].requests_per_minute) == (5, 5)


def test_an_empty_variable_for_a_value_the_file_sets_is_refused() -> None:
    """An empty variable for one value the file sets, which may be unset (`workers`,
    `auth.redis_url`), is refused as for a section: it unset it without a word, and an
    unset `auth.redis_url` makes caller keys and tenant limits each process's own."""
    data = {"server": {"workers": 4}, "auth": {"redis_url": "redis://127.0.0.1:6379/0"}}
    for variable, key in (
        ("LLM_GATEWAY__SERVER__WORKERS", "server.workers"),
        ("LLM_GATEWAY__AUTH__REDIS_URL", "auth.redis_url"),
    ):
        with pytest.raises(ConfigError) as refused:
            parse(data, **{variable: ""})
        assert (refused.value.source, refused.value.key) == (variable, key)
        assert refused.value.problem == (
            "is empty, which would unset what the file sets: give it a value, or leave the "
            "variable out to keep the file's"
        )
    assert parse(data, LLM_GATEWAY__SERVER__WORKERS="2").server.workers == 2


def test_a_named_map_set_whole_from_a_variable_keeps_its_names_case() -> None:
    """The way to add a tenant from the environment: its section whole, as YAML, whose
    names keep their case (as in the file, `007` stays `007`)."""
    config = parse(
        {"budgets": {"old": {"usd": 1}}},
        LLM_GATEWAY__BUDGETS="{TeamA: {usd: 10}, 007: {usd: 2}}",
    )
    assert {name: b.usd for name, b in config.budgets.items()} == {"TeamA": 10.0, "007": 2.0}


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("LLM_GATEWAY__SERVER__LISTN", "0.0.0.0:50051", "server.listn"),
        ("LLM_GATEWAY__SERVER__WORKERS", "many", "server.workers"),
        ("LLM_GATEWAY__SERVER__LISTEN", "nowhere", "server"),
    ],
)
def test_a_bad_env_override_is_named_in_the_error(variable: str, value: str, key: str) -> None:
    """An error in a key set from the environment names the variable, not only the file.

    Before, a typo such as LLM_GATEWAY__SERVER__LISTN read "gateway.yaml: server.listn:
    unknown key", sending the reader to a file that has no such key.
    """
    with pytest.raises(ConfigError) as caught:
        parse({}, **{variable: value})
    assert caught.value.key == key
    assert caught.value.problem.endswith(f"(set from the environment: {variable})")
    assert value not in caught.value.problem


UPSTREAM = "{name: a, base_url: 'http://127.0.0.1:1/v1', models: [m]"


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("LLM_GATEWAY__LEDGER", "{redis_url: 'redis://h:1/0', bogus: 1}", "ledger.bogus"),
        ("LLM_GATEWAY__SERVER", "{grace_period_s: soon}", "server.grace_period_s"),
        ("LLM_GATEWAY__UPSTREAMS", f"[{UPSTREAM}, timeout_s: -1}}]", "upstreams[0]"),
        ("LLM_GATEWAY__UPSTREAMS", f"[{UPSTREAM}, api_key_env: 'sk-x'}}]", "upstreams[0]"),
        ("LLM_GATEWAY__UPSTREAMS", f"[{UPSTREAM}, shared_limits: true}}]", "upstreams[0]"),
    ],
)
def test_an_error_under_a_section_a_variable_set_whole_names_it(
    variable: str, value: str, key: str
) -> None:
    """A section set whole from the environment (`LLM_GATEWAY__UPSTREAMS='[...]'`, as the
    README shows for `budgets`) is to blame for an error in any key under it.

    Before, "<test>: upstreams[0]: timeouts must be > 0" named no variable, sending the
    reader to a file that has no upstreams at all.
    """
    with pytest.raises(ConfigError) as caught:
        parse({}, **{variable: value})
    assert caught.value.key.startswith(key)
    assert caught.value.problem.endswith(f"(set from the environment: {variable})")


@pytest.mark.parametrize(
    ("variable", "key", "data", "environ"),
    [
        pytest.param(
            "LLM_GATEWAY__CACHE__REDIS_PASSWORD_ENV",
            "cache.redis_password_env",
            "cache: {backend: redis, redis_url: 'redis://127.0.0.1:6379/0'}\n",
            {"LLM_GATEWAY__CACHE__REDIS_PASSWORD_ENV": "NO_SUCH_PASSWORD_VARIABLE"},
            id="redis-password-variable-unset",
        ),
        pytest.param(
            "LLM_GATEWAY__SERVER__TLS__CERT_FILE",
            "server.tls.cert_file",
            "server: {listen: '127.0.0.1:50051'}\n",
            {
                "LLM_GATEWAY__SERVER__TLS__CERT_FILE": "/nonexistent/server.pem",
                "LLM_GATEWAY__SERVER__TLS__KEY_FILE": "/nonexistent/server.key",
            },
            id="tls-file-missing",
        ),
    ],
)
def test_an_env_override_is_named_in_errors_found_after_parsing(
    tmp_path: Path, variable: str, key: str, data: str, environ: dict[str, str]
) -> None:
    """The checks that run on the parsed config (Redis password variables, TLS files)
    name the variable that set the key too, as the README promises for every error.

    Before, they said only "gateway.yaml: server.tls.cert_file: cannot read ...", sending
    the reader to a file that does not hold the key at all.
    """
    path = tmp_path / "gateway.yaml"
    path.write_text(data)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ)
    assert caught.value.key == key
    assert caught.value.problem.endswith(f"(set from the environment: {variable})")


def test_a_file_error_does_not_blame_other_env_overrides() -> None:
    """A variable that set a key elsewhere is not named in an error about the file."""
    with pytest.raises(ConfigError) as caught:
        parse({"server": {"bogus": 1}}, LLM_GATEWAY__CACHE__ENABLED="false")
    assert "environment" not in caught.value.problem


def test_a_sections_check_names_only_the_variables_of_the_keys_it_is_about() -> None:
    """A section's own check (`grace_period_s must be >= 0`) names the variables of the
    keys it is about, not every variable of the section.

    The image and the Kubernetes manifest always set LLM_GATEWAY__SERVER__LISTEN (and
    WORKERS): before, a bad `grace_period_s` in the file read "(set from the environment:
    LLM_GATEWAY__SERVER__LISTEN, LLM_GATEWAY__SERVER__WORKERS)", sending the reader to
    variables that hold nothing wrong.
    """
    deployed = {"LLM_GATEWAY__SERVER__LISTEN": "0.0.0.0:50051", "LLM_GATEWAY__SERVER__WORKERS": "2"}
    with pytest.raises(ConfigError) as in_file:
        parse({"server": {"grace_period_s": -1}}, **deployed)
    assert in_file.value.problem == "grace_period_s must be >= 0"
    with pytest.raises(ConfigError) as in_variable:
        parse({}, **deployed, LLM_GATEWAY__SERVER__GRACE_PERIOD_S="-1")
    assert in_variable.value.problem == (
        "grace_period_s must be >= 0 "
        "(set from the environment: LLM_GATEWAY__SERVER__GRACE_PERIOD_S)"
    )
    for data, variable in (  # checks of several keys at once name each of them
        ({"tenants": {"search": {}}}, "LLM_GATEWAY__TENANTS__SEARCH__REQUESTS_PER_MINUTE"),
        (
            {"models": {"m": {"input_usd_per_million": 1, "output_usd_per_million": 1}}},
            "LLM_GATEWAY__MODELS__M__OUTPUT_USD_PER_MILLION",
        ),
    ):
        with pytest.raises(ConfigError) as negative:
            parse(data, **{variable: "-1"})
        assert negative.value.problem.endswith(f"(set from the environment: {variable})")
    same = {
        "LLM_GATEWAY__SERVER__LISTEN": "0.0.0.0:1",
        "LLM_GATEWAY__SERVER__HEALTH_LISTEN": "0.0.0.0:1",
    }
    with pytest.raises(ConfigError) as both:  # a check about two keys names both
        parse({}, **same)
    assert both.value.problem.endswith(f"(set from the environment: {', '.join(sorted(same))})")


def test_env_override_on_real_file() -> None:
    """The shipped config's listen address can be overridden from the environment."""
    config = load_config(REPO_CONFIG, environ={"LLM_GATEWAY__SERVER__LISTEN": "0.0.0.0:50051"})
    assert config.server.listen == "0.0.0.0:50051"


@pytest.mark.parametrize(
    ("data", "environ", "key", "problem"),
    [
        ({"server": {"listne": 1}}, {}, "server.listne", "unknown key (did you mean 'listen'?)"),
        ({"servr": {}}, {}, "servr", "unknown key (did you mean 'server'?)"),
        (
            {"ledger": {"redis-url": "redis://h:6379/0"}},
            {},
            "ledger.redis-url",
            "unknown key (did you mean 'redis_url'?)",
        ),
        (
            {"upstreams": [upstream(timeout=30)]},
            {},
            "upstreams[0].timeout",
            "unknown key (did you mean 'timeout_s'?)",
        ),
        (
            {},
            {"LLM_GATEWAY__SERVER__GRACE_PERIOD": "3"},
            "server.grace_period",
            "unknown key (did you mean 'grace_period_s'?) "
            "(set from the environment: LLM_GATEWAY__SERVER__GRACE_PERIOD)",
        ),
        # Nothing near enough, or only a key the file may not set: no guess.
        ({"server": {"bogus": 1}}, {}, "server.bogus", "unknown key"),
        ({"sourc": "x.yaml"}, {}, "sourc", "unknown key"),
        ({"upstreams": [upstream(api_keys="k")]}, {}, "upstreams[0].api_keys", "unknown key"),
    ],
)
def test_an_unknown_key_a_letter_or_two_off_names_the_key_meant(
    data: dict[str, Any], environ: dict[str, str], key: str, problem: str
) -> None:
    """A mistyped key is refused naming the key it is closest to, from its own section.
    Before, `server.listne: unknown key` left the reader to find `listen` in the README."""
    with pytest.raises(ConfigError) as refused:
        parse(data, **environ)
    assert (refused.value.key, refused.value.problem) == (key, problem)


@pytest.mark.parametrize(
    ("data", "environ", "key", "problem"),
    [
        pytest.param({"bogus": 1}, {}, "bogus", "unknown key", id="unknown-top-level"),
        pytest.param(
            {"server": {"bogus": 1}}, {}, "server.bogus", "unknown key", id="unknown-nested"
        ),
        pytest.param({"source": "x.yaml"}, {}, "source", "unknown key", id="source-key"),
        pytest.param(
            {"upstreams": [upstream(bogus=1)]},
            {},
            "upstreams[0].bogus",
            "unknown key",
            id="unknown-in-upstream",
        ),
        pytest.param(
            {"server": {"grace_period_s": "soon"}},
            {},
            "server.grace_period_s",
            "must be a number",
            id="float-as-string",
        ),
        pytest.param(
            {"server": {"grace_period_s": True}},
            {},
            "server.grace_period_s",
            "must be a number",
            id="float-as-bool",
        ),
        pytest.param(
            {"server": {"grace_period_s": float("nan")}},
            {},
            "server.grace_period_s",
            "must be a number",
            id="float-as-nan",
        ),
        pytest.param(
            {"server": {"grace_period_s": float("inf")}},
            {},
            "server.grace_period_s",
            "must be a number",
            id="float-as-infinity",
        ),
        pytest.param(
            {"budgets": {"team a": {"usd": 10}}},
            {},
            "budgets.team a",
            "not a valid tenant name",
            id="budget-tenant-name",
        ),
        pytest.param(
            {"tenants": {"*": {"is_admin": True}}},
            {},
            "tenants.*.is_admin",
            "every tenant without its own entry an admin",
            id="any-tenant-admin",
        ),
        pytest.param(
            {"tenants": {"*": {"requests_per_minute": 10}}},
            {"LLM_GATEWAY__TENANTS__*__IS_ADMIN": "true"},
            "tenants.*.is_admin",
            "(set from the environment: LLM_GATEWAY__TENANTS__*__IS_ADMIN)",
            id="any-tenant-admin-from-the-environment",
        ),
        pytest.param(
            {"budgets": {"*": {"usd": 1e300}}},
            {},
            "budgets.*",
            "usd must be at most 1.0e+15 (as good as no limit)",
            id="budget-past-the-ledgers-figures",
        ),
        pytest.param(
            {
                "models": {
                    "m": {
                        "context_window": 1000,
                        "input_usd_per_million": 1,
                        "output_usd_per_million": 1e300,
                    }
                }
            },
            {},
            "models.m",
            "prices must be at most 1.0e+04 USD per million tokens (a cent a token)",
            id="price-past-the-ledgers-figures",
        ),
        pytest.param(
            {"tenants": {"*": {"tokens_per_minute": 10**400}}},
            {},
            "tenants.*.tokens_per_minute",
            "must be an integer of at most 64 bits",
            id="integer-past-a-float",
        ),
        pytest.param(
            {"resilience": {"attempts": 2**63}},
            {},
            "resilience.attempts",
            "must be an integer of at most 64 bits",
            id="integer-past-64-bits",
        ),
        pytest.param(
            {"ledger": {"retention_days": 2 * 10**11}},
            {},
            "ledger",
            "retention_days must be 1..1000000000",
            id="retention-past-what-redis-expires",
        ),
        pytest.param(
            {"server": {"overload_retry_after_s": float("nan")}},
            {},
            "server.overload_retry_after_s",
            "must be a number",
            id="unchecked-float-as-nan",
        ),
        pytest.param(
            {"server": {"overload_retry_after_s": -1}},
            {},
            "server",
            "overload_retry_after_s must be >= 0",
            id="negative-overload-retry-after",
        ),
        pytest.param(
            # 0 ms to gRPC: every call running past keepalive_time_s was cut UNAVAILABLE.
            {"server": {"keepalive_timeout_s": 0.0004}},
            {},
            "server",
            "keepalive_timeout_s must be >= 0.001",
            id="keepalive-timeout-under-a-millisecond",
        ),
        pytest.param(
            {"server": {"keepalive_time_s": 0.0004}},
            {},
            "server",
            "keepalive_time_s must be >= 0.001",
            id="keepalive-time-under-a-millisecond",
        ),
        pytest.param(
            # 0 ms to gRPC as well.
            {"server": {"max_connection_age_s": 0.0004}},
            {},
            "server",
            "max_connection_age_s must be >= 0.001",
            id="connection-age-under-a-millisecond",
        ),
        pytest.param(
            {"local_model": {"threads": -2}},
            {},
            "local_model",
            "threads must be >= 0",
            id="negative-threads",
        ),
        pytest.param(
            {"local_model": {"restart_backoff_s": 0}},
            {},
            "local_model",
            "restart_backoff_s must be > 0",
            id="zero-restart-backoff",
        ),
        pytest.param(
            {"local_model": {"hang_timeout_s": 0}},
            {},
            "local_model",
            "hang_timeout_s must be > 0",
            id="zero-hang-timeout",
        ),
        pytest.param(
            {"auth": {"rejected_log_interval_s": 0}},
            {},
            "auth",
            "rejected_log_interval_s must be > 0",
            id="zero-rejected-log-interval",
        ),
        pytest.param(
            {"defaults": {"max_labels": -1}},
            {},
            "defaults",
            "max_labels must be 0..256",
            id="negative-max-labels",
        ),
        pytest.param(
            {"defaults": {"max_labels": 257}},
            {},
            "defaults",
            "max_labels must be 0..256",
            id="max-labels-past-what-a-filter-may-name",
        ),
        pytest.param(
            {"summarize": {"default_target_tokens": 31}},
            {},
            "summarize",
            "default_target_tokens must be >= 32",
            id="default-target-under-what-a-caller-may-ask",
        ),
        pytest.param(
            {"defaults": {"max_stop_sequences": -1}},
            {},
            "defaults",
            "max_stop_sequences must be >= 0",
            id="negative-max-stop-sequences",
        ),
        pytest.param(
            {"defaults": {"max_request_bytes": 0}},
            {},
            "defaults",
            "max_request_bytes, max_label_length and max_stop_length must be >= 1",
            id="zero-max-request-bytes",
        ),
        pytest.param(
            {"defaults": {"max_label_length": 0}},
            {},
            "defaults",
            "max_request_bytes, max_label_length and max_stop_length must be >= 1",
            id="zero-max-label-length",
        ),
        pytest.param(
            {"defaults": {"max_stop_length": -5}},
            {},
            "defaults",
            "max_request_bytes, max_label_length and max_stop_length must be >= 1",
            id="negative-max-stop-length",
        ),
        pytest.param(
            {"server": {"max_in_flight_calls": 1.5}},
            {},
            "server.max_in_flight_calls",
            "must be an integer",
            id="int-as-float",
        ),
        pytest.param(
            {"server": {"max_in_flight_calls": True}},
            {},
            "server.max_in_flight_calls",
            "must be an integer",
            id="int-as-bool",
        ),
        pytest.param(
            {"server": {"allow_insecure_public_listen": "yes please"}},
            {},
            "server.allow_insecure_public_listen",
            "must be true or false",
            id="bool-as-string",
        ),
        pytest.param(
            {"server": {"listen": ["a"]}}, {}, "server.listen", "must be a string", id="str-list"
        ),
        pytest.param({"server": 5}, {}, "server", "must be a mapping", id="section-not-mapping"),
        pytest.param({"upstreams": {"a": 1}}, {}, "upstreams", "must be a list", id="not-a-list"),
        pytest.param(
            {"upstreams": [upstream(models="m")]},
            {},
            "upstreams[0].models",
            "must be a mapping",
            id="models-scalar",
        ),
        pytest.param(
            {"upstreams": [upstream(models=[{"deepseek-v4": "deepseek-chat"}])]},
            {},
            "upstreams[0].models[0]",
            "must be a string",
            id="models-list-of-mappings",
        ),
        pytest.param(
            {"upstreams": [upstream(models=["m", None])]},
            {},
            "upstreams[0].models[1]",
            "must be a string",
            id="models-list-with-null",
        ),
        pytest.param(
            {"upstreams": [upstream(base_url="ftp://files.example.test")]},
            {},
            "upstreams[0]",
            "base_url must be an http(s) URL",
            id="url-scheme",
        ),
        pytest.param(
            {"upstreams": [upstream(base_url="api.example.test/v1")]},
            {},
            "upstreams[0]",
            "base_url must be an http(s) URL",
            id="url-no-scheme",
        ),
        pytest.param(
            {"upstreams": [upstream(base_url="https://user:pw@api.example.test/v1")]},
            {},
            "upstreams[0]",
            "base_url must not carry credentials",
            id="url-credentials",
        ),
        pytest.param(
            {"upstreams": [upstream(base_url="https://token@api.example.test/v1")]},
            {},
            "upstreams[0]",
            "base_url must not carry credentials",
            id="url-username-only",
        ),
        pytest.param(
            {"upstreams": [upstream(base_url="https://api.example.test/v1?api-version=1&Key=k")]},
            {},
            "upstreams[0]",
            "base_url must not carry credentials (query parameter key); use api_key_env",
            id="url-key-in-query",
        ),
        pytest.param(
            {"upstreams": [upstream("a"), upstream("b"), upstream("a")]},
            {},
            "upstreams",
            "duplicate upstream name 'a'",
            id="duplicate-names",
        ),
        pytest.param(
            {"upstreams": [upstream("a"), upstream("local")], "local_model": {"enabled": "always"}},
            {},
            "upstreams[1].name",
            "the local model's upstream is 'local'",
            id="the-local-models-name",
        ),
        pytest.param(
            {"upstreams": [upstream("has space")]},
            {},
            "upstreams[0]",
            "name must be letters",
            id="bad-name",
        ),
        pytest.param(
            {"upstreams": [upstream(models=[])]},
            {},
            "upstreams[0]",
            "at least one model",
            id="no-models",
        ),
        pytest.param(
            {"upstreams": [{"name": "a", "base_url": "https://x.test"}]},
            {},
            "upstreams[0]",
            "models",
            id="missing-required",
        ),
        pytest.param(
            {"upstreams": [upstream(timeout_s=0)]},
            {},
            "upstreams[0]",
            "timeouts must be > 0",
            id="zero-timeout",
        ),
        *(
            pytest.param(
                {"upstreams": [upstream(first_output_timeout_s=value)]},
                {},
                key,
                problem,
                id=f"first-output-timeout-{name}",
            )
            for name, value, key, problem in [
                ("zero", 0, "upstreams[0]", "first_output_timeout_s must be > 0 when set"),
                ("negative", -1.5, "upstreams[0]", "first_output_timeout_s must be > 0 when set"),
                ("string", "10s", "upstreams[0].first_output_timeout_s", "must be a number"),
                ("bool", True, "upstreams[0].first_output_timeout_s", "must be a number"),
            ]
        ),
        pytest.param(
            {"upstreams": [upstream(max_connections=10, max_concurrency=11)]},
            {},
            "upstreams[0]",
            "max_connections (10) must be >= max_concurrency (11)",
            id="fewer-connections-than-calls-in-flight",
        ),
        *(
            pytest.param(
                {"upstreams": [upstream(base_url=url)]},
                {},
                "upstreams[0]",
                problem,
                id=name,
            )
            for name, url, problem in [
                ("space-in-host", "http://exa mple.com/v1", "spaces or control characters"),
                ("space-in-path", "https://example.com/v1 x", "spaces or control characters"),
                ("tab-in-path", "https://example.com/v\t1", "spaces or control characters"),
                ("no-host", "http://:8080/v1", "must be an http(s) URL"),
                ("empty-idn-label", "https://a..\u4f8b.test/v1", "must be a valid host name"),
                ("empty-label", "https://api..example.test/v1", "must be a valid host name"),
            ]
        ),
        pytest.param(
            {"defaults": {"truncation": "sometimes"}},
            {},
            "defaults.truncation",
            "must be one of none, keep_recent",
            id="bad-enum",
        ),
        pytest.param(
            {"defaults": {"cache_mode": "forever"}},
            {},
            "defaults.cache_mode",
            "must be one of default, bypass, refresh, no_store",
            id="bad-cache-enum",
        ),
        pytest.param(
            {"local_model": {"enabled": "maybe"}},
            {},
            "local_model.enabled",
            "must be one of auto, always, never",
            id="bad-literal",
        ),
        pytest.param(
            {"server": {"listen": "localhost"}},
            {},
            "server",
            "listen must be HOST:PORT",
            id="listen-without-port",
        ),
        pytest.param(
            {"server": {"listen": "localhost:http"}},
            {},
            "server",
            "listen must be HOST:PORT",
            id="listen-port-not-number",
        ),
        pytest.param(
            {"server": {"listen": "127.0.0.1:70000"}},
            {},
            "server",
            "listen's port must be 0..65535",
            id="listen-port-out-of-range",
        ),
        pytest.param(
            {"server": {"listen": ":50051"}},
            {},
            "server",
            "listen must be HOST:PORT",
            id="listen-without-host",
        ),
        pytest.param(
            {"batch": {"rate_left_to_other_calls": 1}},
            {},
            "batch",
            "rate_left_to_other_calls must be in [0, 1)",
            id="batch-leaves-the-whole-rate",
        ),
        pytest.param(
            {"server": {"health_listen": "50052"}},
            {},
            "server",
            "health_listen must be HOST:PORT",
            id="health-listen-without-host",
        ),
        pytest.param(
            {"server": {"health_listen": "0.0.0.0:65536"}},
            {},
            "server",
            "health_listen's port must be 0..65535",
            id="health-listen-port-out-of-range",
        ),
        pytest.param(
            {"server": {"listen": "0.0.0.0:50051", "health_listen": "0.0.0.0:50051"}},
            {},
            "server",
            "health_listen 0.0.0.0:50051 and listen 0.0.0.0:50051 would listen on the same port",
            id="health-listen-on-the-gateways-port",
        ),
        pytest.param(
            {
                "models": {
                    "m": {
                        "context_window": 100,
                        "input_usd_per_million": 1,
                        "output_usd_per_million": 1,
                    }
                }
            },
            {},
            "models.m",
            "context_window must be >= 256",
            id="tiny-context-window",
        ),
        pytest.param(
            {
                "models": {
                    "m": {
                        "context_window": 1000,
                        "input_usd_per_million": -1,
                        "output_usd_per_million": 1,
                    }
                }
            },
            {},
            "models.m",
            "prices must be >= 0",
            id="negative-price",
        ),
        pytest.param(
            {}, {"LLM_GATEWAY__SERVER__LISTEN": "nowhere"}, "server", "HOST:PORT", id="env-listen"
        ),
        pytest.param(
            {},
            {"LLM_GATEWAY__SERVER__WORKERS": "many"},
            "server.workers",
            "must be an integer",
            id="env-wrong-type",
        ),
        pytest.param(
            {"server": "x"},
            {"LLM_GATEWAY__SERVER__LISTEN": "127.0.0.1:1"},
            "server.listen",
            "non-mapping",
            id="env-into-scalar",
        ),
        pytest.param({}, {"LLM_GATEWAY__": "x"}, "", "names no key", id="env-bare-prefix"),
        pytest.param([1, 2], {}, "", "must be a YAML mapping", id="top-level-list"),
        pytest.param(
            {"ledger": {"redis_url": "localhost:6379"}},
            {},
            "ledger",
            "redis_url must be redis://, rediss:// or unix://",
            id="ledger-redis-url-without-scheme",
        ),
        pytest.param(
            {"cache": {"redis_url": "redis://127.0.0.1:6379/0"}},
            {},
            "cache",
            "backend: redis",
            id="cache-redis-url-with-the-memory-backend",
        ),
        pytest.param(
            # Bracketed as in `server.listen`: refused at start as "no name resolves".
            {"telemetry": {"prometheus_host": "[::1]"}},
            {},
            "telemetry",
            "prometheus_host must be a host without brackets: write ::1",
            id="bracketed-prometheus-host",
        ),
    ],
)
def test_config_errors_name_the_key(
    data: Any, environ: dict[str, str], key: str, problem: str
) -> None:
    """Each invalid config raises `ConfigError` naming the key and what is wrong."""
    with pytest.raises(ConfigError) as caught:
        parse(data, **environ)
    assert caught.value.key == key
    assert problem in caught.value.problem
    if key:
        assert key in str(caught.value)


@pytest.mark.parametrize(
    ("listen", "health_listen"),
    [
        ("127.0.0.1:50051", "localhost:50051"),
        ("127.0.0.1:50051", "LOCALHOST.:50051"),
        ("[::1]:50051", "localhost:50051"),
        ("127.0.0.1:50051", "0.0.0.0:50051"),
        ("[::1]:50051", "0.0.0.0:50051"),
        ("10.1.2.3:50051", "[::]:50051"),
        ("gateway.internal:50051", "[::]:50051"),
        ("[::ffff:127.0.0.1]:50051", "127.0.0.1:50051"),
        ("gateway.internal:50051", "Gateway.Internal.:50051"),
    ],
)
def test_health_listen_sharing_the_gateways_address_is_refused_naming_both(
    listen: str, health_listen: str
) -> None:
    """Two spellings that grpc binds at a shared address and port are refused at load,
    naming both keys, whichever of the two holds which.

    Before, only the same text was refused: `localhost:P` beside `127.0.0.1:P` passed
    `check`, and the start failed "the address is taken".
    """
    for first, second in ((listen, health_listen), (health_listen, listen)):
        with pytest.raises(ConfigError) as caught:
            parse({"server": {"listen": first, "health_listen": second}})
        assert caught.value.key == "server"
        assert f"health_listen {second} and listen {first} would listen" in caught.value.problem


@pytest.mark.parametrize(
    ("listen", "health_listen"),
    [
        ("127.0.0.1:50051", "127.0.0.2:50051"),
        ("127.0.0.1:50051", "[::1]:50051"),
        ("127.0.0.1:50051", "localhost:50052"),
        ("0.0.0.0:50051", "0.0.0.0:50052"),
        ("0.0.0.0:0", "0.0.0.0:0"),
        ("127.0.0.1:0", "localhost:0"),
    ],
)
def test_health_listen_on_its_own_address_or_port_is_taken(listen: str, health_listen: str) -> None:
    """Distinct addresses on one port, distinct ports, and port 0 (a free port chosen at
    each bind) all load."""
    config = parse({"server": {"listen": listen, "health_listen": health_listen}})
    assert config.server.health_listen == health_listen


def test_config_error_names_the_source() -> None:
    """A config error's message starts with the file it came from."""
    with pytest.raises(ConfigError, match=r"^my\.yaml: server\.bogus: unknown key$"):
        parse_config({"server": {"bogus": 1}}, source="my.yaml", environ={})


def test_config_error_does_not_echo_credentials() -> None:
    """A URL with credentials is refused without repeating the password."""
    with pytest.raises(ConfigError) as caught:
        parse({"upstreams": [upstream(base_url="https://user:hunter2@api.example.test")]})
    assert "hunter2" not in str(caught.value)


def test_a_caller_key_written_where_a_field_name_goes_is_not_echoed() -> None:
    """A raw key pasted as a mapping key (`keys: [{llmgw_...: team}]`) is an unknown key;
    the error names where it is without repeating it. Long unknown names are cut too."""
    secret = KEY_PREFIX + "s3cr3t" * 7  # what `keys create` prints
    with pytest.raises(ConfigError) as caught:
        parse({"auth": {"keys": [{secret: "team-a"}]}})
    assert "s3cr3t" not in str(caught.value)
    assert caught.value.key == f"auth.keys[0].{KEY_PREFIX}…"
    with pytest.raises(ConfigError) as caught:
        parse({"server": {"x" * 100: 1}})
    assert caught.value.key == "server." + "x" * 32 + "…"


PASTED_SECRET = "sk-proj-PASTEDINSTEADOFITSVARIABLE-0123456789"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        pytest.param(
            {"upstreams": [upstream(api_key_env=PASTED_SECRET)]}, "upstreams[0]", id="api_key_env"
        ),
        pytest.param(
            {"cache": {"backend": "redis", "redis_url": "redis://127.0.0.1:6379/0",
                       "redis_password_env": PASTED_SECRET}},
            "cache.redis_password_env",
            id="cache",
        ),
        pytest.param(
            {"auth": {"redis_url": "redis://127.0.0.1:6379/0",
                      "redis_password_env": PASTED_SECRET}},
            "auth.redis_password_env",
            id="auth",
        ),
        pytest.param(
            {"ledger": {"redis_url": "redis://127.0.0.1:6379/0",
                        "redis_password_env": PASTED_SECRET}},
            "ledger.redis_password_env",
            id="ledger",
        ),
    ],
)  # fmt: skip
def test_a_secret_written_where_its_variable_name_goes_is_refused_unechoed(
    data: dict[str, Any], key: str
) -> None:
    """A key or password pasted as `api_key_env` / `redis_password_env` (rather than the
    name of the variable holding it) is a config error that does not repeat it.

    Before, it was taken as a variable name: the upstream started disabled and the log
    line `upstream.disabled` and `llm-gateway check` printed the key as `missing_env`,
    or the config error for an unset password variable printed the password.
    """
    with pytest.raises(ConfigError) as caught:
        parse(data)
    assert caught.value.key == key
    assert "must name an environment variable" in str(caught.value)
    assert "PASTED" not in str(caught.value)


# A key that is a valid variable name all the same (Stripe's `sk_live_...`, GitHub's
# `ghp_...`, AWS's `AKIA...`): taken as a name, logs, errors and `check` printed it.
KEY_LIKE_NAME = register_secret("sk_live_51HPASTEDinsteadOFitsVARIABLE0123")


@pytest.mark.parametrize(
    ("data", "environ", "key"),
    [
        pytest.param(
            {"upstreams": [upstream(api_key_env=KEY_LIKE_NAME)]}, {}, "upstreams[0]",
            id="api_key_env",
        ),
        pytest.param(
            {"upstreams": [upstream(proxy_authorization_env=KEY_LIKE_NAME)]}, {},
            "upstreams[0]", id="proxy_authorization_env",
        ),
        pytest.param(
            {"cache": {**REDIS_CACHE, "redis_password_env": KEY_LIKE_NAME}}, {},
            "cache.redis_password_env", id="redis_password_env",
        ),
        pytest.param(
            {"cache": {"backend": "memory", "redis_password_env": KEY_LIKE_NAME}}, {},
            "cache.redis_password_env", id="redis_password_env-of-a-cache-without-redis",
        ),
        pytest.param(
            {},
            {"LLM_GATEWAY__LEDGER": "{redis_url: 'redis://127.0.0.1:6379/0', "
                                    f"redis_password_env: {KEY_LIKE_NAME}}}"},
            "ledger.redis_password_env", id="section-set-whole-from-the-environment",
        ),
        pytest.param(
            {},
            {"LLM_GATEWAY__UPSTREAMS": "[{name: up, base_url: 'https://api.example.test/v1', "
                                       f"models: [m], api_key_env: {KEY_LIKE_NAME}}}]"},
            "upstreams[0]", id="upstreams-set-whole-from-the-environment",
        ),
    ],
)  # fmt: skip
def test_a_key_that_is_a_valid_variable_name_is_refused_unechoed(
    data: dict[str, Any], environ: dict[str, str], key: str
) -> None:
    """A key pasted where a variable's name goes is refused without a word of it even
    when it is a valid name (`sk_live_...`): 16 or more letters and digits in a row, mixed,
    are a key's, not a name's words. Names of words stay names, digits among them.

    Before, such a key was taken as the name: `check` printed it as `not set ($...)`, the
    log line `upstream.disabled` as `missing_env`, an error for an unset password variable
    in its text, and a cache without Redis kept it unchecked.
    """
    with pytest.raises(ConfigError) as caught:
        parse(data, **environ)
    assert caught.value.key == key
    assert "must name an environment variable" in str(caught.value)
    assert "PASTED" not in str(caught.value)
    names = ["HOLYSHEEP_API_KEY", "AZURE_OPENAI_KEY_EASTUS2", "OPENAI_API_KEY_20240101"]
    names += ["THEPROVIDERSKEYFORPRODUCTION", "_1234567890123456789"]
    for name in names:
        assert parse({"upstreams": [upstream(api_key_env=name)]}).upstreams[0].api_key_env


def test_an_unknown_name_that_looks_like_a_key_is_not_shown() -> None:
    """A key pasted where a field's, a Redis URL option's or a tenant's name goes is not
    shown by the error naming it. Before, up to 32 of its characters were, or all."""
    for data in (
        {"server": {KEY_LIKE_NAME: 1}},
        {"cache": {"backend": "redis", "redis_url": f"redis://127.0.0.1:6379/0?{KEY_LIKE_NAME}"}},
        {"tenants": {f"Bearer {KEY_LIKE_NAME}": {}}},
    ):
        with pytest.raises(ConfigError) as caught:
            parse(data)
        assert "PASTED" not in str(caught.value)


REDIS_SECTIONS = {
    "cache": {"backend": "redis", "redis_url": "redis://127.0.0.1:6379/0"},
    "auth": {"redis_url": "redis://127.0.0.1:6379/0"},
    "ledger": {"redis_url": "redis://127.0.0.1:6379/0"},
}


@pytest.mark.parametrize("section", sorted(REDIS_SECTIONS))
@pytest.mark.parametrize(("environ", "state"), [({}, "not set"), ({"GW_PW": ""}, "empty")])
def test_a_named_redis_password_variable_must_hold_a_password(
    section: str, environ: dict[str, str], state: str
) -> None:
    """Naming `redis_password_env` asks for a password: unset or empty is a config error."""
    data = {section: {**REDIS_SECTIONS[section], "redis_password_env": "GW_PW"}}
    with pytest.raises(ConfigError) as caught:
        parse(data, **environ)
    assert caught.value.key == f"{section}.redis_password_env"
    assert f"the environment variable GW_PW is {state}" in caught.value.problem


@pytest.mark.parametrize("section", sorted(REDIS_SECTIONS))
def test_a_redis_password_variable_that_is_set_or_not_named_is_accepted(section: str) -> None:
    """A variable that holds a password is accepted, and so is naming none (no password)."""
    parse({section: {**REDIS_SECTIONS[section], "redis_password_env": "GW_PW"}}, GW_PW=SECRET)
    parse({section: REDIS_SECTIONS[section]})


def test_a_redis_password_variable_is_only_required_where_redis_is_used() -> None:
    """The memory cache and auth without `redis_url` connect to no Redis: nothing to check."""
    parse({"cache": {"backend": "memory", "redis_password_env": "GW_PW"}})
    parse({"auth": {"redis_password_env": "GW_PW"}})
    parse({"ledger": {"redis_password_env": "GW_PW"}})


def test_a_disabled_cache_needs_no_redis_password() -> None:
    """A cache turned off connects to no Redis, so its named password variable may be
    unset. Before, `cache.enabled: false` beside `backend: redis` still wanted it."""
    cache = {
        "backend": "redis",
        "redis_url": "redis://127.0.0.1:6379/0",
        "redis_password_env": "GW_NO_SUCH_PASSWORD",
    }
    assert parse({"cache": {**cache, "enabled": False}}).cache.redis_password_env
    with pytest.raises(ConfigError, match="GW_NO_SUCH_PASSWORD is not set"):
        parse({"cache": cache})


def test_tls_paths_expand_the_home_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    """`~` in `server.tls` paths is the user's home, as in `auth.keys_file` and
    `local_model.model_path`. Before, the gateway looked for a directory named `~`."""
    monkeypatch.setenv("HOME", "/home/operator")
    tls = {"cert_file": "~/pki/server.pem", "key_file": "~/pki/server.key"}
    config = parse({"server": {"tls": {**tls, "client_ca_file": "~/pki/ca.pem"}}})
    assert (config.server.tls.cert_file, config.server.tls.key_file) == (
        "/home/operator/pki/server.pem",
        "/home/operator/pki/server.key",
    )
    assert config.server.tls.client_ca_file == "/home/operator/pki/ca.pem"


def test_load_config_missing_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming the path."""
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="cannot read") as caught:
        load_config(path, environ={})
    assert caught.value.source == str(path)


def test_load_config_invalid_yaml(tmp_path: Path) -> None:
    """A file that is not YAML is a ConfigError, not a parser traceback."""
    path = tmp_path / "broken.yaml"
    path.write_text("server: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("text", "duplicate", "line"),
    [
        ("server: {listen: '127.0.0.1:1'}\ncache: {}\nserver: {grace_period_s: 3}\n", "server", 3),
        (
            "upstreams:\n  - name: a\n    base_url: http://127.0.0.1:1\n    models: [m]\n"
            "    timeout_s: 5\n    timeout_s: 600\n",
            "timeout_s",
            6,
        ),
        ("tenants:\n  search: {requests_per_minute: 10}\n  search: {}\n", "search", 3),
    ],
)
def test_a_key_given_twice_is_a_config_error(
    tmp_path: Path, text: str, duplicate: str, line: int
) -> None:
    """A repeated key is refused with its line, not resolved by keeping the last one.

    Before, a second `server:` section silently replaced the first (PyYAML keeps the last).
    """
    path = tmp_path / "gw.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert f"duplicate key '{duplicate}' at line {line}," in caught.value.problem


def test_yaml_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    """`<<: *anchor` followed by a key it also sets is an override, not a duplicate."""
    path = tmp_path / "gw.yaml"
    path.write_text(
        "tenants:\n  a: &base {requests_per_minute: 10, tokens_per_minute: 5}\n"
        "  b: {<<: *base, requests_per_minute: 20}\n",
        encoding="utf-8",
    )
    config = load_config(path, environ={})
    assert (config.tenants["b"].requests_per_minute, config.tenants["b"].tokens_per_minute) == (
        20,
        5,
    )


@pytest.mark.parametrize(
    "text",
    [
        'ledger:\n  redis_url: "redis://:hunter2@redis:6379/0\n',
        "ledger: {redis_url: redis://:hunter2@redis:6379/0\n",
        "ledger:\n\tredis_url: redis://:hunter2@redis:6379/0\n",
    ],
)
def test_a_yaml_syntax_error_does_not_quote_the_line(tmp_path: Path, text: str) -> None:
    """A YAML error gives the line and column but not the line's text, which may hold a
    password (`ledger.redis_url` may carry one).

    Before, PyYAML's message, with the offending line quoted, was the config error.
    """
    path = tmp_path / "gw.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert "not valid YAML" in caught.value.problem
    assert "line " in caught.value.problem
    assert "hunter2" not in str(caught.value)


def test_load_config_round_trip(tmp_path: Path) -> None:
    """A small YAML file loads into the typed, frozen config it describes."""
    path = tmp_path / "gw.yaml"
    path.write_text(
        "server:\n  listen: 127.0.0.1:0\n"
        "upstreams:\n  - name: local\n    base_url: http://127.0.0.1:8080/v1\n"
        "    models: {small: small-q4}\n    timeout_s: 5\n"
        "models:\n  small:\n    context_window: 2048\n    input_usd_per_million: 0\n"
        "    output_usd_per_million: 0\n    cached_input_usd_per_million: 0\n"
        "defaults:\n  cache_mode: bypass\n  max_messages: 10\n",
        encoding="utf-8",
    )
    config = load_config(path, environ={})
    only = config.upstreams[0]
    assert (only.name, only.timeout_s, dict(only.models)) == ("local", 5.0, {"small": "small-q4"})
    assert config.models["small"].cached_input_usd_per_million == 0.0
    assert config.defaults.cache_mode is CacheMode.BYPASS
    assert config.defaults.max_messages == 10
    with pytest.raises(AttributeError):
        config.server.listen = "0.0.0.0:1"  # type: ignore[misc]


def test_unknown_keys_of_mixed_types_are_a_config_error() -> None:
    """YAML 1.1 reads `on:` as the key `true`; beside a typo it must not crash the check."""
    with pytest.raises(ConfigError) as caught:
        parse_config(yaml.safe_load("on: 1\nservr: {}\n"), source="my.yaml", environ={})
    assert "unknown key" in caught.value.problem


@pytest.mark.parametrize(
    ("listen", "is_loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.10:50051", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("LocalHost:50051", True),
        ("localhost.:50051", True),
        ("[::ffff:127.0.0.1]:50051", True),
        ("[::ffff:10.0.0.5]:50051", False),
        ("0.0.0.0:50051", False),
        ("10.0.0.5:50051", False),
        ("[::]:50051", False),
        # A DNS name that merely starts like a loopback address may resolve anywhere.
        ("127.corp.example:50051", False),
        ("127.0.0.1.nip.io:50051", False),
    ],
)
def test_only_loopback_addresses_count_as_loopback(listen: str, is_loopback: bool) -> None:
    """Auth may be off only on loopback: a host name is never taken for one by its prefix."""
    config = parse({"server": {"listen": listen}})
    assert config.server.is_loopback is is_loopback


def config_keys(cls: type[Any], prefix: str = "") -> list[str]:
    """Every key a config file may set, as `section.key` paths."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if (
            not f.init
            or f.name in ("source", "overrides", "flags")
            or "from_environment" in f.metadata
            or "set_by_gateway" in f.metadata
        ):
            continue
        args = typing.get_args(hints[f.name])
        inner = next((a for a in (hints[f.name], *args) if dataclasses.is_dataclass(a)), None)
        if isinstance(inner, type):
            keys += config_keys(inner, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


@pytest.mark.parametrize("key", config_keys(GatewayConfig))
def test_readme_documents_every_config_key(key: str) -> None:
    """Each key the config accepts is named in README, as `key` or as `key:` in an example.

    Before, server.allow_insecure_public_listen, local_model.chat_format and
    startup_timeout_s, defaults.cache_mode, summarize.retry_backoff_s,
    telemetry.service_name and auth.redis_key_prefix appeared nowhere in README.
    """
    leaf = key.rpartition(".")[2]
    assert re.search(rf"`([\w.\[\]]*\.)?{leaf}[`:]|(^\s*|[{{,] *){leaf}:", README.read_text(), re.M)


def test_readme_yaml_examples_parse() -> None:
    """Every YAML example in README is a valid config, but those that say first which other
    program's file they are (`# prometheus.yml, ...`, `# kustomization.yaml of ...`)."""
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    others = ("# prometheus.yml", "# kustomization.yaml")
    configs = [b for b in blocks if not b.startswith(others)]
    exempt = [b for b in blocks if b.startswith(others)]
    assert {o for o in others for b in exempt if b.startswith(o)} == set(others)
    assert all(yaml.safe_load(b) for b in exempt)  # YAML still, if not the gateway's
    assert len(configs) >= 5
    for block in configs:
        parse(yaml.safe_load(block), REDIS_PASSWORD=SECRET)


def test_the_local_model_is_in_the_catalog_with_the_window_llama_cpp_runs_with() -> None:
    """A config that serves the local model without listing it in `models` fits its
    prompts to the n_ctx the gateway starts llama.cpp with, not the default window of an
    unknown model (8192, which llama.cpp would refuse); the file's own entry keeps its
    prices and a window up to that n_ctx."""
    served = parse({"local_model": {"context_window": 4096}})
    entry = served.models[served.local_model.model]
    assert (entry.context_window, entry.input_usd_per_million) == (4096, 0.0)
    listed = parse(
        {
            "local_model": {"context_window": 4096},
            "models": {
                "gemma-3-270m": {
                    "context_window": 1024,
                    "input_usd_per_million": 0.0,
                    "output_usd_per_million": 0.0,
                }
            },
        }
    )
    assert listed.models["gemma-3-270m"].context_window == 1024
    not_served = parse({"upstreams": [upstream()]})
    assert not_served.models == {}


def test_a_catalog_window_over_the_local_models_n_ctx_is_held_to_it() -> None:
    """A `models` entry for the local model with a larger window than llama.cpp runs with
    is fitted to n_ctx (llama.cpp refuses any prompt past it), its prices kept; with the
    local model off (a provider key set, `enabled: auto`) the entry is as written."""
    models = {
        "gemma-3-270m": {
            "context_window": 4096,
            "input_usd_per_million": 1.0,
            "output_usd_per_million": 2.0,
        }
    }
    served = parse({"local_model": {"context_window": 512}, "models": models})
    entry = served.models["gemma-3-270m"]
    assert (entry.context_window, entry.input_usd_per_million) == (512, 1.0)
    with_key = {"local_model": {"context_window": 512}, "models": models, "upstreams": [upstream()]}
    not_served = parse(with_key)
    assert not_served.models["gemma-3-270m"].context_window == 4096


@pytest.mark.parametrize(
    ("section", "url"),
    [
        ("cache", "redis://127.0.0.1:63a79/0"),
        ("cache", "redis://127.0.0.1:6379/x"),
        ("ledger", "redis://127.0.0.1:99999/0"),
        ("ledger", "redis://127.0.0.1:6379/zero"),
        ("auth", "rediss://redis.internal:port/0"),
        # The database as the `db` query parameter, which redis-py reads too (a socket's
        # only way to name one): from_url raises ValueError on it, as on a bad path.
        ("cache", "redis://127.0.0.1:6379/0?db=one"),
        ("ledger", "unix:///run/redis/redis.sock?db=two"),
        ("auth", "redis://127.0.0.1:6379?db=1x"),
    ],
)
def test_a_redis_url_whose_port_or_database_is_not_a_number_is_a_config_error(
    section: str, url: str
) -> None:
    """The Redis clients read the port and database only when the server starts, and fail
    it with a traceback (exit 1) or take database 0 for a mistyped one: a config error
    naming the key (exit 2) instead, as the README promises for a config that is wrong."""
    assert "redis_url" in refused_redis_url(section, url).problem


def refused_redis_url(section: str, url: str) -> ConfigError:
    """The config error for `url` as `section`'s `redis_url` (the cache's with the Redis
    backend), checked to name the section."""
    data: dict[str, Any] = {section: {"redis_url": url}}
    if section == "cache":
        data["cache"]["backend"] = "redis"
    with pytest.raises(ConfigError) as caught:
        parse(data)
    assert caught.value.key == section
    return caught.value


@pytest.mark.parametrize(
    ("section", "url", "unknown"),
    [
        ("cache", "redis://127.0.0.1:6379/0?sockettimeout=2", "sockettimeout"),
        ("ledger", "redis://127.0.0.1:6379/0?ssl_ca_certs=/etc/ca.pem", "ssl_ca_certs"),
        ("auth", "unix:///run/redis.sock?db=1&socket_keepalive=true", "socket_keepalive"),
    ],
)
def test_a_redis_url_option_its_connection_does_not_take_is_a_config_error(
    section: str, url: str, unknown: str
) -> None:
    """redis-py passes a URL's query options to the connection it makes at start: one it
    does not know (a typo, a TLS option on a plain redis:// URL, a TCP one on a socket)
    failed the start with a TypeError traceback; a config error naming it instead."""
    assert unknown in refused_redis_url(section, url).problem


def test_a_redis_url_without_a_port_or_database_or_over_a_socket_is_fine(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("a CA bundle")
    config = parse(
        {
            "cache": {"backend": "redis", "redis_url": "redis://redis?socket_timeout="},
            "ledger": {"redis_url": "unix:///run/redis/redis.sock?db=2"},
            "auth": {"redis_url": f"rediss://redis:6380/15?ssl_ca_certs={ca}&socket_timeout=2"},
        }
    )
    assert config.cache.redis_url == "redis://redis?socket_timeout="


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://redis/0?socket_timeout=abc", "socket_timeout option has a value it does not"),
        ("redis://redis/0?max_connections=1.5", "max_connections option has a value it does not"),
        ("rediss://redis/0?ssl_certfile=/absent/client.pem", "ssl_certfile names a file that"),
    ],
)
def test_a_redis_url_option_value_the_client_cannot_use_is_a_config_error(
    url: str, problem: str
) -> None:
    """An option value redis-py cannot read, or a TLS file that cannot be read, failed the
    start with a traceback: a config error naming the option (never its value) instead."""
    refused = refused_redis_url("ledger", url)
    assert problem in refused.problem
    assert "abc" not in refused.problem


@pytest.mark.parametrize(
    "base_url", ["http://127.0.0.1:9x9/v1", "https://api.example.test:99999/v1"]
)
def test_a_base_url_whose_port_is_not_a_number_is_a_config_error(base_url: str) -> None:
    """The HTTP pool reads the port only at start, and failed it with a traceback (exit 1);
    the README's example config error is this key's."""
    with pytest.raises(ConfigError) as caught:
        parse({"upstreams": [upstream(base_url=base_url)]})
    assert caught.value.key == "upstreams[0]"
    assert "base_url" in caught.value.problem


@pytest.mark.parametrize(
    "host",
    [
        "fa\u00df.example",
        "FA\u1e9e.example",
        "\u03bb\u03bf\u03b3\u03bf\u03c2.example",
        "a\u200db.example",
    ],
)
def test_a_host_idna_2003_and_2008_write_as_two_hosts_is_a_config_error(host: str) -> None:
    """`faß.example` went on the wire as fass.example (Python's IDNA 2003 codec), where
    curl and browsers (IDNA 2008) reach xn--fa-hia.example: the key went to another host.
    The proxy's host (and the upstream's matched in `NO_PROXY`) are refused alike."""
    with pytest.raises(ConfigError) as caught:
        parse({"upstreams": [upstream(base_url=f"https://{host}/v1")]})
    assert "write its xn-- form" in caught.value.problem
    with pytest.raises(ConfigError, match="not a valid host name"):
        parse({"upstreams": [upstream(proxy_url=f"http://{host}:3128")]})
    assert ascii_host("xn--fa-hia.example") == "xn--fa-hia.example"


def test_an_unknown_local_chat_format_is_refused_naming_the_valid_ones() -> None:
    """A misspelt `local_model.chat_format` is a config error listing llama.cpp's formats:
    its server would start with it and answer every completion with HTTP 500."""
    with pytest.raises(ConfigError) as refused:
        parse({"local_model": {"chat_format": "gemmma"}})
    assert refused.value.key == "local_model.chat_format"
    assert "'gemmma' is not a chat format" in refused.value.problem
    assert "gemma, " in refused.value.problem
    assert "chatml" in refused.value.problem


@pytest.mark.parametrize("chat_format", ["gemma", "chatml", "llama-3", "chat_template.default"])
def test_a_known_local_chat_format_is_taken(chat_format: str) -> None:
    """A registered format, or a template the model file carries, is taken as written."""
    config = parse({"local_model": {"chat_format": chat_format}})
    assert config.local_model.chat_format == chat_format


def test_the_local_chat_format_is_unchecked_when_the_local_model_does_not_run() -> None:
    """With another upstream enabled (`enabled: auto`) the local model never starts, and
    its format is not read: reading llama.cpp's formats loads its library."""
    config = parse({"upstreams": [upstream()], "local_model": {"chat_format": "gemmma"}})
    assert not config.wants_local_model
    assert config.local_model.chat_format == "gemmma"


def test_the_local_chat_format_is_unchecked_without_llama_cpp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the `local` extra the format cannot be checked, and the gateway still starts."""
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_chat_format", None)
    llama_chat_formats.cache_clear()
    try:
        config = parse({"local_model": {"chat_format": "gemmma"}})
    finally:
        llama_chat_formats.cache_clear()
    assert config.local_model.chat_format == "gemmma"


@pytest.mark.parametrize("key", [f"{SECRET}\n", f"{SECRET}\r\n", f"sk-\n{SECRET}"])
def test_a_key_with_a_line_break_is_refused_without_repeating_it(key: str) -> None:
    """A provider key holding a line break (a Secret file's trailing newline) is a config
    error naming its variable. Before, `check` crashed with a traceback and every call of
    a gateway that started failed INTERNAL: no header can carry it."""
    with pytest.raises(ConfigError) as refused:
        parse({"upstreams": [upstream(api_key_env="GW_UNIT_TEST_KEY")]}, GW_UNIT_TEST_KEY=key)
    assert refused.value.key == "upstreams[0].api_key_env"
    assert "GW_UNIT_TEST_KEY holds a line break" in refused.value.problem
    assert SECRET not in str(refused.value)


@pytest.mark.parametrize("key", [f"{SECRET}\x7f", f"\x1b[0m{SECRET}", f"sk-\x01{SECRET}"])
def test_a_key_with_a_control_character_is_refused_without_repeating_it(key: str) -> None:
    """A provider key holding a control character no header may carry is a config error
    naming its variable. Before, it was sent as it was: the upstream answered 400 to every
    call, which callers got as INVALID_ARGUMENT, their request refused."""
    with pytest.raises(ConfigError) as refused:
        parse({"upstreams": [upstream(api_key_env="GW_UNIT_TEST_KEY")]}, GW_UNIT_TEST_KEY=key)
    assert refused.value.key == "upstreams[0].api_key_env"
    assert "GW_UNIT_TEST_KEY holds a control character" in refused.value.problem
    assert SECRET not in str(refused.value)


def test_a_key_with_a_tab_or_non_ascii_letters_is_taken() -> None:
    """A tab and letters past ASCII go in a header as they are; the upstream judges them."""
    config = parse(
        {"upstreams": [upstream(api_key_env="GW_UNIT_TEST_KEY")]}, GW_UNIT_TEST_KEY="sk-\tkey-é"
    )
    assert config.upstreams[0].api_key == "sk-\tkey-é"


@pytest.mark.parametrize("model_path", ["", ".", "/", "./"])
def test_a_local_model_path_that_names_no_file_is_refused(model_path: str) -> None:
    """A `local_model.model_path` naming no file is a config error. Before, the start
    assembling the model ended with a ValueError traceback (`'.' has an empty name`)."""
    with pytest.raises(ConfigError) as refused:
        parse({"local_model": {"model_path": model_path}})
    assert refused.value.key == "local_model"
    assert "model_path must name a file" in refused.value.problem


@pytest.mark.parametrize(
    ("data", "key", "missing"),
    [
        ({"upstreams": [{"name": "a"}]}, "upstreams[0]", "base_url, models"),
        (
            {"models": {"x": {"context_window": 1000}}},
            "models.x",
            "input_usd_per_million, output_usd_per_million",
        ),
        ({"budgets": {"t": {}}}, "budgets.t", "usd"),
        ({"auth": {"keys": [{"tenant": "t"}]}}, "auth.keys[0]", "sha256"),
    ],
)
def test_a_missing_required_key_is_named_in_the_configs_words(
    data: dict[str, Any], key: str, missing: str
) -> None:
    """A section without a required key names the keys it lacks. Before, the error was
    Python's: `UpstreamConfig.__init__() missing 2 required positional arguments`."""
    with pytest.raises(ConfigError) as refused:
        parse(data)
    assert refused.value.key == key
    assert refused.value.problem == f"missing required key(s): {missing}"


def test_a_number_written_in_hex_is_a_plain_integer(tmp_path: Path) -> None:
    """`0x10` is 16 where the config wants a number: a plain `int`, the text YAML read it
    from left behind (a name written so keeps its text)."""
    path = tmp_path / "gateway.yaml"
    path.write_text("server:\n  max_in_flight_calls: 0x10\n", encoding="utf-8")
    config = load_config(path, environ={})
    assert type(config.server.max_in_flight_calls) is int
    assert config.server.max_in_flight_calls == 16


def test_a_name_written_as_a_decimal_keeps_its_text_and_a_number_is_a_plain_float(
    tmp_path: Path,
) -> None:
    """A model written `1.10` is the model "1.10" callers name (YAML alone: 1.1); where a
    number goes (a timeout, `extra_body` sent as JSON) it is a plain `float`."""
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "server: {grace_period_s: 1.50}\nupstreams:\n  - {name: up, base_url: 'http://h/v1',"
        " models: [1.10], extra_body: {bias: 1.50}}\n",
        encoding="utf-8",
    )
    config = load_config(path, environ={})
    assert list(config.upstreams[0].models) == ["1.10"]
    assert type(config.server.grace_period_s) is float
    assert type(config.upstreams[0].extra_body["bias"]) is float


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"upstreams": [upstream(models=[""])]}, "upstreams[0]"),
        ({"upstreams": [upstream(models={"m": ""})]}, "upstreams[0]"),
        ({"upstreams": [upstream(models=["tab\tname"])]}, "upstreams[0]"),
        ({"upstreams": [upstream(models=["m" * 257])]}, "upstreams[0]"),
        ({"local_model": {"model": ""}}, "local_model"),
    ],
)
def test_a_model_name_no_request_could_carry_is_a_config_error(
    data: dict[str, Any], key: str
) -> None:
    """A model named "" (or with a tab, or past 256 characters) could never be asked for:
    requests refuse such names. Before, the config took it, and its upstream served
    nothing."""
    with pytest.raises(ConfigError) as refused:
        parse(data)
    assert refused.value.key == key
    assert "1-256 printable characters" in refused.value.problem


def test_parse_config_leaves_the_data_it_is_given_as_it_was():
    """It wrote `source` and the environment's overrides into the caller's dict, so the
    same data parsed twice failed (`source: unknown key`) or kept the first overrides."""
    data = {"server": {"listen": "127.0.0.1:7000"}, "upstreams": []}
    before = copy.deepcopy(data)
    environ = {"LLM_GATEWAY__SERVER__LISTEN": "127.0.0.1:7001"}
    first = parse_config(data, environ=environ)
    assert data == before
    second = parse_config(data, environ={})
    assert (first.server.listen, second.server.listen) == ("127.0.0.1:7001", "127.0.0.1:7000")


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (
            "resilience: {attempts: 017}",
            "resilience.attempts",
            "017 reads as 15 in YAML 1.1: write 17, or 0o17 if you mean octal",
        ),
        (
            "resilience: {attempts: 1:30}",
            "resilience.attempts",
            "1:30 reads as 90 in YAML 1.1 (base 60, as a time): write 90",
        ),
        (
            "server: {grace_period_s: 1:30.5}",
            "server.grace_period_s",
            "1:30.5 reads as 90.5 in YAML 1.1 (base 60, as a time): write 90.5",
        ),
        (
            "server: {grace_period_s: 010}",
            "server.grace_period_s",
            "010 reads as 8 in YAML 1.1: write 10, or 0o10 if you mean octal",
        ),
        (
            "server: {max_queued_calls: -0_17}",
            "server.max_queued_calls",
            "-0_17 reads as -15 in YAML 1.1: write -17, or -0o17 if you mean octal",
        ),
        (
            "resilience: {attempts: 08}",
            "resilience.attempts",
            "08 is no number in YAML 1.1, where a leading 0 means octal: write 8",
        ),
        (
            "upstreams: [{name: up, base_url: 'http://h/v1', models: [m],"
            " extra_body: {seed: 017}}]",
            "upstreams[0].extra_body.seed",
            "017 reads as 15 in YAML 1.1: write 17, or 0o17 if you mean octal",
        ),
        (
            "upstreams: [{name: up, base_url: 'http://h/v1', models: [m],"
            " extra_body: {top_k: 08}}]",
            "upstreams[0].extra_body.top_k",
            "08 is no number in YAML 1.1, where a leading 0 means octal: write 8, "
            "or quote it for text",
        ),
        # An exponent as JSON and YAML 1.2 write it is text to YAML 1.1: the error said
        # "must be a number" alone, of a number.
        (
            "server: {grace_period_s: 1e3}",
            "server.grace_period_s",
            "1e3 is no number in YAML 1.1, which reads an exponent only after a dot and "
            "with its sign: write 1.0e+3",
        ),
        (
            "upstreams: [{name: up, base_url: 'http://h/v1', models: [m], timeout_s: 5e-1}]",
            "upstreams[0].timeout_s",
            "5e-1 is no number in YAML 1.1, which reads an exponent only after a dot and "
            "with its sign: write 5.0e-1",
        ),
        # YAML 1.1 reads no sign before a leading dot: the error said to write the same.
        (
            "server: {grace_period_s: -.5e+1}",
            "server.grace_period_s",
            "-.5e+1 is no number in YAML 1.1, which reads an exponent only after a dot and "
            "with its sign: write -0.5e+1",
        ),
        (
            "upstreams: [{name: up, base_url: 'http://h/v1', models: [m], timeout_s: .5e1}]",
            "upstreams[0].timeout_s",
            ".5e1 is no number in YAML 1.1, which reads an exponent only after a dot and "
            "with its sign: write 0.5e+1",
        ),
        (
            "resilience: {attempts: 1e1}",
            "resilience.attempts",
            "1e1 is no number in YAML 1.1, which reads an exponent only after a dot and "
            "with its sign: write 10",
        ),
    ],
)
def test_a_number_yaml_11_reads_as_octal_or_base_60_is_refused_saying_how(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    """A number written with a leading zero or with colons is a config error saying what
    YAML 1.1 read it as and what to write.

    Before, `attempts: 017` was 15 attempts and `attempts: 1:30` 90, without a word.
    """
    path = tmp_path / "gateway.yaml"
    path.write_text(text + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        load_config(path, environ={})
    assert (refused.value.key, refused.value.problem) == (key, problem)


def test_a_number_from_a_variable_with_a_leading_zero_is_refused_naming_it() -> None:
    """A variable's value is read as the file's are, and the error names the variable."""
    with pytest.raises(ConfigError) as refused:
        parse({}, LLM_GATEWAY__RESILIENCE__ATTEMPTS="017")
    assert refused.value.key == "resilience.attempts"
    assert refused.value.problem == (
        "017 reads as 15 in YAML 1.1: write 17, or 0o17 if you mean octal "
        "(set from the environment: LLM_GATEWAY__RESILIENCE__ATTEMPTS)"
    )


def test_numbers_written_as_meant_and_names_with_a_leading_zero_are_taken(
    tmp_path: Path,
) -> None:
    """`0o17` (YAML 1.2's octal), `0`, `1_000` and `+5` are the numbers they say; a name
    written `017` or `1:30` (a tenant, a model) is that text, as before."""
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "resilience: {attempts: 0o17, retry_budget_min_retries: 0}\n"
        "defaults: {max_messages: 1_000, max_labels: +5}\n"
        "server: {grace_period_s: 0.5}\n"
        "upstreams: [{name: up, base_url: 'http://h/v1', models: [017, 1:30, 0o17]}]\n"
        "tenants: {017: {requests_per_minute: 1}}\n",
        encoding="utf-8",
    )
    config = load_config(path, environ={})
    assert (config.resilience.attempts, config.resilience.retry_budget_min_retries) == (15, 0)
    assert (config.defaults.max_messages, config.defaults.max_labels) == (1000, 5)
    assert list(config.upstreams[0].models) == ["017", "1:30", "0o17"]
    assert list(config.tenants) == ["017"]


def test_an_unquoted_08_in_extra_body_is_refused_and_a_quoted_one_or_a_name_is_text(
    tmp_path: Path,
) -> None:
    """`extra_body: {top_k: 08}` went to the upstream as the string "08" (YAML 1.1 reads
    no octal with an 8, so text), where `top_k: 017` was refused; `'08'` quoted is the text
    it says, and so is `08` as a name (a key of `extra_body`, a model, a tenant)."""
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "upstreams: [{name: up, base_url: 'http://h/v1', models: [08],"
        " extra_body: {user: '08', 09: 1}}]\n"
        "tenants: {08: {requests_per_minute: 1}}\n",
        encoding="utf-8",
    )
    config = load_config(path, environ={})
    assert orjson.loads(orjson.dumps(config.upstreams[0].extra_body)) == {"user": "08", "09": 1}
    assert (list(config.upstreams[0].models), list(config.tenants)) == (["08"], ["08"])
