"""The long-lived parts the routes share, opened and closed by the app's lifespan."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import anyio.to_thread

from proxy.access import AccessProofs
from proxy.config import Config
from proxy.fills import Fills
from proxy.metrics import Metrics
from proxy.passthrough import Passthrough
from proxy.store import Store
from proxy.store.claims import Claims
from proxy.store.disk import TOUCH_FLUSH_SECONDS, DiskStore
from proxy.upstream import Upstream


def prepare_directory(path: str) -> Path:
    """Create the cache directory owner-only (0700): it holds credentials' proofs and the secret."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    return directory


class Services:
    """Config and metrics from construction; the rest exists between :meth:`open` and close."""

    store: Store
    access: AccessProofs
    upstream: Upstream
    fills: Fills
    passthrough: Passthrough

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.serving = False

    async def open(self) -> None:
        config = self.config
        directory = await anyio.to_thread.run_sync(prepare_directory, config.cache_dir)
        self.store = await anyio.to_thread.run_sync(
            lambda: DiskStore(
                directory,
                max_bytes=config.max_size,
                max_object_bytes=config.object_size_limit,
                on_evict=self.metrics.evicted,
                on_reset=self.metrics.store_failures.labels("index").inc,
            )
        )
        self.access = await anyio.to_thread.run_sync(AccessProofs, directory, config.proof_ttl)
        self.upstream = Upstream(config)
        self.fills = Fills(
            config, self.upstream, self.store, self.access, self.metrics, Claims(directory)
        )
        self.passthrough = Passthrough(self.upstream, self.metrics)
        self._housekeeping = asyncio.create_task(self._flush_touches_periodically())
        # After start-up, not during it: the scan is proportional to the number of entries.
        self._sweep = asyncio.create_task(anyio.to_thread.run_sync(self.store.sweep_orphans))
        self.serving = True

    async def _flush_touches_periodically(self) -> None:
        """Every :data:`TOUCH_FLUSH_SECONDS`: persist access times, and pick up scopes another
        worker process split (so a split reaches every worker within that time)."""
        while True:
            await anyio.sleep(TOUCH_FLUSH_SECONDS)
            await anyio.to_thread.run_sync(self.store.flush_touches)
            await anyio.to_thread.run_sync(self.access.refresh)

    async def close(self) -> None:
        self.serving = False
        self._housekeeping.cancel()
        self._sweep.cancel()
        await self.fills.aclose()
        await self.upstream.aclose()
        await anyio.to_thread.run_sync(self.store.close)
        await anyio.to_thread.run_sync(self.access.close)
