"""Settings: sizes, durations, precedence, validation messages, and the example file."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from proxy.config import KEYS, Config, ConfigError, load, parse_duration, parse_size

EXAMPLE = Path(__file__).resolve().parents[1] / "config.example.toml"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("512MiB", 512 * 1024**2),
        ("10GiB", 10 * 1024**3),
        ("1.5GB", 1_500_000_000),
        ("64 KiB", 65536),
        (7, 7),
    ],
)
def test_sizes(text: object, expected: int) -> None:
    """Sizes take plain bytes, SI and IEC units."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "10XB", "-1", "", "1e9", True])
def test_bad_sizes(text: object) -> None:
    """Anything else is refused."""
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"), [("250ms", 0.25), ("30s", 30), ("10m", 600), ("1h", 3600), (5, 5.0)]
)
def test_durations(text: object, expected: float) -> None:
    """Durations take ms, s, m, h and d."""
    assert parse_duration(text) == expected


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    """A flag beats the environment, which beats the file, which beats the default."""
    file = tmp_path / "c.toml"
    file.write_text('port = 9001\nmax_size = "1GiB"\nlog_level = "debug"\n')
    env = {"VLMRUN_CACHE_PORT": "9002", "VLMRUN_CACHE_MAX_SIZE": "2GiB"}
    config = load(file, env, {"port": "9003"})
    assert (config.port, config.max_size, config.log_level) == (9003, 2 * 1024**3, "debug")
    assert config.upstream == "https://api.vlm.run"


def test_precedence_with_a_base_file(tmp_path: Path) -> None:
    """The base file beats the defaults and loses to the user's file, the environment and flags."""
    base = tmp_path / "base.toml"
    base.write_text('host = "::1"\nport = 9000\nmax_size = "1GiB"\nretries = 5\nworkers = 3\n')
    file = tmp_path / "c.toml"
    file.write_text('max_size = "2GiB"\nretries = 4\nworkers = 2\n')
    env = {"VLMRUN_CACHE_RETRIES": "3", "VLMRUN_CACHE_WORKERS": "4"}
    config = load(file, env, {"workers": "5"}, base=base)
    assert (config.host, config.port) == ("::1", 9000)
    assert (config.max_size, config.retries, config.workers) == (2 * 1024**3, 3, 5)
    assert config.upstream == "https://api.vlm.run"
    assert load(env={}, base=base).port == 9000


