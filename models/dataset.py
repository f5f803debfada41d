"""Training and serving rows for the cost model, read from `metadata.query_logs`.

A row is one logged execution. Its features:

- *static*, per (fingerprint, literal class, text variant; `static_class`): the SQL shape of one
  sqlglot parse per fingerprint and text variant, catalog statistics of its tables, and the plan
  of ``EXPLAIN (FORMAT JSON)`` (never ANALYZE), fetched by `Explainer` on pgsage's own
  connection inside a READ ONLY transaction with a statement_timeout. Texts logged with their
  literals are explained as sent; texts logged only normalised ($n) get PostgreSQL's generic
  plan. Static features are upserted to `ml.feature_store`.
- *temporal*: calendar of the (simulated-clock) start time, in the database's time zone.
- *load* (columns for analysis, not model features): statements of the log running when this
  one started, and how slow the latest executions were against their own templates' medians
  (`load_slowdown`). The proxy attaches a prediction cached per fingerprint and literal class
  and reuses it for a while, so it cannot know the load at each execution; a model trained on
  load would be served something else than it learnt from.
- *history*: the fingerprint's previous executions that had *finished* before this one started
  (count, rolling median, last, rate over the past hour). `history_features` is the single
  implementation, used for training rows and for serving alike, so nothing from the future of a
  row leaks into it.

Splits: `time_split` (70/15/15 in start order) and `template_split` (fingerprints held out).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from optimizer.features import (
    CATALOG_FEATURES,
    PLAN_FEATURES,
    SQL_FEATURES,
    TEMPORAL_FEATURES,
    TableStats,
    catalog_features,
    count_params,
    explain_statement,
    generic_plan_statements,
    literal_class,
    plan_features,
    sql_shape,
    temporal_features,
)
from optimizer.parse import ParseCache

HISTORY_FEATURES: tuple[str, ...] = (
    "hist_count",
    "hist_median_ms",
    "hist_p90_ms",
    "hist_last_ms",
    "hist_rate_1h",
    "hist_calibrated_ms",
)
#: load at each execution's start: computed for analysis, not used by the model (see above)
LOAD_COLUMNS: tuple[str, ...] = ("concurrent_statements", "load_slowdown")
STATIC_FEATURES: tuple[str, ...] = SQL_FEATURES + CATALOG_FEATURES + PLAN_FEATURES
#: every column the cost model may use, in a fixed order: all of them are what serving
#: (models/serve.py) computes too
FEATURES: tuple[str, ...] = STATIC_FEATURES + TEMPORAL_FEATURES + HISTORY_FEATURES
FEATURE_SET = "cost_v1"
#: commands whose cost is modelled (utility statements, BEGIN/SET and catalog reads are not)
MODELLED_COMMANDS = ("SELECT", "INSERT", "UPDATE", "DELETE")
HISTORY_WINDOW = 50
#: executions (of any template) whose slowdown makes up `load_slowdown`
LOAD_WINDOW = 20

Progress = Callable[[str, float], None]
_SPACES = re.compile(r"\s+")


def _no_progress(stage: str, fraction: float) -> None:
    return None


# ------------------------------------------------------------------------------------ the log


async def fetch_log(
    conn: Any,
    since: datetime | None = None,
    until: datetime | None = None,
    max_rows: int = 200_000,
    database: str | None = None,
) -> pd.DataFrame:
    """The latest `max_rows` successful, modelled executions in [since, until), oldest first."""
    rows = await conn.fetch(
        """
        SELECT * FROM (
            SELECT query_id, started_at,
                   started_at + duration_ms * interval '1 millisecond' AS finished_at,
                   duration_ms, fingerprint, query_text,
                   normalized_text, command, database_name,
                   (started_at AT TIME ZONE current_setting('TimeZone')) AS local_started
            FROM metadata.query_logs
            WHERE status = 'ok' AND parsed AND NOT is_catalog
              AND command = ANY($1::text[])
              AND ($2::timestamptz IS NULL OR started_at >= $2)
              AND ($3::timestamptz IS NULL OR started_at < $3)
              AND ($4::text IS NULL OR database_name = $4)
            ORDER BY started_at DESC, query_id DESC
            LIMIT $5
        ) latest ORDER BY started_at, query_id
        """,
        list(MODELLED_COMMANDS),
        since,
        until,
        database,
        max_rows,
    )
    columns = [
        "query_id",
        "started_at",
        "finished_at",
        "duration_ms",
        "fingerprint",
        "query_text",
        "normalized_text",
        "command",
        "database_name",
        "local_started",
    ]
    frame = pd.DataFrame([tuple(r) for r in rows], columns=columns)
    for col in ("started_at", "finished_at"):
        frame[col] = pd.to_datetime(frame[col], utc=True)
    frame["duration_ms"] = frame["duration_ms"].astype(float)
    return frame


# -------------------------------------------------------------------------------- the catalog


async def fetch_catalog(conn: Any, tables: Iterable[str]) -> dict[str, TableStats]:
    """pg_class sizes and index key columns of each table, keyed by the name as written."""
    out: dict[str, TableStats] = {}
    for name in sorted(set(tables)):
        row = await conn.fetchrow(
            "SELECT c.reltuples::float8 AS reltuples, c.relpages::float8 AS relpages"
            " FROM pg_class c WHERE c.oid = to_regclass($1)",
            name,
        )
        if row is None:
            continue
        idx = await conn.fetch(
            """
            SELECT array_agg(a.attname::text ORDER BY k.ord) AS cols
            FROM pg_index i
            CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
            WHERE i.indrelid = to_regclass($1)
            GROUP BY i.indexrelid
            """,
            name,
        )
        reltuples = float(row["reltuples"])
        out[name] = TableStats(
            reltuples if reltuples >= 0 else math.nan,
            float(row["relpages"]),
            tuple(tuple(r["cols"]) for r in idx),
        )
    return out


# ------------------------------------------------------------------------ static feature keys


@functools.lru_cache(maxsize=8192)  # a template's text: serving asks for every execution
def text_variant(normalized: str) -> str:
    """A short id of a template's normalised text.

    pg_query's fingerprint leaves out the name of an aliased table (``FROM a f JOIN ...`` and
    ``FROM b f JOIN ...`` share one fingerprint), so parses and static features are keyed by this
    too: each table keeps its own catalog statistics and its own plan.
    """
    text = _SPACES.sub(" ", normalized.strip()) if isinstance(normalized, str) else ""
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def static_class(text: str, normalized: str) -> str:
    """The key of one row's static features within its fingerprint: the literal class of the
    text as sent and the variant of its normalised text."""
    return f"{literal_class(text)}.{text_variant(normalized)}"


# -------------------------------------------------------------------------------- the planner


@dataclass
class Explainer:
    """EXPLAIN (FORMAT JSON) on pgsage's own connection, cached per (fingerprint, static class).

    Runs inside a READ ONLY transaction with a statement_timeout that is rolled back, so it can
    neither change data nor hold a client up; an error or timeout yields no plan (None).
    """

    conn: Any
    statement_timeout_ms: int = 2_000
    cache: dict[tuple[str, str], Any] = field(default_factory=dict)
    errors: int = 0
    _seq: int = 0

    async def plan(self, fingerprint: str, text: str, normalized: str, tree: Any) -> Any:
        key = (fingerprint, static_class(text, normalized))
        if key not in self.cache:
            self.cache[key] = await self._explain(text, normalized, tree)
        return self.cache[key]

    async def _explain(self, text: str, normalized: str, tree: Any) -> Any:
        generic = literal_class(text) == "generic" or "$" in text
        stmt = explain_statement(normalized if generic else text, tree)
        if stmt is None:
            return None
        try:
            async with self.conn.transaction(readonly=True):
                await self.conn.execute(
                    f"SET LOCAL statement_timeout = {int(self.statement_timeout_ms)}"
                )
                if not generic:
                    return await self.conn.fetchval(stmt)
                return await self._generic(normalized, count_params(tree))
        except Exception:
            self.errors += 1
            return None

    async def _generic(self, normalized: str, n_params: int) -> Any:
        self._seq += 1
        prepare, explain, deallocate = generic_plan_statements(
            normalized, n_params, f"pgsage_explain_{self._seq}"
        )
        await self.conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await self.conn.execute(prepare)
        try:
            return await self.conn.fetchval(explain)
        finally:
            await self.conn.execute(deallocate)


# ------------------------------------------------------------------------------- the features


def history_features(
    past_started: np.ndarray,
    past_finished: np.ndarray,
    past_duration_ms: np.ndarray,
    at: np.ndarray,
    past_cost: np.ndarray | None = None,
    at_cost: np.ndarray | None = None,
    window: int = HISTORY_WINDOW,
) -> dict[str, np.ndarray]:
    """History of one fingerprint as known at each time in `at` (int64 ns since the epoch).

    Only executions with ``finished < at`` count (``started < at`` for the rate): a training row
    never sees its own latency or anything later, and serving (``at`` = now) computes the same.
    With plan costs, ``hist_calibrated_ms`` scales this row's EXPLAIN cost by the template's
    past median of latency per unit of cost (a per-template calibration, learned online).
    """
    order = np.argsort(past_finished, kind="stable")
    finished = past_finished[order]
    durations = past_duration_ms[order].astype(float)
    k = np.searchsorted(finished, at, side="left")
    series = pd.Series(durations)
    rolling = series.rolling(window, min_periods=1)
    median = np.append(np.nan, rolling.median().to_numpy())
    p90 = np.append(np.nan, rolling.quantile(0.9).to_numpy())
    last = np.append(np.nan, durations)
    calibrated = np.full(len(at), np.nan)
    if past_cost is not None and at_cost is not None:
        ratio = np.log(np.maximum(durations, 1e-3)) - np.log1p(past_cost[order].astype(float))
        level = pd.Series(ratio).rolling(window, min_periods=1).median().to_numpy()
        level = np.append(np.nan, level)[k]
        calibrated = np.exp(level + np.log1p(at_cost.astype(float)))
    started = np.sort(past_started)
    hour = np.int64(3_600 * 10**9)
    rate = np.searchsorted(started, at, side="left") - np.searchsorted(
        started, at - hour, side="left"
    )
    return {
        "hist_count": k.astype(float),
        "hist_median_ms": median[k],
        "hist_p90_ms": p90[k],
        "hist_last_ms": last[k],
        "hist_rate_1h": rate.astype(float),
        "hist_calibrated_ms": calibrated,
    }


def concurrency(started: np.ndarray, finished: np.ndarray) -> np.ndarray:
    """For each statement, how many others were running when it started."""
    starts = np.sort(started)
    ends = np.sort(finished)
    began = np.searchsorted(starts, started, side="right")
    ended = np.searchsorted(ends, started, side="right")
    return np.maximum(began - ended - 1, 0).astype(float)


def _ns(values: pd.Series) -> np.ndarray:
    """Nanoseconds since the epoch. pandas 3 infers a timestamp column's unit (microseconds from
    asyncpg's datetimes), so it is converted first: the 1-hour rate window is in ns."""
    return values.dt.as_unit("ns").astype("int64").to_numpy()


