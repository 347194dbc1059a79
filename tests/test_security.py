"""Attacks on a shared proxy through the upstream and the wire: each test performs the attack
against a real proxy and a stand-in API that misbehaves on demand, and shows it fail."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterator

import anyio
import httpx
import pytest
import trustme

from proxy.config import load
from proxy.errors import ProxyError
from proxy.redirects import allowed, is_public
from proxy.transport import SharedClient, transport
from proxy.upstream import Upstream
from tests.conftest import OTHER_TOKEN, SESSION, TOKEN
from tests.helpers import auth, fetch
from tests.rawupstream import RawUpstream, framed
from tests.servers import ServerThread
from tests.standin import Fault, StandIn


def raw_exchange(server: ServerThread, request: bytes) -> bytes:
    """Send ``request`` as is on a new connection; everything the server answered until it
    closed (the request should say ``Connection: close``)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return data


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> bytes:
    return answer.split(b"\r\n\r\n", 1)[1]


# -- 1. cookies ---------------------------------------------------------------------------------


def test_upstream_cookies_are_never_replayed_to_other_users(standin: StandIn, proxy) -> None:
    """A Set-Cookie answered to Alice never goes upstream with anyone's later request; a
    client's own Cookie goes with that request only."""
    standin.set_cookie = "session=alice-private; Path=/"
    standin.add("session", SESSION, "img_c00c1e")
    assert httpx.get(f"{proxy.url}/v1/health", headers=auth(TOKEN)).status_code == 200
    assert fetch(proxy, "img_c00c1e").status_code == 200
    own = httpx.get(f"{proxy.url}/v1/health", headers={**auth(OTHER_TOKEN), "Cookie": "bob=1"})
    assert own.status_code == 200
    assert httpx.get(f"{proxy.url}/v1/health", headers=auth(OTHER_TOKEN)).status_code == 200
    assert fetch(proxy, "img_c00c1e", OTHER_TOKEN).status_code == 404
    cookies = [
        h.get("cookie")
        for path in ("/v1/health", "/v1/artifacts")
        for h in standin.headers_seen(path)
    ]
    assert cookies.count("bob=1") == 1
    assert all(cookie in (None, "bob=1") for cookie in cookies), cookies


# -- 3. connection desync -------------------------------------------------------------------------


@pytest.fixture
def raw_upstream() -> Iterator[RawUpstream]:
    server = RawUpstream().start()
    yield server
    server.stop()


def test_an_overlong_answer_never_reaches_the_next_user(start_proxy, raw_upstream) -> None:
    """An upstream that writes past its Content-Length poisons only its own connection: the next
    request, through a pool of one connection, gets its own answer, not the extra bytes."""
    smuggled = framed(b"STOLEN")
    raw_upstream.answer = lambda path, n: (
        framed(b"hello", extra=smuggled)
        if path == "/v1/overlong"
        else framed(f"answer to {path} on connection {n}".encode())
    )
    proxy = start_proxy(upstream=raw_upstream.url, max_connections=1)
    first = httpx.get(f"{proxy.url}/v1/overlong", headers=auth())
    assert first.content == b"hello"
    second = httpx.get(f"{proxy.url}/v1/other", headers=auth(OTHER_TOKEN))
    assert second.content == b"answer to /v1/other on connection 2"


def test_an_overlong_answer_read_ahead_past_its_end_never_reaches_the_next_user(
    start_proxy, raw_upstream
) -> None:
    """The same attack, with the answer ending exactly where the HTTP client's read of 64 KiB
    does: the extra bytes were not in that read, but the event loop had already taken them off
    the socket (uvloop reads up to 256 KB at once), so neither the parser's leftover nor a
    look at the idle socket finds them. The connection must not be reused all the same."""
    smuggled = framed(b"STOLEN")
    head = len(framed(b"x" * 60_000)) - 60_000
    exact = b"x" * (65_536 - head)  # the answer: head and body, 64 KiB exactly
    raw_upstream.answer = lambda path, n: (
        framed(exact, extra=smuggled)
        if path == "/v1/overlong"
        else framed(f"answer to {path} on connection {n}".encode())
    )
    proxy = start_proxy(upstream=raw_upstream.url, max_connections=1)
    first = httpx.get(f"{proxy.url}/v1/overlong", headers=auth())
    assert first.content == exact
    second = httpx.get(f"{proxy.url}/v1/other", headers=auth(OTHER_TOKEN))
    assert second.content == b"answer to /v1/other on connection 2"


