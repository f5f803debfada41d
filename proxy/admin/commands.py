"""One function per admin command. Each takes the context and its parsed arguments and returns
the encoded response messages (without ReadyForQuery)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .. import __version__
from .results import command_complete, error, notice, result_set

if TYPE_CHECKING:
    from .console import AdminContext

Command = Callable[["AdminContext", dict[str, Any]], "bytes | Awaitable[bytes]"]

HELP = (
    ("SHOW HELP", "this list"),
    ("SHOW STATS", "statements, errors and time per database"),
    ("SHOW CLIENTS", "client connections"),
    ("SHOW SERVERS", "upstream connections"),
    ("SHOW WORKERS", "the relay processes (workers setting): pid, role, clients, statements"),
    ("SHOW QUERIES [LIMIT n]", "statements by fingerprint, by total time (pg_stat_statements)"),
    ("SHOW CONFIG", "settings, with default and whether SET can change them"),
    ("SHOW CACHE", "result cache: entries, bytes, hits, misses, invalidations"),
    ("SHOW LANES", "admission control: short threshold, long-lane limit, running, queued"),
    ("SHOW STEERING", "plan steering per template: status, arms tried, retired, holdout"),
    ("SHOW REWRITES", "rewrites per template: rule, status, proven texts, A/B samples"),
    ("SHOW RECOMMENDATIONS", "index advisor: open recommendations, best first"),
    ("APPLY RECOMMENDATION n", "build recommendation n and validate it (kept only if it pays)"),
    ("REJECT RECOMMENDATION n", "reject recommendation n (not proposed again)"),
    ("SHOW ANOMALIES [LIMIT n]", "anomaly incidents, newest first"),
    ("SHOW CLUSTERS", "workload clusters of the active model: size, share, latency, tables"),
    ("ACK ANOMALY n", "acknowledge incident n"),
    ("SHOW VERSION", "pgsage version"),
    ("SET key = value", "change a runtime-reloadable setting"),
    ("RELOAD", "re-read the configuration file and environment (SIGHUP does the same)"),
    ("PAUSE", "hold new statements until RESUME (in-flight ones finish)"),
    ("RESUME", "release held statements"),
    ("SHUTDOWN", "graceful shutdown of pgsage"),
)


def _ts(epoch: float | None) -> str | None:
    if not epoch:
        return None
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _at(monotonic: float) -> str | None:
    """Wall-clock text of a `time.monotonic()` reading."""
    return _ts(time.time() - (time.monotonic() - monotonic))


def show_help(ctx: AdminContext, args: dict[str, Any]) -> bytes:
    return result_set(("command", "description"), HELP)


def show_version(ctx: AdminContext, args: dict[str, Any]) -> bytes:
    return result_set(("version",), [(f"pgsage {__version__}",)])


def show_stats(ctx: AdminContext, args: dict[str, Any]) -> bytes | Awaitable[bytes]:
    own = ctx.database_stats()
    if not ctx.has_workers:
        return _stats(ctx, own)

    async def merged() -> bytes:  # every worker's counters, summed per database
        total: dict[str, dict[str, float]] = {db: dict(v) for db, v in own.items()}
        for (theirs,) in await ctx.sibling_rows("stats"):  # LOCAL_ROWS["stats"] of each
            for db, values in theirs.items():
                entry = total.setdefault(db, {})
                for k, v in values.items():
                    entry[k] = entry.get(k, 0) + v
        return _stats(ctx, total)

    return merged()


def _stats(ctx: AdminContext, stats: dict[str, dict[str, float]]) -> bytes:
    rows = []
    for db, s in sorted(stats.items()):
        if db == ctx.admin_database:
            continue
        count, seconds, errors = s["queries"], s["seconds"], s["errors"]
        rows.append(
            (
                db,
                count,
                errors,
                int(seconds * 1e6),
                int(seconds * 1e6 / count) if count else 0,
                s.get("received", 0),
                s.get("sent", 0),
            )
        )
    return result_set(
        (
            "database",
            "total_query_count",
            "total_error_count",
            "total_query_time",
            "avg_query_time",
            "total_received",
            "total_sent",
        ),
        rows,
    )


def show_clients(ctx: AdminContext, args: dict[str, Any]) -> bytes | Awaitable[bytes]:
    return _everywhere(ctx, "clients", CLIENT_COLUMNS)


def show_servers(ctx: AdminContext, args: dict[str, Any]) -> bytes | Awaitable[bytes]:
    return _everywhere(ctx, "servers", SERVER_COLUMNS)


def show_workers(ctx: AdminContext, args: dict[str, Any]) -> bytes | Awaitable[bytes]:
    return _everywhere(ctx, "worker", WORKER_COLUMNS)


def _everywhere(ctx: AdminContext, what: str, head: Sequence[str], limit: int | None = None
                ) -> bytes | Awaitable[bytes]:  # fmt: skip
    """This process's rows of `what` (`LOCAL_ROWS`), and in multi-worker mode every other
    worker's after them."""
    rows = LOCAL_ROWS[what](ctx)
    if not ctx.has_workers:
        return result_set(head, rows[:limit])

    async def merged() -> bytes:
        return result_set(head, (rows + await ctx.sibling_rows(what))[:limit])

    return merged()