def test_base_file_errors_name_the_file(tmp_path: Path) -> None:
    """A missing, malformed or mistyped base file stops start-up and says it was the base file."""
    with pytest.raises(ConfigError, match=r"^config: cannot read base file .*missing\.toml"):
        load(env={}, base=tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("port = \n")
    with pytest.raises(ConfigError, match=r"^config: base file .* is not valid TOML"):
        load(env={}, base=bad)
    bad.write_text('port = "http"\n')
    with pytest.raises(ConfigError, match=r"^port: .*\(from base file "):
        load(env={}, base=bad)


def test_unrelated_environment_is_ignored() -> None:
    """The SDK's own VLMRUN_CACHE_DIR is not one of ours and must not change anything."""
    assert load(env={"VLMRUN_CACHE_DIR": "/elsewhere"}) == load(env={})


@pytest.mark.parametrize(
    ("source", "key"),
    [
        ({"env": {"VLMRUN_CACHE_MAX_SIZE": "huge"}}, "max_size"),
        ({"flags": {"port": "70000"}}, "port"),
        ({"flags": {"upstream": "ftp://x"}}, "upstream"),
        ({"flags": {"upstream": "https://api.vlm.run/v1"}}, "upstream"),
        ({"flags": {"max_object_size": "20GiB"}}, "max_object_size"),
        ({"flags": {"log_level": "loud"}}, "log_level"),
        ({"flags": {"proof_ttl": "0s"}}, "proof_ttl"),
        ({"flags": {"chunk_size": "1"}}, "chunk_size"),
        (
            {
                "env": {"VLMRUN_CACHE_SECRET": "s" * 32},
                "flags": {"redis_url": "redis://127.0.0.1/0", "redis_lease_ttl": "100ms"},
            },
            "redis_lease_ttl",
        ),
    ],
)
def test_invalid_values_name_their_key(source: dict[str, dict[str, str]], key: str) -> None:
    """An invalid value stops start-up with a message that starts with the key."""
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load(env=source.get("env", {}), flags=source.get("flags"))


@pytest.mark.parametrize(
    ("env", "flags", "where"),
    [
        ({"VLMRUN_CACHE_PORT": "abc"}, {}, "environment variable VLMRUN_CACHE_PORT"),
        ({"VLMRUN_CACHE_PORT": "70000"}, {}, "environment variable VLMRUN_CACHE_PORT"),
        ({"VLMRUN_CACHE_ACCESS_LOG": "maybe"}, {}, "environment variable VLMRUN_CACHE_ACCESS_LOG"),
        ({}, {"max_size": "lots"}, "flag --max-size"),
    ],
)
def test_invalid_values_name_where_they_came_from(
    env: dict[str, str], flags: dict[str, str], where: str
) -> None:
    """An invalid value's message (unparsable or out of range) names the variable or flag that
    set it, not only the key."""
    with pytest.raises(ConfigError) as raised:
        load(env=env, flags=flags)
    assert str(raised.value).endswith(f"(from {where})")


@pytest.mark.parametrize(
    ("raw", "expected"), [("true", True), ("off", False), ("0", False), ("Yes", True)]
)
def test_access_log_switch_takes_the_usual_spellings(raw: str, expected: bool) -> None:
    """access_log takes true/false, yes/no, on/off and 1/0 from the environment."""
    assert load(env={"VLMRUN_CACHE_ACCESS_LOG": raw}).access_log is expected


def test_log_format_is_text_or_json() -> None:
    """log_format accepts text and json (any case) and refuses anything else, naming the key."""
    assert load(env={}, flags={"log_format": "JSON"}).log_format == "json"
    with pytest.raises(ConfigError, match=r"^log_format: must be one of text, json"):
        load(env={}, flags={"log_format": "xml"})


def test_unknown_file_key_is_refused(tmp_path: Path) -> None:
    """A typo in the file is reported, not silently ignored."""
    file = tmp_path / "c.toml"
    file.write_text("max_sise = 1\n")
    with pytest.raises(ConfigError, match=r"^max_sise: unknown setting"):
        load(file, {})


def test_example_file_lists_every_key_with_its_default() -> None:
    """config.example.toml loads, and what it sets equals the built-in defaults."""
    listed = tomllib.loads(EXAMPLE.read_text())
    commented = {
        line.split("=")[0].strip("# ").strip()
        for line in EXAMPLE.read_text().splitlines()
        if "=" in line
    }
    assert set(KEYS) <= set(listed) | commented
    assert load(EXAMPLE, {}) == Config()


def test_max_object_size_defaults_to_a_quarter() -> None:
    """With no per-object limit set, it is a quarter of the total."""
    assert load(env={}, flags={"max_size": "4GiB"}).object_size_limit == 1024**3


def test_prefetch_settings() -> None:
    """Prefetch is on by default, off with VLMRUN_CACHE_PREFETCH=false or the flag, and its
    limits are validated by name."""
    assert load(env={}).prefetch is True
    assert load(env={"VLMRUN_CACHE_PREFETCH": "false"}).prefetch is False
    assert load(env={}, flags={"prefetch": "no"}).prefetch is False
    config = load(env={"VLMRUN_CACHE_PREFETCH_MAX_OBJECT_SIZE": "8MiB"})
    assert config.prefetch_max_object_size == 8 * 1024**2
    for key, value in (("prefetch_concurrency", "0"), ("prefetch_per_key", "0")):
        with pytest.raises(ConfigError, match=f"^{key}: must be at least 1"):
            load(env={}, flags={key: value})
    with pytest.raises(ConfigError, match=r"^prefetch_scan_limit: must be at least 4KiB"):
        load(env={}, flags={"prefetch_scan_limit": "100"})


def test_workers_auto_is_one_per_usable_core() -> None:
    """``workers = "auto"`` (file, environment or flag) is the cores this process may run on;
    anything else must still be a number."""
    cores = len(os.sched_getaffinity(0))
    assert load(env={"VLMRUN_CACHE_WORKERS": "auto"}).workers == min(64, cores)
    assert load(env={}, flags={"workers": " Auto "}).workers == min(64, cores)
    with pytest.raises(ConfigError, match="workers"):
        load(env={"VLMRUN_CACHE_WORKERS": "many"})
