"""Each worker process gets its own Prometheus port: the configured one plus its index."""

from __future__ import annotations

import pytest

from service.config import ConfigError
from service.main import with_flags
from service.workers import worker_configs, worker_count
from tests.conftest import gateway_config


def ports(count: int, environ: dict[str, str] | None = None, **telemetry: object) -> list:
    """The Prometheus port of each of `count` workers."""
    config = gateway_config("http://127.0.0.1:1", telemetry=telemetry)
    return [
        c.telemetry.prometheus_port for c in worker_configs(config, count, environ=environ or {})
    ]


@pytest.mark.parametrize(
    ("count", "telemetry", "environ", "expected"),
    [
        (3, {"prometheus_port": 9100}, {}, [9100, 9101, 9102]),
        (1, {"prometheus_port": 9100}, {}, [9100]),
        (2, {}, {"OTEL_METRICS_EXPORTER": "otlp,prometheus"}, [9464, 9465]),
        (2, {}, {}, [None, None]),
        (2, {"prometheus_port": 0}, {}, [0, 0]),
        (2, {"enabled": False}, {"OTEL_METRICS_EXPORTER": "prometheus"}, [None, None]),
        (2, {"enabled": False, "prometheus_port": 65535}, {}, [65535, 65535]),
        (2, {"prometheus_port": 65535}, {"OTEL_SDK_DISABLED": "true"}, [65535, 65535]),
    ],
)
def test_worker_port_is_base_plus_index(count, telemetry, environ, expected):
    """Port + index when a port is configured or implied; unchanged when none or 0."""
    assert ports(count, environ, **telemetry) == expected


def test_workers_past_the_last_port_fail_clearly():
    """Ports that would run past 65535 are a config error naming the file, the key and the
    range (before, the file was left out and "telemetry" took its place)."""
    with pytest.raises(ConfigError) as error:
        ports(4, prometheus_port=65534)
    assert error.value.key == "telemetry.prometheus_port"
    assert str(error.value).startswith("<test>: telemetry.prometheus_port: ")
    assert "65534..65537" in str(error.value)


def test_everything_but_the_port_is_shared():
    """Workers differ only in their Prometheus port."""
    config = gateway_config("http://127.0.0.1:1", telemetry={"prometheus_port": 9100})
    first, second = worker_configs(config, 2, environ={})
    assert first.server == second.server == config.server
    assert first.upstreams == second.upstreams
    assert first.telemetry.service_name == second.telemetry.service_name


def test_a_worker_count_from_the_command_line_is_named_as_the_flag():
    """`serve --workers 2` past the last port says the flag set the count: the file's
    `telemetry.prometheus_port` alone does not make the range."""
    config = with_flags(
        gateway_config("http://127.0.0.1:1", telemetry={"prometheus_port": 65535}), workers=2
    )
    with pytest.raises(ConfigError) as error:
        worker_configs(config, 2, environ={})
    assert "2 workers (--workers) need ports 65535..65536" in str(error.value)
    assert worker_count(config) == (2, "--workers")
