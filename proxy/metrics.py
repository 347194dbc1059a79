"""Every Prometheus instrument, on a registry owned by the app, label sets created at zero.

No session, execution or object ids and no credentials ever appear in labels. With several
worker processes (``PROMETHEUS_MULTIPROC_DIR`` set by the CLI before they start), values live in
prometheus-client's shared files and ``/metrics`` reports the sum over workers (gauges: the most
recent value, or the largest for the circuit breaker).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from proxy.store import StoreStats

OUTCOMES = ("hit", "miss", "coalesced", "bypass", "error")
SOURCES = ("cache", "shared", "upstream")
TIERS = ("memory", "disk", "redis")
#: Redis failures: unavailable (no answer in time, refused, lost), rejected (a value failed its
#: HMAC or digest: damaged or forged; deleted), other (an error reply).
REDIS_ERRORS = ("unavailable", "rejected", "other")
#: Copies of fills to Redis: stored, present (another replica stored it), too_large
#: (shared_max_object_size), dropped (too many waiting), failed.
REDIS_WRITES = ("stored", "present", "too_large", "dropped", "failed")
#: Fleet single-flight (proxy/fleet.py), per fill that asked Redis for a lease: acquired (this
#: replica fetches), taken_over (acquired after the holder stopped), followed (streamed another
#: replica's fetch from Redis), stored (another replica finished meanwhile), fallback (Redis
#: unavailable or too slow a holder: fetched on its own), unshared (the holder said it will not
#: share, or gave up sharing), resumed (a followed fetch stopped half-way: the rest came from
#: upstream).
LEASE_OUTCOMES = (
    "acquired",
    "taken_over",
    "followed",
    "stored",
    "fallback",
    "unshared",
    "resumed",
)
ACCESS_RESULTS = ("proof", "granted", "denied", "unavailable", "mismatch", "offline")
STORE_FAILURES = ("no_space", "write", "commit", "index", "too_large")
PREFETCH_RESULTS = (
    "fetched",
    "already_cached",
    "refused",
    "too_large",
    "dropped",
    "rate_limited",
    "error",
)
#: prometheus-client's switch for multiprocess mode; must be set before workers start.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "vlmrun_cache_requests",
            "Artifact requests by outcome: hit, miss, coalesced (joined a running fill), bypass "
            "(not cacheable), error (answered with an error status).",
            ["outcome"],
            registry=r,
        )
        self.hits = Counter(
            "vlmrun_cache_hits",
            "Artifact requests served from the cache, by the tier that answered: memory, disk, "
            "redis (the shared tier).",
            ["tier"],
            registry=r,
        )
        self.passthrough = Counter(
            "vlmrun_cache_passthrough_requests",
            "Requests other than artifact fetches, passed to the upstream unchanged.",
            registry=r,
        )
        self.served_bytes = Counter(
            "vlmrun_cache_served_bytes",
            "Artifact body bytes sent to clients, by where they came from: cache (this "
            "replica's memory or disk), shared (Redis), upstream.",
            ["source"],
            registry=r,
        )
        self.upstream_fetch = Histogram(
            "vlmrun_cache_upstream_fetch_seconds",
            "Duration of artifact fetches from the upstream, from request to last byte.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.cache_bytes = Gauge(
            "vlmrun_cache_bytes",
            "Bytes of artifacts in the disk cache.",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.cache_max_bytes = Gauge(
            "vlmrun_cache_max_bytes",
            "Configured upper bound of cached bytes.",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.cache_entries = Gauge(
            "vlmrun_cache_entries",
            "Artifacts in the disk cache.",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.evictions = Counter(
            "vlmrun_cache_evictions", "Entries evicted to make room.", registry=r
        )
        self.evicted_bytes = Counter(
            "vlmrun_cache_evicted_bytes", "Bytes evicted to make room.", registry=r
        )
        self.integrity_failures = Counter(
            "vlmrun_cache_integrity_failures",
            "Cached entries found short, missing or with a wrong digest; each is evicted.",
            registry=r,
        )
        self.access_checks = Counter(
            "vlmrun_cache_access_checks",
            "Decisions on whether a credential may read a cached scope: proof (remembered), "
            "granted or denied (asked upstream), unavailable (upstream could not answer), "
            "mismatch (upstream's answer contradicted the cached one: the scope was split), "
            "offline (the API was unreachable; a proof younger than offline_proof_ttl served).",
            ["result"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "vlmrun_cache_upstream_errors",
            "Upstream requests that failed without an HTTP answer (connect, timeout, cut body).",
            registry=r,
        )
        self.client_resets = Counter(
            "vlmrun_cache_client_resets",
            "Client connections reset because their client took no byte of a response for "
            "send_timeout.",
            registry=r,
        )
        self.store_failures = Counter(
            "vlmrun_cache_store_failures",
            "Artifacts that could not be stored and streamed through uncached instead: no_space "
            "(below min_free_space), write (a disk write failed), commit (could not publish), "
            "index (the cache database was damaged and reset), too_large (a body of unannounced "
            "size grew past max_object_size, or a compressed one exploded: passed through for a "
            "while).",
            ["reason"],
            registry=r,
        )
        self.circuit_open = Gauge(
            "vlmrun_cache_upstream_circuit_open",
            "1 while the circuit breaker fails upstream requests at once (in any worker).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.upstream_up = Gauge(
            "vlmrun_cache_upstream_up",
            "1 while the VLM Run API can be reached; 0 from a failure to connect (or an open "
            "circuit breaker) until it answers again.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.redis_errors = Counter(
            "vlmrun_cache_redis_errors",
            "Failed Redis calls and values: unavailable (timeout, refused, lost), rejected (a "
            "value failed its HMAC or digest and was deleted), other (an error reply).",
            ["kind"],
            registry=r,
        )
        self.redis_writes = Counter(
            "vlmrun_cache_redis_writes",
            "Fills copied to Redis: stored, present (already there), too_large, dropped (too "
            "many waiting), failed.",
            ["result"],
            registry=r,
        )
        self.redis_circuit_open = Gauge(
            "vlmrun_cache_redis_circuit_open",
            "1 while the Redis breaker skips the shared tier (in any worker); 0 when closed "
            "or when no shared tier is set.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.leases = Counter(
            "vlmrun_cache_fleet_leases",
            "Fills that asked Redis who fetches for the fleet, by outcome: acquired, taken_over, "
            "followed, stored, fallback, unshared; resumed: a followed fetch that stopped "
            "half-way and was completed from upstream.",
            ["outcome"],
            registry=r,
        )
        for outcome in LEASE_OUTCOMES:
            self.leases.labels(outcome)
        for kind in REDIS_ERRORS:
            self.redis_errors.labels(kind)
        for result in REDIS_WRITES:
            self.redis_writes.labels(result)
        self.prefetches = Counter(
            "vlmrun_cache_prefetches",
            "Artifacts named by a passed-through answer, by what their prefetch came to: fetched, "
            "already_cached (stored, being fetched or queued), refused (the API said 401/403/404 "
            "to the requester's key, now or in the last 10 minutes), too_large, dropped (queue "
            "full, upstream down), rate_limited (429, or the key is waiting out a Retry-After), "
            "error (the fetch failed, or the disk could not take the bytes).",
            ["result"],
            registry=r,
        )
        self.prefetch_hits = Counter(
            "vlmrun_cache_prefetch_hits",
            "First client reads of a prefetched artifact (joining its running prefetch, or a hit).",
            registry=r,
        )
        self.prefetch_evicted_unread_bytes = Counter(
            "vlmrun_cache_prefetch_evicted_unread_bytes",
            "Bytes of prefetched entries evicted before any client read them.",
            registry=r,
        )
        for result in PREFETCH_RESULTS:
            self.prefetches.labels(result)
        for reason in STORE_FAILURES:
            self.store_failures.labels(reason)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for tier in TIERS:
            self.hits.labels(tier)
        for source in SOURCES:
            self.served_bytes.labels(source)
        for result in ACCESS_RESULTS:
            self.access_checks.labels(result)

    def evicted(self, size: int) -> None:
        self.evictions.inc()
        self.evicted_bytes.inc(size)

    def render(self, stats: StoreStats) -> bytes:
        self.cache_bytes.set(stats.bytes)
        self.cache_entries.set(stats.entries)
        self.cache_max_bytes.set(stats.max_bytes)
        if os.environ.get(MULTIPROC_ENV):
            merged = CollectorRegistry()
            MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)
