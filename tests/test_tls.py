"""TLS: https with a certificate of our own, its settings, and the warning for clear text."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from proxy import cli
from proxy.config import Config, ConfigError, load
from tests.conftest import SESSION
from tests.helpers import auth
from tests.servers import Daemon, ServerThread
from tests.standin import StandIn

#: Given to the warning and to a uvicorn.run that is replaced; nothing here binds it.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pem_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 (chain, then key), issued by the test CA."""
    server = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(b"".join(pem.bytes() for pem in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(keyfile))
    return certfile, keyfile


@pytest.fixture
def trusting(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts the test CA only."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def tls_daemon(
    upstream: ServerThread, cache_dir: Path, pem_files: tuple[Path, Path]
) -> Iterator[Daemon]:
    certfile, keyfile = pem_files
    daemon = Daemon(
        "--upstream",
        upstream.url,
        "--cache-dir",
        str(cache_dir),
        "--tls-certfile",
        str(certfile),
        "--tls-keyfile",
        str(keyfile),
    )
    assert daemon.started(), daemon.output
    yield daemon
    if daemon.process.poll() is None:
        daemon.stop()


def test_artifacts_are_served_over_verified_https(
    standin: StandIn, tls_daemon: Daemon, trusting: ssl.SSLContext
) -> None:
    """With a certificate and key the proxy speaks https: a miss, then a hit, byte-exact."""
    body = standin.add("session", SESSION, "img_7157a1", size=200_000)
    origin = f"https://127.0.0.1:{tls_daemon.port}"
    url = f"{origin}/v1/artifacts?object_id=img_7157a1&session_id={SESSION}"
    with httpx.Client(verify=trusting, timeout=20) as client:
        first = client.get(url, headers=auth())
        second = client.get(url, headers=auth())
    assert (first.status_code, first.headers["x-cache"], first.content) == (200, "MISS", body)
    assert (second.headers["x-cache"], second.content) == ("HIT", body)
    assert origin in tls_daemon.output
    assert "without TLS" not in tls_daemon.output


def test_https_port_refuses_plain_http_and_untrusted_clients(tls_daemon: Daemon) -> None:
    """The TLS port answers no plain http, and a client without the CA cannot verify it."""
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_daemon.port}/healthz", timeout=10)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://127.0.0.1:{tls_daemon.port}/healthz", timeout=10)


# -- settings ------------------------------------------------------------------------------------


def test_tls_settings_accept_a_readable_pair(pem_files: tuple[Path, Path]) -> None:
    """A readable certificate and its key are accepted from flags."""
    certfile, keyfile = pem_files
    config = load(env={}, flags={"tls_certfile": str(certfile), "tls_keyfile": str(keyfile)})
    assert (config.tls_certfile, config.tls_keyfile) == (str(certfile), str(keyfile))


@pytest.mark.parametrize(
    ("given", "key"),
    [
        ({"tls_certfile": "cert"}, "tls_keyfile"),
        ({"tls_keyfile": "key"}, "tls_certfile"),
        ({"tls_certfile": "missing", "tls_keyfile": "key"}, "tls_certfile"),
        ({"tls_certfile": "cert", "tls_keyfile": "missing"}, "tls_keyfile"),
        ({"tls_certfile": "cert", "tls_keyfile": "other_key"}, "tls_keyfile"),
        ({"tls_certfile": "key", "tls_keyfile": "key"}, "tls_keyfile"),
    ],
)
def test_invalid_tls_settings_name_their_key(
    given: dict[str, str], key: str, ca: trustme.CA, pem_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """Only one of the pair, an unreadable file or a mismatched pair stops start-up."""
    certfile, keyfile = pem_files
    other_key = tmp_path / "other.pem"
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other_key))
    paths = {"cert": certfile, "key": keyfile, "other_key": other_key, "missing": tmp_path / "no"}
    flags = {setting: str(paths[name]) for setting, name in given.items()}
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load(env={}, flags=flags)


# -- the clear-text warning ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "tls", "warned"),
    [
        (ALL_INTERFACES, False, True),
        ("::", False, True),
        ("192.0.2.10", False, True),
        ("cache.example.internal", False, True),
        (ALL_INTERFACES, True, False),
        ("127.0.0.1", False, False),
        ("127.0.0.2", False, False),
        ("::1", False, False),
        ("localhost", False, False),
    ],
)
def test_clear_text_warning_only_off_loopback(
    host: str, tls: bool, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """One WARNING when a non-loopback address is served without TLS; none otherwise."""
    files = {"tls_certfile": "cert.pem", "tls_keyfile": "key.pem"} if tls else {}
    with caplog.at_level(logging.WARNING, logger="proxy.cli"):
        cli.warn_if_clear_text(Config(host=host, **files))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == (1 if warned else 0)
    if warned:
        assert host in warnings[0].getMessage() and "without TLS" in warnings[0].getMessage()


def test_serve_passes_tls_to_uvicorn_and_warns_without_it(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    pem_files: tuple[Path, Path],
    cache_dir: Path,
) -> None:
    """`serve` hands the pair to uvicorn, and warns for 0.0.0.0 only without it (nothing binds)."""
    runs: list[dict[str, Any]] = []
    monkeypatch.setattr(cli.uvicorn, "run", lambda _app, **options: runs.append(options))
    monkeypatch.setattr(cli, "configure_logging", lambda _level: None)
    monkeypatch.setattr(cli, "announce", lambda _config: None)  # would ask api.vlm.run
    certfile, keyfile = pem_files
    base = ["serve", "--host", ALL_INTERFACES, "--cache-dir", str(cache_dir)]
    with caplog.at_level(logging.WARNING, logger="proxy.cli"):
        assert (
            cli.main([*base, "--tls-certfile", str(certfile), "--tls-keyfile", str(keyfile)]) == 0
        )
        assert not caplog.records
        assert cli.main(base) == 0
    assert (runs[0]["ssl_certfile"], runs[0]["ssl_keyfile"]) == (str(certfile), str(keyfile))
    assert (runs[1]["ssl_certfile"], runs[1]["ssl_keyfile"]) == (None, None)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