def load_slowdown(
    past_finished: np.ndarray,
    past_slowdown: np.ndarray,
    at: np.ndarray,
    window: int = LOAD_WINDOW,
) -> np.ndarray:
    """Median slowdown of the last `window` executions that finished before each time in `at`.

    An execution's slowdown is log(its latency / its template's median latency before it); NaN
    (its template had no history yet) is skipped. It moves every template at once when the host is
    busy. 0 ("as fast as usual") when nothing is known.
    """
    ok = np.isfinite(past_slowdown)
    finished, slow = past_finished[ok], past_slowdown[ok]
    order = np.argsort(finished, kind="stable")
    rolled = pd.Series(slow[order]).rolling(window, min_periods=1).median().to_numpy()
    k = np.searchsorted(finished[order], at, side="left")
    return np.append(0.0, rolled)[k]


def add_history(frame: pd.DataFrame, known: np.ndarray | None = None) -> pd.DataFrame:
    """History and load columns for every row of a log frame (sorted by start).

    With `known` (a boolean per row), only those rows' latencies feed the history and load of any
    row: e.g. the training rows, to score test rows with what was known when training ended.
    """
    out = {name: np.full(len(frame), np.nan) for name in HISTORY_FEATURES}
    known = np.ones(len(frame), dtype=bool) if known is None else np.asarray(known, dtype=bool)
    started, finished = _ns(frame["started_at"]), _ns(frame["finished_at"])
    duration = frame["duration_ms"].to_numpy(float)
    cost = frame["plan_total_cost"].to_numpy(float)
    for _fp, idx in frame.groupby("fingerprint", sort=False).indices.items():
        past = idx[known[idx]]
        hist = history_features(
            started[past], finished[past], duration[past], started[idx], cost[past], cost[idx]
        )
        for name, values in hist.items():
            out[name][idx] = values
    result = frame.assign(**out)
    result["concurrent_statements"] = concurrency(started, finished)
    with np.errstate(divide="ignore", invalid="ignore"):
        slowdown = np.log(np.maximum(duration, 1e-3)) - np.log(out["hist_median_ms"])
    result["load_slowdown"] = load_slowdown(finished[known], slowdown[known], started)
    return result