def _chunked(body: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


def _sized(build: Callable[[bytes], bytes], size: int) -> bytes:
    """``build(body)`` for the body that makes the whole answer ``size`` bytes long."""
    probe = size - 200  # its length field as long as the answer's
    answer = build(b"x" * (size - (len(build(b"x" * probe)) - probe)))
    assert len(answer) == size
    return answer


@pytest.mark.parametrize("framing", ["chunked", "interim", "trailers", "close", "http/1.0"])
def test_more_bytes_after_an_answer_of_another_framing_never_reach_the_next_user(
    start_proxy, raw_upstream, framing: str
) -> None:
    """The read-ahead attack with other framings, each answer ending exactly at the HTTP
    client's 64 KiB read: a chunked body, an answer after a 100 Continue, a chunked body with
    trailers, an answer that says ``Connection: close`` (or is HTTP/1.0) and leaves the
    connection open. The bytes behind it never answer the next user's request."""
    builds: dict[str, Callable[[bytes], bytes]] = {
        "chunked": _chunked,
        "interim": lambda body: b"HTTP/1.1 100 Continue\r\n\r\n" + framed(body),
        "trailers": lambda body: _chunked(body)[:-2] + b"X-Checksum: 1\r\n\r\n",
        "close": lambda body: framed(body).replace(
            b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1
        ),
        "http/1.0": lambda body: framed(body).replace(b"HTTP/1.1", b"HTTP/1.0", 1),
    }
    answer = _sized(builds[framing], 65_536)
    raw_upstream.answer = lambda path, n: (
        answer + framed(b"STOLEN")
        if path == "/v1/first"
        else framed(f"answer to {path} on connection {n}".encode())
    )
    proxy = start_proxy(upstream=raw_upstream.url, max_connections=1)
    first = httpx.get(f"{proxy.url}/v1/first", headers=auth())
    assert first.status_code == 200 and set(first.content) == {ord("x")}
    second = httpx.get(f"{proxy.url}/v1/other", headers=auth(OTHER_TOKEN))
    assert second.content == b"answer to /v1/other on connection 2"


def test_a_client_that_hangs_up_mid_answer_leaves_no_bytes_for_the_next_user(
    start_proxy, raw_upstream
) -> None:
    """A client that reads part of a passed-through answer and hangs up: the rest of that
    answer, still coming, is never read as the next user's answer on a reused connection."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 400000\r\n\r\n"
    raw_upstream.answer = lambda path, n: (
        [head + b"a" * 200_000, b"b" * 200_000]
        if path == "/v1/first"
        else framed(f"answer to {path} on connection {n}".encode())
    )
    proxy = start_proxy(upstream=raw_upstream.url, max_connections=1)
    with httpx.stream("GET", f"{proxy.url}/v1/first", headers=auth(), timeout=20) as first:
        assert next(first.iter_raw())[:1] == b"a"
    # The one connection is busy until the proxy has given up the first answer: the second
    # request waits for it, then must not read the rest of that answer as its own.
    second = httpx.get(f"{proxy.url}/v1/other", headers=auth(OTHER_TOKEN), timeout=20)
    assert second.content == b"answer to /v1/other on connection 2"


@pytest.mark.parametrize("overlong", [False, True], ids=["exact", "overlong"])
def test_a_tls_connection_is_reused_only_after_an_answer_that_ended_exactly(
    overlong: bool,
) -> None:
    """Over TLS, bytes past an answer can also wait in the TLS layer (records not yet
    decrypted, or decrypted and not yet read). The proxy's pool of one connection reuses it
    after an exact answer, and opens another after one of 64 KiB followed by more."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    upstream = RawUpstream(tls=server_context).start()
    head = len(framed(b"x" * 60_000)) - 60_000
    exact = b"x" * (65_536 - head)
    upstream.answer = lambda path, n: (
        framed(exact, extra=framed(b"STOLEN") if overlong else b"")
        if path == "/first"
        else framed(f"answer to {path} on connection {n}".encode())
    )

    async def two_requests() -> tuple[bytes, bytes]:
        pool = transport(httpx.Limits(max_connections=1), verify=client_context)
        async with SharedClient(transport=pool, base_url=upstream.url) as client:
            first = await client.get("/first")
            second = await client.get("/second")
        return first.content, second.content

    try:
        first, second = anyio.run(two_requests)
    finally:
        upstream.stop()
    assert first == exact
    assert second == f"answer to /second on connection {2 if overlong else 1}".encode()


def test_a_request_body_never_rides_on_a_get(start_proxy, raw_upstream) -> None:
    """A GET (or HEAD, OPTIONS) with a body, a body that would be read upstream as a second,
    smuggled request, is refused with a 400 and nothing reaches the upstream."""
    proxy = start_proxy(upstream=raw_upstream.url)
    smuggled = b"GET /v1/smuggled HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer victim\r\n\r\n"
    for method in (b"GET", b"HEAD", b"OPTIONS"):
        answer = raw_exchange(
            proxy,
            method + b" /v1/health HTTP/1.1\r\nHost: p\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(smuggled)).encode() + b"\r\n\r\n" + smuggled,
        )
        assert status_of(answer) == 400, answer
    chunked = raw_exchange(
        proxy,
        b"GET /v1/health HTTP/1.1\r\nHost: p\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + f"{len(smuggled):x}\r\n".encode()
        + smuggled
        + b"\r\n0\r\n\r\n",
    )
    assert status_of(chunked) == 400
    assert json.loads(body_of(chunked))["detail"]
    delete = raw_exchange(
        proxy,
        b"DELETE /v1/files/f1 HTTP/1.1\r\nHost: p\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
    )
    assert status_of(delete) == 411
    assert raw_upstream.requests == []
    framed_delete = httpx.request("DELETE", f"{proxy.url}/v1/files/f1", content=b"abcd")
    assert framed_delete.status_code == 200  # a body with a length is forwarded, framed
    assert len(raw_upstream.requests) == 1


# -- 4. redirects ---------------------------------------------------------------------------------


class _Elsewhere:
    """Another origin on loopback, counting the requests it gets."""

    def __init__(self) -> None:
        self.requests = 0

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        self.requests += 1
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"Content-Type", b"video/mp4"), (b"Content-Length", b"5")],
            }
        )
        await send({"type": "http.response.body", "body": b"inner"})