CLIENT_COLUMNS = ("type", "user", "database", "state", "addr", "port", "connect_time",
                  "request_time", "remote_pid", "tls", "application_name",
                  "transaction_status")  # fmt: skip
SERVER_COLUMNS = ("type", "user", "database", "state", "addr", "port", "local_addr",
                  "local_port", "connect_time", "remote_pid")  # fmt: skip
WORKER_COLUMNS = ("worker", "pid", "role", "clients", "statements", "listen")


def client_rows(ctx: AdminContext) -> list[tuple[Any, ...]]:
    rows = []
    for c in ctx.client_sessions():
        addr, _, port = c.info.client_addr.rpartition(":")
        rows.append(
            (
                "C",
                c.info.user,
                c.info.database,
                c.state,
                addr,
                int(port) if port.isdigit() else None,
                _at(c.connected_at),
                _at(c.last_activity),
                c.tracker.backend_pid,
                c.info.tls,
                c.info.application_name,
                c.tracker.transaction_status,
            )
        )
    return rows


def server_rows(ctx: AdminContext) -> list[tuple[Any, ...]]:
    def row(transport: Any, user: Any, database: Any, state: str, opened: float, pid: Any
            ) -> tuple[Any, ...]:  # fmt: skip
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        return (
            "S", user, database, state,
            peer[0] if isinstance(peer, tuple) else str(peer),
            peer[1] if isinstance(peer, tuple) else None,
            local[0] if isinstance(local, tuple) else None,
            local[1] if isinstance(local, tuple) else None,
            _at(opened), pid,
        )  # fmt: skip

    rows = []
    for c in ctx.client_sessions():
        up = c.upstream
        if up is not None and up.transport is not None:
            rows.append(row(up.transport, c.info.user, c.info.database, c.state, up.opened_at,
                            c.tracker.backend_pid))  # fmt: skip
    for parked in ctx.idle_servers():  # kept for the next client (server_pool_size)
        state = "idle" if parked.ready else "resetting"
        rows.append(row(parked.transport, parked.user, parked.database, state,
                        parked.connected_at, parked.backend_pid))  # fmt: skip
    return rows


def show_queries(ctx: AdminContext, args: dict[str, Any]) -> bytes | Awaitable[bytes]:
    limit = int(args.get("limit") or 20)
    if not ctx.has_workers:
        return result_set(QUERY_COLUMNS, query_rows(ctx, limit))
    own = LOCAL_ROWS["queries"](ctx)

    async def merged() -> bytes:
        rows = merge_query_rows(own + await ctx.sibling_rows("queries"))
        return result_set(QUERY_COLUMNS, rows[:limit])

    return merged()


