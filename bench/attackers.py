"""Slow clients held against a server, as raw sockets: the attack half of the benchmark's
"hits under attack" row.

    python bench/attackers.py --port N [--silent 400] [--dribble 100] [--interval 0.1] [--seconds 60]

``--silent`` connections connect and send nothing; ``--dribble`` connections send a request head
one byte every ``--interval`` seconds that never ends (a request line, then ``X-Dribble`` header
lines). Whenever the server closes one (its idle or header timeout), it is opened again, so the
count is held for as long as this runs. Prints ``ready`` once every connection is open, and at
the end (``--seconds`` elapsed, or SIGTERM) one JSON line: connections opened, closed by the
server, refused, and open at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import signal
from dataclasses import asdict, dataclass

HEAD = b"GET /v1/artifacts?object_id=arr_8192_attack&session_id=sess_bench HTTP/1.1\r\n"
HEAD += b"Host: 127.0.0.1\r\n"
FIELD = b"X-Dribble: 0\r\n"


@dataclass
class Tally:
    opened: int = 0
    closed_by_server: int = 0
    refused: int = 0
    #: Open now; in the final report, open when the attack was stopped.
    open: int = 0


async def hold(port: int, interval: float | None, tally: Tally, ready: asyncio.Event) -> None:
    """Keep one connection open to ``port``, silent (``interval`` None) or dribbling."""
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            tally.refused += 1
            await asyncio.sleep(0.1)
            continue
        tally.opened += 1
        tally.open += 1
        ready.set()
        until_closed = asyncio.ensure_future(reader.read())  # what the server sends, until EOF
        try:
            if interval is not None:
                await asyncio.sleep(random.uniform(0, interval))  # not all in step
                for byte in itertools.chain(HEAD, itertools.cycle(FIELD)):
                    if until_closed.done():
                        break
                    writer.write(bytes([byte]))
                    await asyncio.sleep(interval)
            await until_closed
        except OSError:
            pass
        finally:
            until_closed.cancel()
            tally.open -= 1
            writer.close()
        tally.closed_by_server += 1


async def attack(args: argparse.Namespace) -> Tally:
    tally = Tally()
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    events = [asyncio.Event() for _ in range(args.silent + args.dribble)]
    intervals = [None] * args.silent + [args.interval] * args.dribble
    tasks = [
        asyncio.create_task(hold(args.port, interval, tally, event))
        for interval, event in zip(intervals, events, strict=True)
    ]

    async def announce() -> None:
        await asyncio.gather(*(event.wait() for event in events))
        print("ready", flush=True)

    tasks.append(asyncio.create_task(announce()))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.seconds):
            await stopped.wait()
    held = tally.open
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    tally.open = held
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--silent", type=int, default=400)
    parser.add_argument("--dribble", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between bytes")
    parser.add_argument("--seconds", type=float, default=60, help="stop after this long")
    args = parser.parse_args()
    tally = asyncio.run(attack(args))
    print(json.dumps(asdict(tally)), flush=True)


if __name__ == "__main__":
    main()