def test_redirect_to_a_local_address_is_refused(standin: StandIn, proxy) -> None:
    """A redirect to another loopback port (an internal service) is not followed: a 502,
    nothing cached, no proof recorded, and the target never contacted."""
    standin.add("session", SESSION, "vid_4ed140")
    elsewhere = _Elsewhere()
    server = ServerThread(elsewhere).start()
    try:
        standin.faults["vid_4ed140"] = Fault(redirect_to=f"{server.url}/admin/secret")
        first = fetch(proxy, "vid_4ed140")
        second = fetch(proxy, "vid_4ed140")
    finally:
        server.stop()
    assert first.status_code == second.status_code == 502
    assert "does not follow" in first.json()["detail"]
    assert elsewhere.requests == 0
    assert standin.hits("session", SESSION, "vid_4ed140") == 2  # never cached
    access = proxy.app.state.services.access
    assert not access.has_proof(access.fingerprint(f"Bearer {TOKEN}"), ("session", SESSION))


def test_redirect_within_the_upstream_origin_is_followed(standin: StandIn, proxy) -> None:
    """A redirect to the upstream's own origin is followed with the credential and cached."""
    body = standin.add("session", SESSION, "vid_5a4e00")
    standin.faults["vid_5a4e00"] = Fault(
        redirect_to=f"/_standin/blob/session/{SESSION}/vid_5a4e00", times=1
    )
    first = fetch(proxy, "vid_5a4e00")
    assert (first.status_code, first.content) == (200, body)
    assert fetch(proxy, "vid_5a4e00").headers["x-cache"] == "HIT"
    blob = standin.headers_seen(f"/_standin/blob/session/{SESSION}/vid_5a4e00")
    assert blob[0]["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize(
    ("target", "addresses", "expected"),
    [
        ("https://cdn.example/x", ["93.184.216.34"], True),
        ("https://cdn.example/x", ["2606:2800:220:1:248:1893:25c8:1946"], True),
        ("http://cdn.example/x", ["93.184.216.34"], False),  # plain http elsewhere
        ("https://cdn.example/x", ["93.184.216.34", "10.0.0.7"], False),  # one private answer
        ("https://cdn.example/x", [], False),  # does not resolve
        ("https://127.0.0.1/x", [], False),
        ("https://10.1.2.3/x", [], False),
        ("https://192.168.0.1/x", [], False),
        ("https://169.254.169.254/latest/meta-data", [], False),  # cloud metadata
        ("https://[::1]/x", [], False),
        ("https://[::ffff:127.0.0.1]/x", [], False),
        ("https://[fd00::1]/x", [], False),
        ("https://0.0.0.0/x", [], False),
        ("https://93.184.216.34/x", [], True),
        ("http://127.0.0.1:9/other/path", [], True),  # the upstream's own origin
        ("http://127.0.0.1:10/x", [], False),  # another port of the same host
    ],
)
def test_redirect_address_policy(target: str, addresses: list[str], expected: bool) -> None:
    """Only the upstream's origin, or https to public addresses only, may be followed."""

    async def resolver(_host: str) -> list[str]:
        return addresses

    origin = httpx.URL("http://127.0.0.1:9")
    assert anyio.run(allowed, httpx.URL(target), origin, resolver) is expected


