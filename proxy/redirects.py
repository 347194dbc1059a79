"""Where an artifact fetch may be redirected, and with which credential.

The API (or a CDN behind it) may answer an artifact request with a redirect. The proxy follows
it server-side, so that the final bytes can be cached, but only to places a remote user could not
use to reach the proxy's own network:

* the upstream's own origin (same scheme, host and port): followed with ``Authorization``;
* an ``https`` URL whose host is, or resolves only to, public (globally routable) addresses:
  followed *without* ``Authorization``;
* anything else (plain http elsewhere, loopback, private, link-local or metadata addresses, a
  name resolving to any such address, a malformed location): refused, with a 502.

A refused chain never caches bytes and never records an access proof.

Limit: a host name is resolved for the check and again by the connection, so a DNS server that
changes its answer in between (rebinding) could still steer one request; pinning the checked
address would close that and is not done.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable

import anyio
import httpx

#: Redirects followed for one fetch at most.
MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

Resolver = Callable[[str], Awaitable[list[str]]]


async def resolve(host: str) -> list[str]:
    """Every address ``host`` resolves to (empty if it does not)."""
    try:
        infos = await anyio.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return [str(info[4][0]) for info in infos]


def is_public(address: str) -> bool:
    """True for a globally routable unicast address (not loopback, private, link-local...).

    An IPv6 address that carries an IPv4 one (mapped, compatible, 6to4, Teredo) must carry a
    public one too: ``::7f00:1`` is 127.0.0.1 in disguise.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if not ip.is_global or ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
        if ip.packed[:12] == bytes(12):  # IPv4-compatible (deprecated) ::a.b.c.d
            embedded.append(ipaddress.IPv4Address(ip.packed[12:]))
        return all(is_public(str(v4)) for v4 in embedded if v4 is not None)
    return True


def same_origin(url: httpx.URL, origin: httpx.URL) -> bool:
    return (url.scheme, url.host, url.port) == (origin.scheme, origin.host, origin.port)


async def allowed(url: httpx.URL, origin: httpx.URL, resolver: Resolver = resolve) -> bool:
    """Whether a redirect to ``url`` may be followed by a proxy whose upstream is ``origin``."""
    if same_origin(url, origin):
        return True
    if url.scheme != "https" or not url.host:
        return False
    try:
        literal = ipaddress.ip_address(url.host)
    except ValueError:
        addresses = await resolver(url.host)
    else:
        addresses = [str(literal)]
    return bool(addresses) and all(is_public(address) for address in addresses)