@dataclass
class StaticFeatures:
    """Static features per (fingerprint, static class), computed once each."""

    explainer: Explainer | None
    catalog_conn: Any = None
    parses: ParseCache = field(default_factory=ParseCache)
    catalog: dict[str, TableStats] = field(default_factory=dict)
    computed: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)

    async def features(self, fingerprint: str, text: str | None, normalized: str) -> dict[str, Any]:
        # query_text is NULL (NaN in a frame) for rows logged without log_parameters
        text = text if isinstance(text, str) and text else normalized
        key = (fingerprint, static_class(text, normalized))
        if key in self.computed:
            return self.computed[key]
        tree = self.parses.parse(f"{fingerprint}.{text_variant(normalized)}", normalized)
        shape = sql_shape(tree)
        missing = [t for t in shape.tables if t not in self.catalog]
        if missing and self.catalog_conn is not None:
            self.catalog.update(await fetch_catalog(self.catalog_conn, missing))
        feats: dict[str, float] = {**shape.features, **catalog_features(shape, self.catalog)}
        plan = None
        if self.explainer is not None:
            plan = await self.explainer.plan(fingerprint, text, normalized, tree)
        feats.update(plan_features(plan))
        self.computed[key] = feats
        return feats


async def store_features(conn: Any, computed: dict[tuple[str, str], dict[str, float]]) -> int:
    """Upsert static features into ml.feature_store (NaN stored as JSON null)."""
    rows = [
        (fp, FEATURE_SET, lclass, json.dumps({k: _json_num(v) for k, v in feats.items()}))
        for (fp, lclass), feats in computed.items()
    ]
    if rows:
        await conn.executemany(
            """
            INSERT INTO ml.feature_store (fingerprint, feature_set, literal_class, features)
            VALUES ($1, $2, $3, $4::jsonb)
            ON CONFLICT (fingerprint, feature_set, literal_class)
            DO UPDATE SET features = EXCLUDED.features, updated_at = now(),
                          version = ml.feature_store.version + 1
            """,
            rows,
        )
    return len(rows)


