"""Settings: size/duration parsing, checked dataclasses and reading spark.hydrogen.* conf."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from sparkhydrogen.config import (
    CoordinatorConfig,
    HydrogenConfig,
    LaunchConfig,
    parse_duration,
    parse_size,
)

pytestmark = pytest.mark.timeout(30)

KiB, MiB, GiB = 1024, 1024**2, 1024**3


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("512", 512), ("0", 0), ("10b", 10), ("64k", 64 * KiB), ("64K", 64 * KiB), ("64kb", 64 * KiB),
        ("256m", 256 * MiB), ("256MB", 256 * MiB), ("1g", GiB), ("2gb", 2 * GiB), (" 3 m ", 3 * MiB),
        (4096, 4096),
    ],
)
def test_parse_size(value: str | int, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["", "abc", "1.5g", "-1", "10x", "1t", "m", "1 0k", "64 mib"])
def test_parse_size_rejects_bad_values_naming_the_key(value: str) -> None:
    with pytest.raises(ValueError, match=rf"spark\.hydrogen\.coordinator\.maxPayload={value!r} is not a size; "
                                         r"use bytes or a suffix k, m, g"):
        parse_size(value, "spark.hydrogen.coordinator.maxPayload")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2", 2.0), ("2.5", 2.5), ("500ms", 0.5), ("30s", 30.0), ("5min", 300.0), ("2m", 120.0),
        ("1h", 3600.0), ("1.5h", 5400.0), (" 10 S ", 10.0), (7, 7.0), (0.25, 0.25),
    ],
)
def test_parse_duration(value: str | float, expected: float) -> None:
    assert parse_duration(value) == pytest.approx(expected)
    assert isinstance(parse_duration(value), float)


@pytest.mark.parametrize("value", ["", "fast", "-3s", "10 years", "1d", "s", ".5s", "1e3"])
def test_parse_duration_rejects_bad_values_naming_the_key(value: str) -> None:
    with pytest.raises(ValueError, match=rf"spark\.hydrogen\.collective\.timeout={value!r} is not a duration"):
        parse_duration(value, "spark.hydrogen.collective.timeout")


def test_default_key_names_appear_when_none_is_given() -> None:
    with pytest.raises(ValueError, match="size='x' is not a size"):
        parse_size("x")
    with pytest.raises(ValueError, match="duration='x' is not a duration"):
        parse_duration("x")


# ----------------------------------------------------------- dataclasses


def test_defaults() -> None:
    cfg = HydrogenConfig()
    assert cfg.coordinator == CoordinatorConfig()
    assert (cfg.coordinator.host, cfg.coordinator.port, cfg.coordinator.port_max_retries) == ("127.0.0.1", 0, 16)
    assert cfg.coordinator.max_payload_bytes == 256 * MiB
    assert cfg.coordinator.max_header_bytes == 64 * KiB
    assert cfg.launch == LaunchConfig(connect_timeout=30.0, collective_timeout=None, slot_wait_timeout=0.0)


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        CoordinatorConfig().port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        LaunchConfig().connect_timeout = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"host": ""}, "coordinator host must be a non-empty string, got ''"),
        ({"host": None}, "coordinator host must be a non-empty string, got None"),
        ({"port": -1}, r"coordinator port must be in 0\.\.65535, got -1"),
        ({"port": 65536}, r"coordinator port must be in 0\.\.65535, got 65536"),
        ({"port_max_retries": -1}, "port_max_retries must be >= 0, got -1"),
        ({"max_header_bytes": 0}, "max_header_bytes must be > 0, got 0"),
        ({"max_payload_bytes": -5}, "max_payload_bytes must be > 0, got -5"),
        ({"handshake_timeout": 0.0}, "handshake_timeout must be > 0"),
        ({"missing_log_interval": -1.0}, "missing_log_interval must be > 0"),
        ({"tick_interval": 0}, "tick_interval must be > 0"),
        ({"advertise_host": ""}, "advertise_host must be a non-empty host name or address, got ''"),
        ({"advertise_host": 7}, "advertise_host must be a non-empty host name or address, got 7"),
        ({"advertise_host": "0.0.0.0"}, r"advertise_host='0\.0\.0\.0' listens on every interface but cannot be "
                                        r"connected to; set spark\.hydrogen\.coordinator\.advertiseHost"),
        ({"advertise_host": "::"}, "advertise_host='::' listens on every interface"),
        ({"advertise_host": "driver:7077"}, r"advertise_host='driver:7077' is not a bare host: give "
                                            r"spark\.hydrogen\.coordinator\.advertiseHost a host name or IP "
                                            "address without port, brackets or scheme"),
        ({"advertise_host": "[::1]"}, r"advertise_host='\[::1\]' is not a bare host"),
        ({"advertise_host": "http://driver"}, "advertise_host='http://driver' is not a bare host"),
        ({"advertise_host": "my driver"}, "advertise_host='my driver' is not a bare host"),
    ],
)
def test_coordinator_config_validates(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CoordinatorConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"connect_timeout": 0}, "connect_timeout must be > 0, got 0"),
        ({"collective_timeout": -1.0}, r"collective_timeout must be > 0, got -1\.0"),
        ({"slot_wait_timeout": -0.5}, r"slot_wait_timeout must be >= 0, got -0\.5"),
    ],
)
def test_launch_config_validates(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LaunchConfig(**kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------- from_conf


def from_conf(conf: dict[str, str], driver_host: str = "10.0.0.5") -> HydrogenConfig:
    return HydrogenConfig.from_conf(conf.get, driver_host)


def test_from_conf_without_keys_uses_defaults_and_the_driver_host() -> None:
    cfg = from_conf({"spark.app.name": "x"})
    assert cfg.coordinator == CoordinatorConfig(host="10.0.0.5")
    assert cfg.launch == LaunchConfig()


def test_from_conf_reads_every_key() -> None:
    cfg = from_conf({
        "spark.hydrogen.coordinator.host": "0.0.0.0",
        "spark.hydrogen.coordinator.port": "7100",
        "spark.hydrogen.coordinator.portMaxRetries": "4",
        "spark.hydrogen.coordinator.maxPayload": "64m",
        "spark.hydrogen.coordinator.connectTimeout": "500ms",
        "spark.hydrogen.collective.timeout": "5min",
        "spark.hydrogen.launch.slotWaitTimeout": "45s",
        "spark.hydrogen.heartbeat.interval": "250ms",
        "spark.hydrogen.heartbeat.timeout": "20s",
        "spark.hydrogen.checkpoint.maxSize": "1g",
        "spark.hydrogen.embedded.lingerTimeout": "90s",
    })
    assert cfg.coordinator == CoordinatorConfig(host="0.0.0.0", port=7100, port_max_retries=4,
                                                max_payload_bytes=64 * MiB, liveness_timeout=20.0,
                                                checkpoint_max_bytes=GiB, advertise_host="10.0.0.5")
    assert cfg.launch == LaunchConfig(connect_timeout=0.5, collective_timeout=300.0, slot_wait_timeout=45.0,
                                      heartbeat_interval=0.25, embedded_linger=90.0)


@pytest.mark.parametrize("interval, timeout", [("8s", "8s"), ("10s", "8s"), ("9", None)])
def test_heartbeat_interval_must_be_below_its_timeout(interval: str, timeout: str | None) -> None:
    conf = {"spark.hydrogen.heartbeat.interval": interval}
    if timeout is not None:
        conf["spark.hydrogen.heartbeat.timeout"] = timeout
    with pytest.raises(ValueError, match=r"spark\.hydrogen\.heartbeat\.interval .* must be below "
                                         r"spark\.hydrogen\.heartbeat\.timeout"):
        from_conf(conf)


def test_heartbeat_interval_below_its_timeout_is_accepted() -> None:
    cfg = from_conf({"spark.hydrogen.heartbeat.interval": "2s", "spark.hydrogen.heartbeat.timeout": "3s"})
    assert (cfg.launch.heartbeat_interval, cfg.coordinator.liveness_timeout) == (2.0, 3.0)


def test_from_conf_treats_blank_values_as_unset() -> None:
    cfg = from_conf({"spark.hydrogen.coordinator.host": "  ", "spark.hydrogen.collective.timeout": ""})
    assert cfg.coordinator.host == "10.0.0.5"
    assert cfg.launch.collective_timeout is None


def test_from_conf_reads_through_the_getter_only() -> None:
    asked: list[str] = []

    def get(key: str) -> str | None:
        asked.append(key)
        return None

    HydrogenConfig.from_conf(get, "h")
    assert asked and all(key.startswith("spark.hydrogen.") for key in asked)
    assert "spark.hydrogen.coordinator.maxPayload" in asked and "spark.hydrogen.collective.timeout" in asked


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("spark.hydrogen.coordinator.port", "abc", r"spark\.hydrogen\.coordinator\.port='abc' is not an integer"),
        ("spark.hydrogen.coordinator.port", "71.5", r"spark\.hydrogen\.coordinator\.port='71\.5' is not an integer"),
        ("spark.hydrogen.coordinator.portMaxRetries", "many",
         r"spark\.hydrogen\.coordinator\.portMaxRetries='many' is not an integer"),
        ("spark.hydrogen.coordinator.maxPayload", "huge",
         r"spark\.hydrogen\.coordinator\.maxPayload='huge' is not a size"),
        ("spark.hydrogen.coordinator.connectTimeout", "soon",
         r"spark\.hydrogen\.coordinator\.connectTimeout='soon' is not a duration"),
        ("spark.hydrogen.collective.timeout", "forever",
         r"spark\.hydrogen\.collective\.timeout='forever' is not a duration"),
        ("spark.hydrogen.launch.slotWaitTimeout", "-1s",
         r"spark\.hydrogen\.launch\.slotWaitTimeout='-1s' is not a duration"),
    ],
)
def test_from_conf_malformed_values_name_the_key(key: str, value: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        from_conf({key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("spark.hydrogen.coordinator.port", "70000"),
        ("spark.hydrogen.coordinator.portMaxRetries", "-1"),
        ("spark.hydrogen.coordinator.maxPayload", "0"),
        ("spark.hydrogen.coordinator.connectTimeout", "0s"),
        ("spark.hydrogen.collective.timeout", "0"),
    ],
)
def test_from_conf_out_of_range_values_name_the_key(key: str, value: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        from_conf({key: value})


# ------------------------------------------------------- advertised host


def test_the_advertised_host_is_the_bound_one_unless_set() -> None:
    assert CoordinatorConfig(host="10.0.0.5").advertised_host == "10.0.0.5"
    assert CoordinatorConfig(host="172.17.0.2", advertise_host="driver.example.com").advertised_host == (
        "driver.example.com")
    assert CoordinatorConfig(host="127.0.0.1", advertise_host="::1").advertised_host == "::1"


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::", "[::]"])
def test_a_wildcard_bind_host_advertises_the_driver_host(wildcard: str) -> None:
    cfg = from_conf({"spark.hydrogen.coordinator.host": wildcard}, driver_host="driver-7.cluster")
    assert cfg.coordinator.host == wildcard.strip("[]")
    assert cfg.coordinator.advertised_host == "driver-7.cluster"


def test_a_specific_bind_host_is_advertised_as_it_is() -> None:
    cfg = from_conf({"spark.hydrogen.coordinator.host": "172.17.0.2"})
    assert cfg.coordinator.advertise_host is None
    assert cfg.coordinator.advertised_host == "172.17.0.2"
    assert from_conf({}).coordinator.advertised_host == "10.0.0.5"  # no key: spark.driver.host, bound and told


@pytest.mark.parametrize("bind", [None, "0.0.0.0", "172.17.0.2"])
def test_advertise_host_overrides_the_default(bind: str | None) -> None:
    conf = {"spark.hydrogen.coordinator.advertiseHost": " [2001:db8::5] "}
    if bind is not None:
        conf["spark.hydrogen.coordinator.host"] = bind
    cfg = from_conf(conf)
    assert cfg.coordinator.advertised_host == "2001:db8::5"  # kept bare, as every host is
    assert cfg.coordinator.host == (bind or "10.0.0.5")


@pytest.mark.parametrize(
    ("value", "match"),
    [("0.0.0.0", r"spark\.hydrogen\.coordinator\.advertiseHost='0\.0\.0\.0': advertise_host='0\.0\.0\.0' listens "
                 r"on every interface but cannot be connected to"),
     ("driver:7077", r"spark\.hydrogen\.coordinator\.advertiseHost='driver:7077': advertise_host='driver:7077' is "
                     "not a bare host")],
)
def test_a_bad_advertise_host_names_the_key(value: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        from_conf({"spark.hydrogen.coordinator.host": "0.0.0.0", "spark.hydrogen.coordinator.advertiseHost": value})


def test_the_readme_lists_every_key_from_conf_reads() -> None:
    asked: list[str] = []

    def get(key: str) -> str | None:
        asked.append(key)
        return None

    HydrogenConfig.from_conf(get, "h")
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Configuration"):readme.index("\n## ", readme.index("## Configuration") + 1)]
    listed = set(re.findall(r"^\| `(spark\.hydrogen\.[\w.]+)` \|", table, flags=re.MULTILINE))
    assert set(asked) - listed == set(), "keys read but missing from the README's configuration table"
    assert listed - set(asked) == set(), "keys in the README's configuration table that nothing reads"
