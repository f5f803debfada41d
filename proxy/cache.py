"""Result cache for repeated read-only SELECTs (Readyset- and ProxySQL-style), exact invalidation.

What is cached: the server's complete response to one request batch (RowDescription, DataRows,
CommandComplete, ReadyForQuery; BindComplete/ParseComplete for the extended protocol), replayed
byte for byte on a hit. The key is the request's exact bytes (the SQL text, or the statement's
text plus the Bind message with its parameter values and formats) prefixed by the session's
identity: database, user, startup parameters, the server-reported parameters (DateStyle,
TimeZone, session_authorization, ...) and the SET commands the session ran (they change how
values are rendered). See optimizer/cacheability.py for which statements qualify.

Invalidation is exact for writes the proxy sees and bounded otherwise:

* a statement that writes table T (any session) drops every entry reading T when it completes,
  and again when its transaction ends (a reader may have re-filled the entry from the old
  snapshot in between);
* a statement whose effect cannot be bounded (DDL, CALL, DO) drops everything;
* `NOTIFY pgsage_refresh, 'schema.table'` from the ETL (or with an empty payload: everything);
* a TTL.

Stores race with writes: a miss takes a *ticket* (the generation counters of its tables) before
its request goes upstream, and the response is stored only if no counter moved meanwhile.

Backends: in memory (an LRU bounded in bytes), or Redis, shared by several pgsage instances.
With Redis the generation counters live in Redis too, a hit is checked against them atomically
(a Lua script), and an invalidation is written to Redis *before* the writer's client sees the
ReadyForQuery that ends its statement: so once any instance has told its client that a write
finished, no instance serves an entry older than that write. (That is stronger than broadcasting
invalidations over pub/sub, which leaves a window while the message is in flight.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from optimizer.cacheability import CacheInfo, analyze

from .protocol.batch import replayable
from .settings import Settings

ALL = "*"  #: the pseudo-table every entry depends on (a global invalidation bumps it)
#: CommandComplete tags of statements that change no table data
_NO_WRITE_TAGS = frozenset(
    (
        "SELECT",
        "BEGIN",
        "START",
        "COMMIT",
        "ROLLBACK",
        "SAVEPOINT",
        "RELEASE",
        "SET",
        "RESET",
        "SHOW",
        "FETCH",
        "MOVE",
        "DECLARE",
        "CLOSE",
        "PREPARE",
        "DEALLOCATE",
        "LISTEN",
        "UNLISTEN",
        "NOTIFY",
        "EXPLAIN",
        "VACUUM",
        "ANALYZE",
        "DISCARD",
        "CHECKPOINT",
        "LOCK",
        "PREPARE TRANSACTION",
    )
)
_TABLE_WRITE_TAGS = frozenset(("INSERT", "UPDATE", "DELETE", "MERGE", "COPY", "TRUNCATE"))
#: a SELECT (or an untagged, suspended statement) can only write through one of these words
_MAYBE_WRITE = re.compile(r"\b(?:insert|update|delete|merge|into|truncate|copy)\b", re.I)


@dataclass(slots=True)
class Entry:
    response: bytes
    tables: tuple[str, ...]
    created: float
    tag: str | None  #: None: the portal was suspended (a row limit)
    rows: int | None
    hits: int = 0


@dataclass(slots=True)
class Miss:
    """A cacheable request sent upstream: its response is captured and maybe stored."""

    key: bytes
    tables: tuple[str, ...]
    ticket: Any
    start: float
    parts: list[bytes]
    size: int = 0


class CacheMetrics:
    """Counters incremented as things happen; sizes, ratio and evictions read at scrape time."""

    def __init__(self, registry: CollectorRegistry, cache: ResultCache) -> None:
        r = registry
        self.hits = Counter("pgsage_cache_hits", "Requests answered from the result cache",
                            registry=r)  # fmt: skip
        self.misses = Counter(
            "pgsage_cache_misses", "Cacheable requests sent upstream (not in the cache)",
            registry=r,
        )  # fmt: skip
        self.stores = Counter("pgsage_cache_stores", "Responses stored in the cache", registry=r)
        self.invalidations = Counter(
            "pgsage_cache_invalidations", "Invalidations, by source", ["source"], registry=r
        )
        Gauge("pgsage_cache_bytes", "Bytes of responses held in memory",
              registry=r).set_function(lambda: cache.backend.bytes)  # fmt: skip
        Gauge("pgsage_cache_entries", "Entries held in memory",
              registry=r).set_function(lambda: len(cache.backend.entries))  # fmt: skip
        Gauge("pgsage_cache_hit_ratio", "Hits / (hits + misses) since start",
              registry=r).set_function(cache.hit_ratio)  # fmt: skip
        r.register(_EvictionCollector(cache))


class _EvictionCollector:
    def __init__(self, cache: ResultCache) -> None:
        self.cache = cache

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "pgsage_cache_evictions", "Entries removed from the cache, by reason", labels=["reason"]
        )
        for reason, n in self.cache.backend.evicted.items():
            family.add_metric([reason], n)
        yield family


class MemoryBackend:
    """In-process LRU bounded in bytes, with per-table generations and a table index."""

    is_async = False

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.by_table: dict[str, set[bytes]] = {}
        self.gens: dict[str, int] = {}
        self.bytes = 0
        self.evicted: dict[str, int] = {"lru": 0, "ttl": 0, "invalidated": 0}

    def ticket(self, tables: tuple[str, ...]) -> tuple[int, ...]:
        gens = self.gens
        return (*(gens.get(t, 0) for t in tables), gens.get(ALL, 0))

    def get(self, key: bytes, now: float, ttl: float) -> Entry | None:
        e = self.entries.get(key)
        if e is None:
            return None
        if now - e.created > ttl:
            self._drop(key, "ttl")
            return None
        self.entries.move_to_end(key)
        e.hits += 1
        return e

    def put(self, key: bytes, entry: Entry, ticket: Any) -> bool:
        if ticket != self.ticket(entry.tables):
            return False  # a write to one of its tables happened while it ran
        if key in self.entries:
            self._drop(key, "lru")
        size = len(entry.response) + len(key)
        if size > self.max_bytes:
            return False
        while self.bytes + size > self.max_bytes and self.entries:
            self._drop(next(iter(self.entries)), "lru")
        self.entries[key] = entry
        self.bytes += size
        for t in entry.tables:
            self.by_table.setdefault(t, set()).add(key)
        return True

    def invalidate(self, tables: tuple[str, ...] | None) -> int:
        gens = self.gens
        if tables is None:
            gens[ALL] = gens.get(ALL, 0) + 1
            n = len(self.entries)
            self.entries.clear()
            self.by_table.clear()
            self.bytes = 0
            self.evicted["invalidated"] += n
            return n
        dropped = 0
        for t in tables:
            gens[t] = gens.get(t, 0) + 1
            for key in self.by_table.pop(t, ()):
                if key in self.entries:
                    self._drop(key, "invalidated")
                    dropped += 1
        return dropped

    def clear(self) -> int:
        return self.invalidate(None)

    def _drop(self, key: bytes, reason: str) -> None:
        e = self.entries.pop(key)
        self.bytes -= len(e.response) + len(key)
        self.evicted[reason] += 1
        for t in e.tables:
            keys = self.by_table.get(t)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.by_table[t]


# Redis: entries are hashes {r: response, m: JSON meta with the tables and their generations};
# generations are plain integer keys. Both scripts compare an entry's generations with the
# current ones atomically, so a hit never returns what a completed invalidation covered.
_GET = """
local e = redis.call('HMGET', KEYS[1], 'r', 'm')
if not e[1] then return false end
local m = cjson.decode(e[2])
for i, t in ipairs(m.t) do
  local g = tonumber(redis.call('GET', ARGV[1] .. t) or '0')
  if g ~= m.g[i] then redis.call('DEL', KEYS[1]); return false end