def test_is_public_rejects_special_ranges() -> None:
    """Loopback, private, link-local, unspecified and malformed addresses are not public."""
    assert is_public("8.8.8.8")
    for address in ("127.0.0.1", "10.0.0.1", "172.16.0.1", "100.64.0.1", "::", "fe80::1", "x"):
        assert not is_public(address), address


def test_authorization_never_leaves_the_upstream_origin() -> None:
    """Following an allowed cross-origin redirect (a public CDN, which no test may contact:
    httpx's MockTransport stands in for it) drops the credential."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "api.example":
            return httpx.Response(302, headers={"Location": "https://cdn.example/blob"})
        return httpx.Response(200, content=b"bytes", headers={"Content-Type": "video/mp4"})

    async def resolver(_host: str) -> list[str]:
        return ["93.184.216.34"]

    async def run() -> bytes:
        upstream = Upstream(load(env={}, flags={"upstream": "https://api.example"}), resolver)
        upstream.artifact_client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        request = upstream.request(
            "GET", b"/v1/artifacts?object_id=vid_a&session_id=s", [(b"Authorization", b"Bearer k")]
        )
        async with upstream.stream(request, artifact=True) as response:
            return await response.aread()

    assert anyio.run(run) == b"bytes"
    assert [r.url.host for r in seen] == ["api.example", "cdn.example"]
    assert seen[0].headers["authorization"] == "Bearer k"
    assert "authorization" not in seen[1].headers


# -- 5. content encoding ------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_fills_are_stored_and_served_decoded(
    standin: StandIn, proxy, encoding: str
) -> None:
    """An upstream that compresses although asked for identity is decoded while it streams:
    the first client and every hit get the artifact's own bytes, correctly framed."""
    body = standin.add("session", SESSION, "doc_90a1b2", size=300_000)
    standin.compress = encoding
    for expected in ("MISS", "HIT"):
        with httpx.stream(
            "GET",
            f"{proxy.url}/v1/artifacts?object_id=doc_90a1b2&session_id={SESSION}",
            headers={**auth(), "Accept-Encoding": "identity"},
        ) as response:
            raw = b"".join(response.iter_raw())
        assert response.headers["x-cache"] == expected
        assert "content-encoding" not in response.headers
        assert raw == body
        if "content-length" in response.headers:
            assert int(response.headers["content-length"]) == len(raw)
    assert fetch(proxy, "doc_90a1b2").headers["etag"] == f'"{hashlib.sha256(body).hexdigest()}"'