def _json_num(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


@dataclass
class Dataset:
    """Feature rows with their target (duration_ms) and identifying columns."""

    frame: pd.DataFrame
    features: tuple[str, ...] = FEATURES

    @property
    def X(self) -> pd.DataFrame:
        return self.frame.loc[:, list(self.features)]

    @property
    def y(self) -> np.ndarray:
        return self.frame["duration_ms"].to_numpy(float)

    def __len__(self) -> int:
        return len(self.frame)

    def window(self) -> dict[str, Any]:
        f = self.frame
        if f.empty:
            return {"start": None, "end": None, "rows": 0, "fingerprints": 0}
        return {
            "start": f["started_at"].min().isoformat(),
            "end": f["started_at"].max().isoformat(),
            "rows": len(f),
            "fingerprints": int(f["fingerprint"].nunique()),
            "digest": hashlib.blake2b(
                f["query_id"].astype("int64").to_numpy().tobytes(), digest_size=8
            ).hexdigest(),
        }


async def build_dataset(
    meta_conn: Any,
    warehouse_conn: Any | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    max_rows: int = 200_000,
    database: str | None = None,
    statement_timeout_ms: int = 2_000,
    store: bool = True,
    progress: Progress = _no_progress,
) -> Dataset:
    """Extract the log and compute every feature of every row.

    `warehouse_conn` (default: `meta_conn`) is where EXPLAIN and the catalog are read; only rows
    logged for that connection's database get plan and catalog features.
    """
    wconn = warehouse_conn if warehouse_conn is not None else meta_conn
    progress("extract", 0.0)
    frame = await fetch_log(meta_conn, since, until, max_rows, database)
    progress("extract", 1.0)
    wh_db = await wconn.fetchval("SELECT current_database()")
    static = StaticFeatures(Explainer(wconn, statement_timeout_ms), wconn)
    no_plan = StaticFeatures(None, None, static.parses)
    keys = frame[["fingerprint", "query_text", "normalized_text", "database_name"]]
    uniq = keys.assign(
        lclass=[
            static_class(t if isinstance(t, str) and t else n, n)
            for t, n in zip(keys.query_text, keys.normalized_text, strict=True)
        ]
    )
    groups = uniq.drop_duplicates(["fingerprint", "lclass"])
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for i, r in enumerate(groups.itertuples(index=False)):
        builder = static if r.database_name in (wh_db, None) else no_plan
        rows[(r.fingerprint, r.lclass)] = await builder.features(
            r.fingerprint, r.query_text, r.normalized_text
        )
        progress("features", (i + 1) / max(len(groups), 1))
    if store and static.computed:
        await store_features(meta_conn, static.computed)
    static_frame = pd.DataFrame(
        [rows[(fp, lc)] for fp, lc in zip(uniq.fingerprint, uniq.lclass, strict=True)],
        columns=list(STATIC_FEATURES),
        index=frame.index,
    )
    temporal = pd.DataFrame(
        [temporal_features(ts) for ts in frame["local_started"]],
        columns=list(TEMPORAL_FEATURES),
        index=frame.index,
    )
    frame = pd.concat([frame, static_frame, temporal], axis=1)
    frame["literal_class"] = uniq["lclass"].to_numpy()
    frame = add_history(frame)
    progress("history", 1.0)
    return Dataset(frame.reset_index(drop=True))


# ------------------------------------------------------------------------------------- splits


def time_split(
    n: int, fractions: Sequence[float] = (0.7, 0.15, 0.15)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row positions of train / validation / test for rows sorted by start time."""
    a = round(n * fractions[0])
    b = round(n * (fractions[0] + fractions[1]))
    idx = np.arange(n)
    return idx[:a], idx[a:b], idx[b:]


def template_split(fingerprints: Sequence[str], share: float = 0.2, seed: int = 0) -> set[str]:
    """Fingerprints held out of training, chosen by a seeded hash (stable across runs)."""
    uniq = sorted(set(fingerprints))
    ranked = sorted(uniq, key=lambda fp: hashlib.blake2b(f"{seed}:{fp}".encode()).digest())
    k = max(1, round(len(uniq) * share)) if len(uniq) > 1 else 0
    return set(ranked[:k])