end
return {e[1], e[2]}
"""
_PUT = """
local m = cjson.decode(ARGV[3])
for i, t in ipairs(m.t) do
  local g = tonumber(redis.call('GET', ARGV[1] .. t) or '0')
  if g ~= m.g[i] then return 0 end
end
redis.call('HSET', KEYS[1], 'r', ARGV[2], 'm', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""


class RedisBackend:
    """Entries and generation counters in Redis, shared by every pgsage using the same URL."""

    is_async = True

    def __init__(self, url: str, prefix: str = "pgsage:cache:") -> None:
        import redis.asyncio as redis

        self.client = redis.Redis.from_url(url)
        self.prefix = prefix
        self.gen_prefix = prefix + "gen:"
        self._get = self.client.register_script(_GET)
        self._put = self.client.register_script(_PUT)
        self.bytes = 0
        self.entries: dict[bytes, Entry] = {}  # nothing held locally
        self.evicted: dict[str, int] = {"lru": 0, "ttl": 0, "invalidated": 0}

    def _key(self, key: bytes) -> str:
        return self.prefix + "e:" + hashlib.blake2b(key, digest_size=20).hexdigest()

    async def ticket(self, tables: tuple[str, ...]) -> list[int]:
        names = [self.gen_prefix + t for t in (*tables, ALL)]
        return [int(v or 0) for v in await self.client.mget(names)]

    async def get(self, key: bytes, now: float, ttl: float) -> Entry | None:
        found = await self._get(keys=[self._key(key)], args=[self.gen_prefix])
        if not found:
            return None
        response, meta = found
        m = json.loads(meta)
        return Entry(response, tuple(m["t"]), now, m["tag"], m["rows"])

    async def put(self, key: bytes, entry: Entry, ticket: Any, ttl: float) -> bool:
        meta = json.dumps(
            {"t": [*entry.tables, ALL], "g": list(ticket), "tag": entry.tag, "rows": entry.rows}
        )
        stored = await self._put(
            keys=[self._key(key)],
            args=[self.gen_prefix, entry.response, meta, max(1, int(ttl * 1000))],
        )
        return bool(stored)

    async def invalidate(self, tables: tuple[str, ...] | None) -> int:
        names = [ALL] if tables is None else list(tables)
        async with self.client.pipeline(transaction=True) as pipe:
            for t in names:
                pipe.incr(self.gen_prefix + t)
            await pipe.execute()
        return 0

    async def clear(self) -> int:
        return await self.invalidate(None)

    async def close(self) -> None:
        await self.client.aclose()


class ResultCache:
    """What sessions use: classification, admission, backend calls and counters."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.backend: MemoryBackend | RedisBackend = (
            RedisBackend(settings.cache_redis_url)
            if settings.cache_redis_url
            else MemoryBackend(settings.cache_max_bytes)
        )
        self.is_async = self.backend.is_async
        self.metrics = CacheMetrics(registry, self)
        self._info: OrderedDict[str, CacheInfo] = OrderedDict()
        self._seen: OrderedDict[bytes, int] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.stores = 0
        self.invalidations = 0
        self.uncacheable = 0

    # ---------------------------------------------------------------- classification

    def info(self, sql: str) -> CacheInfo:
        memo = self._info
        info = memo.get(sql)
        if info is None:
            info = analyze(sql, self.settings.cache_schemas)
            memo[sql] = info
            if len(memo) > 20_000:
                memo.popitem(last=False)
        return info

    def writes_of(self, tag: str | None, sql: str | None, failed: bool) -> tuple[str, ...] | None:
        """Bare names of the tables a finished statement may have written (None: any).

        The tag is only a fast path: a row-limited Execute of `UPDATE ... RETURNING` ends in
        PortalSuspended (no tag), and `WITH d AS (DELETE ...) SELECT` is tagged SELECT.
        """
        if tag is not None:
            head = tag.split(" ", 1)[0]
            if head in _TABLE_WRITE_TAGS:
                return self.info(sql).writes if sql is not None else None
            if head not in _NO_WRITE_TAGS:
                return None  # DDL, CALL, DO, ...
            if head != "SELECT":
                return ()
        elif failed:
            return ()  # an error: nothing it did stays (earlier statements were counted)
        if sql is None:
            return None
        if not _MAYBE_WRITE.search(sql):
            return ()
        return self.info(sql).writes

    # ---------------------------------------------------------------- lookups and stores

    def admit(self, key: bytes) -> bool:
        """Count a miss of `key`; True once it has missed `cache_admit_after` times."""
        need = self.settings.cache_admit_after
        if need <= 1:
            return True
        seen = self._seen
        n = seen.get(key, 0) + 1
        if n >= need:
            seen.pop(key, None)
            return True
        seen[key] = n
        seen.move_to_end(key)
        if len(seen) > 50_000:
            seen.popitem(last=False)
        return False

    def hit(self) -> None:
        self.hits += 1
        self.metrics.hits.inc()

    def miss(self) -> None:
        self.misses += 1
        self.metrics.misses.inc()

    def entry_from(self, miss: Miss, now: float) -> Entry | None:
        """The entry to store for a finished miss, or None if it should not be stored."""
        if miss.size > self.settings.cache_max_entry_bytes:
            return None
        if (now - miss.start) * 1000.0 < self.settings.cache_min_ms:
            return None
        response = b"".join(miss.parts)
        shape = replayable(response)
        if shape is None:
            return None
        if not self.admit(miss.key):
            return None
        return Entry(response, miss.tables, now, shape[0], shape[1])

    def stored(self, ok: bool) -> None:
        if ok:
            self.stores += 1
            self.metrics.stores.inc()

    def invalidated(self, source: str, dropped: int) -> None:
        self.invalidations += 1
        self.metrics.invalidations.labels(source).inc()

    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    # ---------------------------------------------------------------- invalidation API

    async def invalidate(self, tables: tuple[str, ...] | None, source: str) -> int:
        """Drop entries of `tables` (bare names; None: everything). Usable from any task."""
        b = self.backend
        n = await b.invalidate(tables) if isinstance(b, RedisBackend) else b.invalidate(tables)
        self.invalidated(source, n)
        return n

    async def clear(self) -> int:
        return await self.invalidate(None, "clear")

    def stats(self) -> dict[str, Any]:
        b = self.backend
        return {
            "backend": "redis" if isinstance(b, RedisBackend) else "memory",
            "entries": len(b.entries),
            "bytes": b.bytes,
            "max_bytes": self.settings.cache_max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "hit_ratio": round(self.hit_ratio(), 4),
            "stores": self.stores,
            "invalidations": self.invalidations,
            "evictions_lru": b.evicted["lru"],
            "evictions_ttl": b.evicted["ttl"],
            "evicted_by_invalidation": b.evicted["invalidated"],
            "ttl_seconds": self.settings.cache_ttl,
        }

    async def close(self) -> None:
        if isinstance(self.backend, RedisBackend):
            await self.backend.close()


def refresh_payload_tables(payload: str) -> tuple[str, ...] | None:
    """`NOTIFY pgsage_refresh, 'gold.sales_summary,gold.x'`: bare names; empty payload: all."""
    names = tuple(sorted({p.strip().rpartition(".")[2] for p in payload.split(",") if p.strip()}))
    return names or None


def now() -> float:
    return time.monotonic()


REFRESH_CHANNEL = "pgsage_refresh"


class RefreshListener:
    """LISTEN pgsage_refresh on the proxy's own connection; each NOTIFY invalidates its tables.

    The warehouse ETL notifies after each refresh commits (warehouse_sql/etl.py). Reconnects
    with backoff when the database goes away; a lost connection also drops the whole cache,
    since notifications sent meanwhile were missed.
    """

    def __init__(self, cache: ResultCache, connect: Any, log: Any) -> None:
        self.cache = cache
        self.connect = connect
        self.log = log
        self.listening = False
        self.received = 0
        self._task: Any = None
        self._pending: set[Any] = set()

    def start(self) -> None:
        import asyncio

        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        import asyncio

        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        import asyncio

        self.received += 1
        task = asyncio.ensure_future(
            self.cache.invalidate(refresh_payload_tables(payload), "notify")
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _run(self) -> None:
        import asyncio

        delay = 0.5
        while True:
            conn = None
            try:
                conn = await self.connect()
                await conn.add_listener(REFRESH_CHANNEL, self._notified)
                if self.received or delay > 0.5:
                    await self.cache.invalidate(None, "notify")  # missed while away
                self.listening = True
                delay = 0.5
                while True:
                    await asyncio.sleep(2.0)
                    await conn.execute("SELECT 1")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.listening:
                    self.log.warning("cache refresh listener lost its connection", error=str(exc))
                self.listening = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=1)
