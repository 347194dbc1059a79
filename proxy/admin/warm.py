"""``warm``: fill the cache with a session's or execution's artifacts, through the proxy.

Everything goes through the proxy as any client's requests would, with the caller's key, so
access checks, proofs and single-flight apply as usual:

1. ``GET /v1/artifacts/list`` names the scope's objects (items without an ``object_id`` are
   skipped);
2. each object is asked for with ``Range: bytes=0-0``. A cached one answers 206 with one byte
   (nothing is downloaded; its proof is checked with the API if it is older than ``proof_ttl``);
   a missing one starts a normal fill, which ignores the range and streams the whole body, read
   here to the end (the proxy sends the last byte only once the entry is committed) and thrown
   away; one more one-byte request then confirms it was stored.

The key comes from ``VLMRUN_API_KEY`` or ``--api-key-file``, never from an argument (which every
local user can read in ``ps``).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from proxy.admin.cache import Failed
from proxy.admin.output import Progress, human_size
from proxy.config import Config

_PROBE = {"Range": "bytes=0-0"}
#: Answers that mean "already stored": a range of a hit (416: of an empty entry).
_STORED = {"HIT", "COALESCED"}
_TIMEOUT = httpx.Timeout(10.0, read=120.0)


class KeyRefused(Exception):
    """The API (through the proxy) refused the key."""


def api_key(args: argparse.Namespace) -> str:
    """The caller's key: ``--api-key-file``, else ``VLMRUN_API_KEY``."""
    if args.api_key_file is not None:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise Failed(f"--api-key-file: cannot read {args.api_key_file}: {exc}", 2) from None
    else:
        key = os.environ.get("VLMRUN_API_KEY", "").strip()
    if not key:
        raise Failed(
            "no API key: set VLMRUN_API_KEY or give --api-key-file (never on the command line)", 2
        )
    return key.removeprefix("Bearer ")


def default_proxy(config: Config) -> tuple[str, bool]:
    """The URL ``serve`` listens on with these settings (as the running server recorded it in
    the cache directory, when it did and answers its health check there: a stopped server
    leaves its address behind), and whether to verify its TLS certificate (not on loopback:
    our own server, whoever signed its certificate)."""
    from proxy.cli import (  # proxy.cli wires this command in
        Unhealthy,
        check_health,
        dial_host,
        origin_url,
    )

    try:
        url = check_health(config.cache_dir, timeout=1.0).removesuffix("/healthz")
    except Unhealthy:
        scheme = "https" if config.tls_certfile else "http"
        url = origin_url(scheme, dial_host(config.host), config.port)
    host = urlsplit(url).hostname or ""
    return url, not (host == "localhost" or _is_loopback(host))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass
class Tally:
    fetched: int = 0
    fetched_bytes: int = 0
    cached: int = 0
    #: (object id, why) of each artifact that is not in the cache afterwards.
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def _detail(response: httpx.Response) -> str:
    """The API's ``detail`` (or the status) of an error answer, for one line of output."""
    try:
        response.read()
        detail = response.json().get("detail")
    except (ValueError, AttributeError, httpx.HTTPError):
        detail = None
    text = detail if isinstance(detail, str) else response.reason_phrase
    return f"{response.status_code} {text}".strip()


def _is_stored(response: httpx.Response) -> bool:
    return response.status_code in (206, 416) and response.headers.get("x-cache") in _STORED


def _warm_one(
    client: httpx.Client, params: dict[str, str], progress: Progress, tally: Tally
) -> None:
    object_id = params["object_id"]
    with client.stream("GET", "/v1/artifacts", params=params, headers=_PROBE) as response:
        if _is_stored(response):
            tally.cached += 1
            progress.note(f"cached   {object_id}")
            return
        if response.status_code in (401, 403):
            raise KeyRefused(_detail(response))
        if response.status_code != 200:
            tally.failed.append((object_id, _detail(response)))
            progress.note(f"failed   {object_id}: {_detail(response)}")
            return
        if response.headers.get("x-cache") not in ("MISS", "COALESCED"):
            why = "the proxy streams it uncached (too large, no room, or no free fill slot)"
            tally.failed.append((object_id, why))
            progress.note(f"failed   {object_id}: {why}")
            return
        size = 0
        for data in response.iter_raw():
            size += len(data)
            progress.advance(len(data))
    with client.stream("GET", "/v1/artifacts", params=params, headers=_PROBE) as confirmed:
        if not _is_stored(confirmed):
            why = "downloaded but not stored (too large for max_object_size, or no room)"
            tally.failed.append((object_id, why))
            progress.note(f"failed   {object_id}: {why}")
            return
    tally.fetched += 1
    tally.fetched_bytes += size
    progress.note(f"fetched  {object_id}  {human_size(size)}")


def warm(args: argparse.Namespace, config: Config) -> int:
    key = api_key(args)
    if args.proxy is not None:
        parts = urlsplit(args.proxy)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise Failed(f"--proxy: {args.proxy!r} is not an http(s) URL", 2)
        base, verify = args.proxy.rstrip("/").removesuffix("/v1"), True
    else:
        base, verify = default_proxy(config)
    kind, scope_id = ("session", args.session) if args.session else ("execution", args.execution)
    scope = {f"{kind}_id": scope_id}
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, headers=headers, timeout=_TIMEOUT, verify=verify) as client:
        try:
            listing = client.get("/v1/artifacts/list", params=scope)
        except httpx.HTTPError as exc:
            raise Failed(
                f"cannot reach the proxy at {base}: {exc} (is it running? give --proxy URL or "
                "the --cache-dir it uses)"
            ) from None
        if listing.status_code in (401, 403):
            raise Failed(f"the API refused this key ({_detail(listing)}); nothing was fetched")
        if listing.status_code != 200:
            raise Failed(f"cannot list {kind} {scope_id}: {_detail(listing)}")
        try:
            items = listing.json()["items"]
        except (ValueError, KeyError, TypeError):
            items = None
        if not isinstance(items, list):
            raise Failed(f"the listing of {kind} {scope_id} is not in the API's shape")
        objects = list(
            dict.fromkeys(
                str(item["object_id"])
                for item in items
                if isinstance(item, dict) and item.get("object_id")
            )
        )
        unnamed = sum(1 for item in items if not (isinstance(item, dict) and item.get("object_id")))
        tally = Tally()
        progress = Progress("warm", len(objects))
        try:
            for object_id in objects:
                try:
                    _warm_one(client, {"object_id": object_id, **scope}, progress, tally)
                except httpx.HTTPError as exc:
                    tally.failed.append((object_id, f"transfer failed: {exc!r}"))
                    progress.note(f"failed   {object_id}: transfer failed")
                progress.advance(items=1)
        except KeyRefused as exc:
            progress.finish()
            raise Failed(f"the API refused this key ({exc}); stopped") from None
        progress.finish()
    print(
        f"{kind} {scope_id}: fetched {tally.fetched} ({human_size(tally.fetched_bytes)}), "
        f"{tally.cached} already cached, {len(tally.failed)} failed"
        + (f"; skipped {unnamed} listed {_items(unnamed)} without an object_id" if unnamed else "")
    )
    return 1 if tally.failed else 0


def _items(count: int) -> str:
    return "item" if count == 1 else "items"