#: fingerprints each worker contributes to a merged SHOW QUERIES
MERGED_QUERIES = 300
QUERY_COLUMNS = ("fingerprint", "calls", "total_exec_time", "mean_exec_time", "min_exec_time",
                 "max_exec_time", "stddev_exec_time", "p95_exec_time", "rows", "errors",
                 "command", "query")  # fmt: skip


def merge_query_rows(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """SHOW QUERIES rows of several workers as one row per fingerprint: calls, time, rows and
    errors summed, min and max of all, the standard deviation pooled, and the p95 the highest
    of the workers' (quantiles do not add up; this one bounds the true one from above)."""
    groups: dict[str, list[tuple[Any, ...]]] = {}
    for r in rows:
        groups.setdefault(r[0], []).append(r)
    out = []
    for fp, rs in groups.items():
        if len(rs) == 1:
            out.append(tuple(rs[0]))
            continue
        calls = sum(r[1] for r in rs)
        total = sum(r[2] for r in rs)
        mean = total / calls if calls else 0.0
        second = sum(r[1] * (r[6] ** 2 + r[3] ** 2) for r in rs) / calls if calls else 0.0
        out.append((fp, calls, round(total, 3), round(mean, 3), min(r[4] for r in rs),
                    max(r[5] for r in rs), round(max(second - mean**2, 0.0) ** 0.5, 3),
                    max(r[7] for r in rs), sum(r[8] for r in rs), sum(r[9] for r in rs),
                    rs[0][10], rs[0][11]))  # fmt: skip
    out.sort(key=lambda r: -r[2])
    return out


def query_rows(ctx: AdminContext, limit: int) -> list[tuple[Any, ...]]:
    rows = []
    for s in ctx.query_stats(limit):
        rows.append(
            (
                s.fingerprint,
                s.calls,
                round(s.total_time * 1000, 3),
                round(s.mean_time * 1000, 3),
                round(s.min_time * 1000, 3),
                round(s.max_time * 1000, 3),
                round(s.stddev_time * 1000, 3),
                round(s.p95_time * 1000, 3),
                s.rows,
                s.errors,
                s.command,
                s.normalized,
            )
        )
    return rows


def show_cache(ctx: AdminContext, args: dict[str, Any]) -> bytes | Awaitable[bytes]:
    stats = ctx.cache_stats()
    if stats is None:
        return notice("the result cache is off (cache_enabled = false)") + result_set(
            ("key", "value"), []
        )
    if ctx.has_workers:  # each worker has a cache of its own: its rows under its number
        return _everywhere(ctx, "cache", ("worker", "key", "value"))
    return result_set(("key", "value"), [(k, str(v)) for k, v in stats.items()])


def show_lanes(ctx: AdminContext, args: dict[str, Any]) -> bytes | Awaitable[bytes]:
    lanes = ctx.admission_lanes()
    if lanes is None:
        return notice("admission control is off (admission_enabled = false)") + result_set(
            ("key", "value"), []
        )
    if ctx.has_workers:  # each worker admits its own sessions' statements
        return _everywhere(ctx, "lanes", ("worker", "key", "value"))
    return result_set(("key", "value"), [(k, None if v is None else str(v)) for k, v in lanes])


def _per_worker(ctx: AdminContext, pairs: Iterable[tuple[str, Any]]) -> list[tuple[Any, ...]]:
    """(key, value) pairs as (worker, key, value) rows: SHOW CACHE and LANES in multi-worker
    mode."""
    worker = ctx.worker_row()[0]
    return [(worker, k, None if v is None else str(v)) for k, v in pairs]


def show_steering(ctx: AdminContext, args: dict[str, Any]) -> bytes | Awaitable[bytes]:
    head = ("fingerprint", "status", "arms", "retired", "holdout", "template")
    if ctx.steering_rows() is None:
        return notice("plan steering is off (steering_enabled = false)") + result_set(head, [])
    limit = int(args["limit"]) if args.get("limit") else None
    # each worker steers its own sessions: one row per template and worker
    return _everywhere(ctx, "steering", head, limit)


def show_rewrites(ctx: AdminContext, args: dict[str, Any]) -> bytes | Awaitable[bytes]:
    head = ("fingerprint", "rule", "status", "proven", "rewritten", "holdout", "template")
    if ctx.rewrite_rows() is None:
        return notice("rewrites are off (rewrite_enabled = false)") + result_set(head, [])
    return _everywhere(ctx, "rewrites", head)


def text_rows(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [tuple(None if v is None else str(v) for v in r) for r in rows]


def _num(v: Any, digits: int = 2) -> str | None:
    return None if v is None else f"{v:.{digits}f}"


def _recommendation_row(r: dict[str, Any]) -> tuple[Any, ...]:
    cols = ", ".join(r.get("columns") or [])
    if r.get("include"):
        cols += " INCLUDE (" + ", ".join(r["include"]) + ")"
    return (
        str(r["id"]),
        None if r.get("rank") is None else str(r["rank"]),
        r.get("status"),
        r.get("op"),
        r.get("table"),
        cols,
        r.get("predicate"),
        None if r.get("size_bytes") is None else str(int(r["size_bytes"])),
        _num(r.get("est_gain_ms")),
        _num(r.get("est_gain_share"), 3),
        str(len(r.get("fingerprints") or [])),
        _num(r.get("measured_speedup")),
        None if r.get("p_value") is None else f"{r['p_value']:.2g}",
        r.get("reason"),
    )


_RECOMMENDATION_COLUMNS = (
    "id", "rank", "status", "op", "table", "columns", "predicate", "size_bytes",
    "est_gain_ms", "est_gain_share", "fingerprints", "measured_speedup", "p_value", "reason",
)  # fmt: skip


async def show_recommendations(ctx: AdminContext, args: dict[str, Any]) -> bytes:
    recs = await ctx.optimiser.recommendations()
    limit = int(args["limit"]) if args.get("limit") else None
    rows = [_recommendation_row(r) for r in recs[:limit]]
    return result_set(_RECOMMENDATION_COLUMNS, rows)


async def apply_recommendation(ctx: AdminContext, args: dict[str, Any]) -> bytes:
    rec = await ctx.optimiser.apply(int(args["id"]))
    return result_set(_RECOMMENDATION_COLUMNS, [_recommendation_row(rec)])


async def reject_recommendation(ctx: AdminContext, args: dict[str, Any]) -> bytes:
    rec = await ctx.optimiser.reject(int(args["id"]))
    return result_set(_RECOMMENDATION_COLUMNS, [_recommendation_row(rec)])


async def show_anomalies(ctx: AdminContext, args: dict[str, Any]) -> bytes:
    limit = int(args["limit"]) if args.get("limit") else 20
    rows = []
    for a in await ctx.optimiser.anomalies(limit):
        fps = a.get("fingerprints") or []
        rows.append(
            (
                str(a["incident_id"]),
                a.get("kind"),
                a.get("severity"),
                _ts(a["window_start"].timestamp()) if a.get("window_start") else None,
                _ts(a["window_end"].timestamp()) if a.get("window_end") else None,
                str(a.get("executions")) if a.get("executions") is not None else None,
                ",".join(fps[:5]) + (" ..." if len(fps) > 5 else ""),
                _num(a.get("score"), 3),
                "yes" if a.get("open") else "no",
                "yes" if a.get("acknowledged") else "no",
                a.get("description"),
            )
        )
    return result_set(
        ("incident", "kind", "severity", "window_start", "window_end", "executions",
         "fingerprints", "score", "open", "acknowledged", "description"),
        rows,
    )  # fmt: skip


async def show_clusters(ctx: AdminContext, args: dict[str, Any]) -> bytes:
    rows = []
    for c in await ctx.optimiser.clusters():
        rows.append(
            (
                str(c["cluster"]),
                str(c.get("templates")),
                str(c.get("executions")),
                _num(c.get("share_executions"), 3),
                _num(c.get("share_time"), 3),
                _num(c.get("mean_latency_ms"), 3),
                ", ".join(c.get("tables") or []),
                c.get("dominant_role"),
                _num(c.get("silhouette"), 3),
                str(c.get("model_version")),
            )
        )
    return result_set(
        ("cluster", "templates", "executions", "share_executions", "share_time",
         "mean_latency_ms", "tables", "dominant_role", "silhouette", "model_version"),
        rows,
    )  # fmt: skip


async def ack_anomaly(ctx: AdminContext, args: dict[str, Any]) -> bytes:
    if not await ctx.optimiser.ack_anomaly(int(args["id"])):
        return error("42704", f"no anomaly incident {args['id']}")
    return command_complete("ACK")


def show_config(ctx: AdminContext, args: dict[str, Any]) -> bytes:
    rows = []
    for key, value, default, changeable in ctx.config_items():
        rows.append((key, value, default, "yes" if changeable else "no"))
    return result_set(("key", "value", "default", "changeable"), rows)


def set_setting(ctx: AdminContext, args: dict[str, Any]) -> bytes | Awaitable[bytes]:
    problem = ctx.set_setting(args["key"], args["value"])
    if problem:
        return error("22023", problem)
    return _when_told(ctx, command_complete("SET"))


def reload(ctx: AdminContext, args: dict[str, Any]) -> bytes | Awaitable[bytes]:
    problem = ctx.reload()
    if problem and problem.startswith("configuration not reloaded"):
        return error("F0000", problem)
    # keys that need a restart are reported, not refused (as PgBouncer logs them)
    return _when_told(ctx, (notice(problem) if problem else b"") + command_complete("RELOAD"))


def pause(ctx: AdminContext, args: dict[str, Any]) -> bytes | Awaitable[bytes]:
    ctx.pause()
    return _when_told(ctx, command_complete("PAUSE"))


def resume(ctx: AdminContext, args: dict[str, Any]) -> bytes | Awaitable[bytes]:
    ctx.resume()
    return _when_told(ctx, command_complete("RESUME"))


def _when_told(ctx: AdminContext, reply: bytes) -> bytes | Awaitable[bytes]:
    """In multi-worker mode a change is complete once every worker has it."""
    if not ctx.has_workers:
        return reply

    async def told() -> bytes:
        await ctx.siblings_told()
        return reply

    return told()


def shutdown(ctx: AdminContext, args: dict[str, Any]) -> bytes:
    ctx.request_shutdown()
    return command_complete("SHUTDOWN")


SHOW: dict[str, Command] = {
    "help": show_help,
    "version": show_version,
    "stats": show_stats,
    "clients": show_clients,
    "servers": show_servers,
    "queries": show_queries,
    "config": show_config,
    "cache": show_cache,
    "recommendations": show_recommendations,
    "lanes": show_lanes,
    "steering": show_steering,
    "rewrites": show_rewrites,
    "anomalies": show_anomalies,
    "clusters": show_clusters,
    "workers": show_workers,
}

#: VERB NOUN n
ACTIONS: dict[tuple[str, str], Any] = {
    ("apply", "recommendation"): apply_recommendation,
    ("reject", "recommendation"): reject_recommendation,
    ("ack", "anomaly"): ack_anomaly,
}


#: this process's rows of each SHOW that multi-worker mode gathers from every worker: the
#: console computes its own with them, and a worker answers `rows <what>` on its control
#: socket with them (proxy/workers.py)
LOCAL_ROWS: dict[str, Callable[[AdminContext], list[tuple[Any, ...]]]] = {
    "clients": client_rows,
    "servers": server_rows,
    "worker": lambda ctx: [ctx.worker_row()],
    "queries": lambda ctx: query_rows(ctx, MERGED_QUERIES),
    "steering": lambda ctx: text_rows(ctx.steering_rows() or []),
    "rewrites": lambda ctx: text_rows(ctx.rewrite_rows() or []),
    "stats": lambda ctx: [(ctx.database_stats(),)],
    "cache": lambda ctx: _per_worker(ctx, (ctx.cache_stats() or {}).items()),
    "lanes": lambda ctx: _per_worker(ctx, ctx.admission_lanes() or []),
}
