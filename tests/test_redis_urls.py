"""The Redis password kept out of everything the proxy shows, wherever the URL carries it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import ConfigError, load, redact_url
from proxy.probe import display_url
from tests.redisserver import RedisServer

SECRET_PASSWORD = "Zq8/xY+hunter2"


@pytest.mark.parametrize(
    "url",
    [
        f"redis://127.0.0.1:6379/0?password={SECRET_PASSWORD}",  # redis-py takes it from there
        "unix:///run/redis.sock?db=0&password=hunter2",
        "rediss://user:hunter2@127.0.0.1:6380/0",
        "redis://:hunter2@127.0.0.1/0",
        "redis://:Qx7:hunter2@Vv1@127.0.0.1:6379/0",  # redis-py takes all of it as the password
        "redis://127.0.0.1/0?password=a@hunter2",
    ],
)
def test_a_password_anywhere_in_the_url_is_hidden(url: str) -> None:
    """redis-py reads ``?password=`` from the query string too; what is shown never has it."""
    shown = redact_url(url)
    assert "hunter2" not in shown and "***" in shown
    assert "hunter2" not in display_url(url)


@pytest.mark.parametrize("password", ["Qx7/Wz9", "Qx7#Wz9", "Qx7?Wz9", "123/Wz9"])
def test_an_unencoded_password_is_refused_without_showing_it(password: str) -> None:
    """A raw password with ``/ # ? @`` (``openssl rand -base64`` makes such) splits the URL in
    the wrong place: redis-py then fails with the password's first part in its message (as a
    port), and a display would show the rest as a path. Refused at load, by name, unshown."""
    url = f"redis://:{password}@127.0.0.1:6379/0"
    with pytest.raises(ConfigError) as refused:
        load(env={}, flags={"redis_url": url, "secret_file": "/s"})
    message = str(refused.value)
    assert message.startswith("redis_url: ")
    assert "Qx7" not in message and "Wz9" not in message and "123" not in message


def test_doctor_and_stats_hide_a_password_given_in_the_query(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Against a Redis that wants a password, given as ``?password=``: sharing connects, and
    neither doctor nor the operator's stats print it."""
    server = RedisServer(tmp_path / "pw", password="qpw-" + "7" * 12).start()
    try:
        secret = tmp_path / "secret"
        secret.write_text("0123456789abcdef" * 4)
        url = f"redis://127.0.0.1:{server.port}/0?password=qpw-{'7' * 12}"
        (tmp_path / "c").mkdir(mode=0o700)
        env = {
            **os.environ,
            "VLMRUN_CACHE_REDIS_URL": url,
            "VLMRUN_CACHE_SECRET_FILE": str(secret),
            "VLMRUN_CACHE_CACHE_DIR": str(tmp_path / "c"),
            "VLMRUN_CACHE_UPSTREAM": "http://127.0.0.1:9",
        }
        for command in (["doctor"], ["stats", "--json"]):
            done = subprocess.run(
                [sys.executable, "-m", "proxy", *command],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                env=env,
            )
            shown = done.stdout + done.stderr
            assert "7" * 12 not in shown, shown
            assert str(server.port) in shown, shown
    finally:
        server.stop()
