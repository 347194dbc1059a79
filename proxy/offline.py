"""What the proxy answers itself while the VLM Run API cannot be reached.

The Python SDK sends ``GET /v1/health`` when a client is constructed and refuses to go on unless
it gets a 200; it retries a 5xx for ~15 s. Relaying a 502 there would lock a laptop user out of
artifacts the cache holds. So while the API is unreachable (no connection could be made, or the
circuit breaker is open) the proxy answers that request itself, at once:

* a 200 for a credential the API accepted within ``offline_proof_ttl`` (any live proof);
* a 403 for any other credential (the SDK does not retry it): an unknown key is never told it is
  valid.

Both carry ``X-Cache: OFFLINE``. A 5xx from a *reachable* API is relayed as it came.
"""

from __future__ import annotations

import re

from starlette.responses import Response

from proxy.access import AccessProofs
from proxy.errors import json_response
from proxy.threads import run_sync

HEALTH_PATH = "/v1/health"
OFFLINE = (b"X-Cache", b"OFFLINE")
_SLASHES = re.compile(r"/{2,}")


def is_health(method: str, path: str) -> bool:
    """The SDK's health check, also as ``/v1//health`` (a base URL with a trailing slash)."""
    return method == "GET" and _SLASHES.sub("/", path) == HEALTH_PATH


async def health(access: AccessProofs, authorization: str | None) -> Response:
    """The offline answer to ``GET /v1/health`` for this credential."""
    fingerprint = access.fingerprint(authorization)
    if await run_sync(access.has_any_proof, fingerprint, True):
        payload = {"status": "ok", "detail": "VLM Run API unreachable; serving cached artifacts"}
        return json_response(200, payload, [OFFLINE])
    payload = {"detail": "VLM Run API unreachable; no recent proof for this key"}
    return json_response(403, payload, [OFFLINE])
