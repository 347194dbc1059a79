"""The upstream pool (proxy/transport.py) keeps its idle connections under many requests at once.

httpcore 1.0's pool closes an idle connection whenever more than ``max_keepalive_connections``
are open in all, busy ones included: under a burst, every answer's connection is closed and
the next request connects (and, against the real API, shakes hands) again. These tests hold
requests open at a loopback upstream that counts its connections.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import httpx
import pytest

from proxy.transport import transport
from tests.rawupstream import RawUpstream, framed


@pytest.fixture
def upstream() -> Iterator[RawUpstream]:
    server = RawUpstream().start()
    yield server
    server.stop()


def connections(upstream: RawUpstream) -> int:
    return len({number for number, _head in upstream.requests})


def test_idle_connections_stay_while_others_are_busy(upstream: RawUpstream) -> None:
    """40 requests at once (limit 32 kept alive); 20 answered while 20 stay busy: the 20 idle
    ones are kept, and the next 20 requests, all at once, reuse them without a new connection."""
    arrived = threading.Barrier(40, timeout=20)
    arrived_again = threading.Barrier(20, timeout=20)
    release = threading.Event()

    def answer(path: str, n: int) -> bytes:
        if path.startswith("/first"):
            arrived.wait()  # all 40 connections are open before any answer
        if path.startswith("/again"):
            arrived_again.wait()  # 20 at once: none waits for another's connection
        if path.startswith("/first/held"):
            release.wait(20)
        return framed(path.encode())

    upstream.answer = answer
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=32)

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=transport(limits), base_url=upstream.url) as client:
            held = [asyncio.create_task(client.get(f"/first/held/{i}")) for i in range(20)]
            quick = await asyncio.gather(*(client.get(f"/first/quick/{i}") for i in range(20)))
            assert [r.text for r in quick] == [f"/first/quick/{i}" for i in range(20)]
            assert connections(upstream) == 40
            again = await asyncio.gather(*(client.get(f"/again/{i}") for i in range(20)))
            assert [r.text for r in again] == [f"/again/{i}" for i in range(20)]
            assert connections(upstream) == 40  # each of the 20 went out on an idle connection
            release.set()
            assert all(r.status_code == 200 for r in await asyncio.gather(*held))
            pool = client._transport._pool  # type: ignore[attr-defined]
            assert len(pool.connections) == 32  # the keep-alive limit still holds

    asyncio.run(scenario())


def test_a_burst_over_max_connections_waits_its_turn(upstream: RawUpstream) -> None:
    """More requests than connections: every one is answered, on at most max_connections."""
    upstream.answer = lambda path, n: framed(path.encode())
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=2)

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=transport(limits), base_url=upstream.url) as client:
            answers = await asyncio.gather(*(client.get(f"/n/{i}") for i in range(50)))
            assert [r.text for r in answers] == [f"/n/{i}" for i in range(50)]
            assert connections(upstream) <= 4
            pool = client._transport._pool  # type: ignore[attr-defined]
            assert len(pool.connections) <= 2

    asyncio.run(scenario())


def test_a_connection_made_for_a_request_that_is_cancelled_is_not_kept(
    upstream: RawUpstream,
) -> None:
    """The attack: with the pool full, a waiting request is given a *new* connection (the busy
    one closed: ``Connection: close``) and is cancelled (its deadline, its client gone) before
    it runs. That connection never connected, is neither idle nor given, and was kept forever:
    one of ``max_connections`` lost per such race, until every request waits for a pool
    timeout. The pass drops a new connection no request holds."""

    def answer(path: str, n: int) -> bytes:
        if path == "/busy":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy"
        return framed(path.encode())

    upstream.answer = answer
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    timeout = httpx.Timeout(10, pool=3)

    async def scenario() -> None:
        async with httpx.AsyncClient(
            transport=transport(limits), base_url=upstream.url, timeout=timeout
        ) as client:
            pool = client._transport._pool  # type: ignore[attr-defined]
            async with client.stream("GET", "/busy") as busy:  # its connection, until closed
                waiting = asyncio.create_task(client.get("/waiting"))
                await asyncio.sleep(0)  # its task runs up to its wait for a connection
                assert len(pool._requests) == 2  # one sent, one queued
                assert await busy.aread() == b"busy"
            # Closing it closed its connection, and gave the waiting request a new one, in this
            # task: the waiting one has not run since. Cancel it now.
            [queued] = pool._requests
            fresh = queued.connection
            assert fresh is not None and fresh._connection is None
            assert not fresh._request_lock._backend  # never entered: not connecting
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert (await client.get("/next")).text == "/next"  # a PoolTimeout on main
            assert len(pool.connections) <= 1

    asyncio.run(scenario())