def test_an_unknown_coding_is_relayed_as_sent_and_not_cached(standin: StandIn, proxy) -> None:
    """A coding the proxy does not undo reaches the client with its Content-Encoding and exact
    length, and is not stored."""
    body = standin.add("session", SESSION, "arr_b40000", size=50_000)
    standin.compress = "br"  # the stand-in's bytes are gzip, labelled br: the proxy must not care
    for _ in range(2):
        with httpx.stream(
            "GET",
            f"{proxy.url}/v1/artifacts?object_id=arr_b40000&session_id={SESSION}",
            headers=auth(),
        ) as response:
            raw = b"".join(response.iter_raw())
        assert response.headers["content-encoding"] == "br"
        assert int(response.headers["content-length"]) == len(raw)
        assert gzip.decompress(raw) == body
    assert standin.hits("session", SESSION, "arr_b40000") == 2


def test_a_truncated_compressed_body_is_never_cached(standin: StandIn, proxy) -> None:
    """A gzip body that ends early fails the transfer and leaves nothing in the cache."""
    body = standin.add("session", SESSION, "vid_7c0000", size=200_000)
    standin.compress = "gzip"
    coded = gzip.compress(body)
    standin.faults["vid_7c0000"] = Fault(cut_at=len(coded) // 2, times=1)
    with pytest.raises(httpx.HTTPError):
        fetch(proxy, "vid_7c0000")
    again = fetch(proxy, "vid_7c0000")
    assert (again.headers["x-cache"], again.content) == ("MISS", body)


# -- 6. passthrough headers -----------------------------------------------------------------------


def test_passthrough_forwards_the_clients_headers_only(standin: StandIn, proxy) -> None:
    """Upstream gets exactly the client's end-to-end headers (plus Host), none of httpx's
    defaults, and the answer carries one Date."""
    answer = raw_exchange(
        proxy,
        f"GET /v1/echo HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {TOKEN}\r\n"
        "X-Custom: 1\r\nConnection: close\r\n\r\n".encode(),
    )
    assert status_of(answer) == 200
    (headers,) = standin.headers_seen("/v1/echo")
    assert set(headers) == {"host", "authorization", "x-custom"}, headers
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.count(b"\r\ndate:") == 1


# -- 7. malformed credentials and request forms ----------------------------------------------


def test_non_ascii_authorization_gets_a_400_and_goes_nowhere(standin: StandIn, proxy) -> None:
    """A credential with non-ASCII or control bytes is refused in the API's shape, on a cached
    key and on an uncached one, and never forwarded."""
    standin.add("session", SESSION, "img_a5c111")
    standin.add("session", SESSION, "img_a5c222")
    assert fetch(proxy, "img_a5c111").status_code == 200
    before = standin.hits("session", SESSION, "img_a5c222")
    for object_id in ("img_a5c111", "img_a5c222"):
        for value in (b"Bearer caf\xc3\xa9", b"Bearer \x01x", b"Bearer \xff"):
            answer = raw_exchange(
                proxy,
                f"GET /v1/artifacts?object_id={object_id}&session_id={SESSION} HTTP/1.1\r\n"
                "Host: p\r\nConnection: close\r\n".encode()
                + b"Authorization: "
                + value
                + b"\r\n\r\n",
            )
            assert status_of(answer) == 400, answer
            if value != b"Bearer \x01x":  # that one the HTTP parser itself refuses
                assert "ASCII" in json.loads(body_of(answer))["detail"]
    assert standin.hits("session", SESSION, "img_a5c222") == before == 0


def test_options_asterisk_is_not_a_500(proxy) -> None:
    """``OPTIONS *`` gets a 501 in the API's shape."""
    answer = raw_exchange(proxy, b"OPTIONS * HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
    assert status_of(answer) == 501
    assert json.loads(body_of(answer))["detail"]


def test_a_client_leaving_mid_upload_logs_no_traceback(standin: StandIn, proxy) -> None:
    """A client that disconnects during an upload costs one debug line, not an error."""
    left = threading.Event()
    records: list[logging.LogRecord] = []

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)
            if "during its upload" in record.getMessage():
                left.set()

    watch, root = Watch(level=logging.DEBUG), logging.getLogger()
    previous = root.level
    root.addHandler(watch)
    root.setLevel(logging.DEBUG)
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as conn:
            conn.sendall(
                f"POST /v1/files?purpose=assistants HTTP/1.1\r\nHost: p\r\nAuthorization: "
                f"Bearer {TOKEN}\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                "Content-Length: 1000000\r\n\r\n".encode()
                + b"x" * 1000
            )
        assert left.wait(10)
        assert httpx.get(f"{proxy.url}/v1/health", headers=auth()).status_code == 200
    finally:
        root.removeHandler(watch)
        root.setLevel(previous)
    assert not [r for r in records if r.levelno >= logging.ERROR or r.exc_info]


# -- found by review: late answers, duplicate credentials, hops, codings ------------------------


@pytest.mark.parametrize("first", ["head", "204"])
def test_a_late_body_after_a_bodiless_answer_never_reaches_the_next_user(
    start_proxy, raw_upstream, first: str
) -> None:
    """An upstream that sends a body after a HEAD answer or a 204 (late, in a second write)
    loses that connection: the next user's request goes out on a new one."""
    late = framed(b'{"secret": "user A private data"}')
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 33\r\n\r\n"
    nothing = b"HTTP/1.1 204 No Content\r\n\r\n"
    raw_upstream.answer = lambda path, n: (
        [head if first == "head" else nothing, late]
        if path == "/v1/first"
        else framed(f"answer to {path} on connection {n}".encode())
    )
    proxy = start_proxy(upstream=raw_upstream.url, max_connections=1)
    method = "HEAD" if first == "head" else "GET"
    assert httpx.request(method, f"{proxy.url}/v1/first", headers=auth()).status_code in (200, 204)
    second = httpx.get(f"{proxy.url}/v1/other", headers=auth(OTHER_TOKEN))
    assert second.content == b"answer to /v1/other on connection 2"


def test_an_idle_connection_that_turns_readable_is_never_reused(start_proxy, raw_upstream) -> None:
    """Bytes an upstream writes on a connection after its framed answer, while the connection
    sits idle in the pool, make it expire (the pool polls every idle socket at once): the next
    user's request goes out on a new connection and gets its own answer."""
    raw_upstream.answer = lambda path, n: (
        [framed(b"first"), b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"]
        if path == "/v1/first"
        else framed(f"answer to {path} on connection {n}".encode())
    )
    proxy = start_proxy(upstream=raw_upstream.url, max_connections=4)
    assert httpx.get(f"{proxy.url}/v1/first", headers=auth()).content == b"first"
    assert raw_upstream.answered.wait(10)  # the unasked answer is in the idle socket now
    second = httpx.get(f"{proxy.url}/v1/other", headers=auth(OTHER_TOKEN))
    assert second.content == b"answer to /v1/other on connection 2"


def test_a_duplicate_credential_on_passthrough_gets_a_400(standin: StandIn, proxy) -> None:
    """Two Authorization headers (a way to be counted as another key) are refused everywhere."""
    answer = raw_exchange(
        proxy,
        f"GET /v1/health HTTP/1.1\r\nHost: p\r\nConnection: close\r\nAuthorization: junk-1\r\n"
        f"Authorization: Bearer {TOKEN}\r\n\r\n".encode(),
    )
    assert status_of(answer) == 400
    assert standin.path_hits["/v1/health"] == 0


def test_connection_cannot_strip_the_credential(standin: StandIn, proxy) -> None:
    """``Connection: authorization`` does not drop the credential on its way upstream."""
    response = httpx.get(
        f"{proxy.url}/v1/echo", headers={**auth(), "Connection": "keep-alive, authorization"}
    )
    assert response.status_code == 200
    (headers,) = standin.headers_seen("/v1/echo")
    assert headers["authorization"] == f"Bearer {TOKEN}"


def test_a_malformed_location_on_a_passed_through_answer_is_relayed(
    start_proxy, raw_upstream
) -> None:
    """A redirect the proxy only relays is relayed as it came, whatever its Location."""
    raw_upstream.answer = lambda path, n: (
        b"HTTP/1.1 302 Found\r\nLocation: https:\\\\127.0.0.1\\x\r\nContent-Length: 0\r\n\r\n"
    )
    proxy = start_proxy(upstream=raw_upstream.url)
    answer = raw_exchange(  # a raw client: httpx itself refuses such a Location
        proxy, b"GET /v1/somewhere HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
    )
    assert status_of(answer) == 302
    assert b"\r\nlocation: https:\\\\127.0.0.1\\x\r\n" in answer.lower()


def test_a_failing_redirect_target_is_not_the_apis_fault() -> None:
    """A CDN that cannot be reached is a 502 for that fetch, not a breaker fault, and does not
    put the proxy offline (no traffic leaves the machine: a MockTransport is the CDN)."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "api.example":
            return httpx.Response(302, headers={"Location": "https://cdn.example/blob"})
        raise httpx.ConnectError("cdn down", request=request)

    async def resolver(_host: str) -> list[str]:
        return ["93.184.216.34"]

    async def run() -> tuple[int, str, bool]:
        config = load(env={}, flags={"upstream": "https://api.example", "breaker_threshold": 1})
        upstream = Upstream(config, resolver)
        upstream.artifact_client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        request = upstream.request("GET", b"/v1/artifacts?object_id=vid_a&session_id=s", [])
        try:
            async with upstream.stream(request, artifact=True):
                raise AssertionError("no answer expected")
        except ProxyError as exc:
            return exc.status_code, upstream.breaker.state, upstream.up
        raise AssertionError("unreachable")

    assert anyio.run(run) == (502, "closed", True)


def test_a_gzip_bomb_is_never_written_out(standin: StandIn, start_proxy, cache_dir) -> None:
    """A small gzip body that expands a thousandfold is abandoned (a failed transfer, nothing
    stored) and then passed through coded, for the client to decode itself."""
    proxy = start_proxy(max_size="64MiB")
    bomb = bytes(32 * 1024 * 1024)
    standin.artifacts[("session", SESSION, "arr_b0b000")] = (bomb, "application/octet-stream")
    standin.compress = "gzip"
    with pytest.raises(httpx.HTTPError):
        fetch(proxy, "arr_b0b000")
    stored = sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file())
    assert stored < 8 * 1024 * 1024
    again = fetch(proxy, "arr_b0b000")
    assert again.headers["content-encoding"] == "gzip" and again.content == bomb


def test_ipv6_forms_of_private_addresses_are_not_public() -> None:
    """IPv4-compatible, mapped, 6to4 and Teredo forms of private addresses are refused."""
    for address in ("::7f00:1", "::ffff:10.0.0.1", "2002:7f00:1::1", "2002:a00:1::"):
        assert not is_public(address), address
    assert is_public("2002:5db8:d822::1")  # 6to4 of a public address
