"""Query clustering: templates (fingerprints of `metadata.query_logs`) grouped QueryBot 5000 style.

A template is described by two blocks, each scaled so it weighs about as much as the other:

- its *features*: the SQL shape of one sqlglot parse (`optimizer.features.SQL_FEATURES`: joins,
  predicates, aggregates, windows, subqueries ...) plus log mean latency and log mean rows,
  standardised column by column and divided by sqrt(#columns);
- the *shape of its arrival-rate history*: hourly arrival counts over the training window,
  L2-normalised, so the squared Euclidean distance of two histories is ``2 - 2 cos`` (cosine
  similarity, as QueryBot 5000 clusters templates), times sqrt(`history_weight`).

`ClusterModel` runs k-means for k = `k_min`..`k_max` and keeps the k with the best silhouette
(Davies-Bouldin is reported beside it); clusters are numbered by share of executions, busiest 0.
New fingerprints are assigned online by `assign`: the nearest centroid in the feature block (a
new template has no history yet). Reclustering is a new training run (`pgsage train clusters`).

Interfaces for the proxy (the lead wires `SHOW CLUSTERS` to it)::

    async def cluster_profiles(conn) -> list[dict]
        # one dict per cluster of the active "clusters" model, busiest first:
        # {"cluster": int, "model_version": int, "templates": int (assigned now, incl. online),
        #  "trained_templates": int, "executions": int, "share_executions": float,
        #  "total_ms": float, "share_time": float, "mean_latency_ms": float,
        #  "tables": [str] (top 5 by executions), "dominant_role": str, "role_share": float,
        #  "silhouette": float | None, "examples": [str] (normalised texts, truncated)}
    async def assign_unassigned(conn, registry) -> int
        # stores the active model's cluster of every logged fingerprint it has not seen

Assignments live in ``metadata.query_clusters`` (model_version, fingerprint, cluster, distance,
source 'train' | 'online').
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.metrics import davies_bouldin_score, silhouette_samples, silhouette_score

from optimizer.features import SQL_FEATURES, sql_shape
from optimizer.parse import ParseCache

if TYPE_CHECKING:
    from .registry import Registry
    from .train import TrainConfig, TrainResult

CLUSTERS = "clusters"
#: statements that count as arrivals of a template (not BEGIN/SET/catalog traffic)
ARRIVAL_COMMANDS = ("SELECT", "INSERT", "UPDATE", "DELETE", "COPY")
EXTRA_FEATURES: tuple[str, ...] = ("log_mean_ms", "log_mean_rows")
FEATURES: tuple[str, ...] = SQL_FEATURES + EXTRA_FEATURES
#: the workload simulator's roles are application_name 'pgsage-workload-<role>'
ROLE_SQL = (
    "CASE WHEN application_name LIKE 'pgsage-workload-%'"
    " THEN substr(application_name, 17) ELSE coalesce(app_class, 'other') END"
)
MAX_HISTORY_BINS = 24 * 28

Progress = Callable[[str, float], None]


def _no_progress(stage: str, fraction: float) -> None:
    return None


# ------------------------------------------------------------------------------------ model


class ClusterModel:
    """k-means over template features and arrival-history shapes, k chosen by silhouette."""

    def __init__(
        self,
        k_min: int = 2,
        k_max: int = 12,
        history_weight: float = 1.0,
        n_init: int = 10,
        random_state: int = 0,
    ) -> None:
        self.k_min = k_min
        self.k_max = k_max
        self.history_weight = history_weight
        self.n_init = n_init
        self.random_state = random_state

    # -- representation

    def _feature_block(self, features: pd.DataFrame) -> np.ndarray:
        X = features.reindex(columns=list(self.feature_names_)).to_numpy(float)
        X = np.where(np.isnan(X), self.fill_[None, :], X)
        return (X - self.center_) / self.scale_ / math.sqrt(X.shape[1])

    def _history_block(self, histories: np.ndarray | None, n: int) -> np.ndarray:
        if histories is None or self.history_bins_ == 0:
            return np.zeros((n, self.history_bins_))
        H = np.asarray(histories, float)
        norm = np.linalg.norm(H, axis=1, keepdims=True)
        H = np.divide(H, norm, out=np.zeros_like(H), where=norm > 0)
        return H * math.sqrt(self.history_weight)

    def transform(self, features: pd.DataFrame, histories: np.ndarray | None = None) -> np.ndarray:
        """The combined representation the centroids live in."""
        f = self._feature_block(features)
        return np.hstack([f, self._history_block(histories, len(f))])

    # -- fit / assign

    def fit(
        self,
        features: pd.DataFrame,
        histories: np.ndarray | None = None,
        weights: Sequence[float] | None = None,
    ) -> ClusterModel:
        """`features`: one row per template (index = fingerprint); `histories`: hourly arrival
        counts aligned with it; `weights` (executions) only order the cluster numbers."""
        self.feature_names_ = [c for c in FEATURES if c in features.columns] or list(
            features.columns
        )
        X = features.reindex(columns=self.feature_names_).to_numpy(float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: filled with 0
            self.fill_ = np.nan_to_num(np.nanmedian(X, axis=0)) if len(X) else np.zeros(X.shape[1])
        X = np.where(np.isnan(X), self.fill_[None, :], X)
        self.center_ = X.mean(axis=0)
        std = X.std(axis=0)
        self.scale_ = np.where(std > 1e-9, std, 1.0)
        self.history_bins_ = 0 if histories is None else int(np.asarray(histories).shape[1])
        Z = self.transform(features, histories)
        n = len(Z)
        self.fingerprints_ = [str(i) for i in features.index]
        self.silhouettes_by_k_: dict[int, float] = {}
        best: tuple[float, int, np.ndarray, np.ndarray] | None = None
        distinct = len(np.unique(np.round(Z, 9), axis=0))
        for k in range(max(self.k_min, 2), min(self.k_max, n - 1, distinct) + 1):
            km = KMeans(k, n_init=self.n_init, random_state=self.random_state).fit(Z)
            s = float(silhouette_score(Z, km.labels_))
            self.silhouettes_by_k_[k] = s
            if best is None or s > best[0] + 1e-9:
                best = (s, k, km.labels_, km.cluster_centers_)
        if best is None:  # too few distinct templates to compare k: one cluster
            labels = np.zeros(n, dtype=int)
            centers = Z.mean(axis=0, keepdims=True)
            self.silhouette_ = math.nan
            self.davies_bouldin_ = math.nan
            sample_sil = np.full(n, math.nan)
        else:
            self.silhouette_, _, labels, centers = best
            self.davies_bouldin_ = float(davies_bouldin_score(Z, labels))
            sample_sil = silhouette_samples(Z, labels)
        # number clusters by executions (busiest first), so ids are stable across reclusterings
        w = np.ones(n) if weights is None else np.asarray(weights, float)
        order = sorted(range(len(centers)), key=lambda c: (-w[labels == c].sum(), c))
        remap = {old: new for new, old in enumerate(order)}
        self.labels_ = np.array([remap[int(c)] for c in labels])
        self.centroids_ = np.asarray(centers)[order]
        self.k_ = len(order)
        self.sample_silhouette_ = sample_sil
        self.distances_ = np.linalg.norm(Z - self.centroids_[self.labels_], axis=1)
        return self

    def assign(self, features: pd.DataFrame | dict[str, float]) -> np.ndarray:
        """Clusters of new templates: the nearest centroid in the feature block."""
        frame = pd.DataFrame([features]) if isinstance(features, dict) else features
        f = self._feature_block(frame)
        c = self.centroids_[:, : f.shape[1]]
        d = ((f[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)
        return d.argmin(axis=1)

    def assign_with_distance(self, features: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        f = self._feature_block(features)
        c = self.centroids_[:, : f.shape[1]]
        d = np.sqrt(((f[:, None, :] - c[None, :, :]) ** 2).sum(axis=2))
        labels = d.argmin(axis=1)
        return labels, d[np.arange(len(f)), labels]

    # -- persistence (plain JSON: the model is a few arrays)

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": {
                "k_min": self.k_min,
                "k_max": self.k_max,
                "history_weight": self.history_weight,
                "n_init": self.n_init,
                "random_state": self.random_state,
            },
            "feature_names": self.feature_names_,
            "fill": self.fill_.tolist(),
            "center": self.center_.tolist(),
            "scale": self.scale_.tolist(),
            "history_bins": self.history_bins_,
            "centroids": self.centroids_.tolist(),
            "k": self.k_,
            "silhouette": _num(self.silhouette_),
            "davies_bouldin": _num(self.davies_bouldin_),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClusterModel:
        model = cls(**d["params"])
        model.feature_names_ = list(d["feature_names"])
        model.fill_ = np.asarray(d["fill"], float)
        model.center_ = np.asarray(d["center"], float)
        model.scale_ = np.asarray(d["scale"], float)
        model.history_bins_ = int(d["history_bins"])
        model.centroids_ = np.asarray(d["centroids"], float)
        model.k_ = int(d["k"])
        model.silhouette_ = math.nan if d["silhouette"] is None else float(d["silhouette"])
        model.davies_bouldin_ = (
            math.nan if d["davies_bouldin"] is None else float(d["davies_bouldin"])
        )
        return model

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path) -> ClusterModel:
        return cls.from_dict(json.loads(path.read_text()))


def _num(v: float) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


# ---------------------------------------------------------------------- templates from the log


def template_features(
    texts: Sequence[str | None],
    fingerprints: Sequence[str],
    mean_ms: Sequence[float],
    mean_rows: Sequence[float],
    parses: ParseCache | None = None,
) -> tuple[pd.DataFrame, list[tuple[str, ...]]]:
    """Feature rows (index = fingerprint) and the tables each template touches."""
    parses = parses or ParseCache()
    rows, tables = [], []
    for fp, text in zip(fingerprints, texts, strict=True):
        shape = sql_shape(parses.parse(fp, text or "") if text else None)
        rows.append(shape.features)
        tables.append(shape.tables)
    frame = pd.DataFrame(rows, index=list(fingerprints), columns=list(SQL_FEATURES))
    frame["log_mean_ms"] = np.log1p(np.maximum(np.asarray(mean_ms, float), 0.0))
    frame["log_mean_rows"] = np.log1p(np.maximum(np.nan_to_num(np.asarray(mean_rows, float)), 0))
    return frame, tables


def _filters(first: int) -> str:
    """The WHERE clause every read of the log shares ($first.. = commands, since, until, db)."""
    a, b, c, d = first, first + 1, first + 2, first + 3
    return (
        f"NOT is_catalog AND command = ANY(${a}::text[])"
        f" AND (${b}::timestamptz IS NULL OR started_at >= ${b})"
        f" AND (${c}::timestamptz IS NULL OR started_at < ${c})"
        f" AND (${d}::text IS NULL OR database_name = ${d})"
    )


async def fetch_templates(
    conn: Any,
    since: datetime | None = None,
    until: datetime | None = None,
    database: str | None = None,
) -> pd.DataFrame:
    """One row per (fingerprint, role): executions, time, rows, a normalised text."""
    rows = await conn.fetch(
        f"""
        SELECT fingerprint, {ROLE_SQL} AS role, count(*) AS executions,
               sum(duration_ms) AS total_ms, avg(rows_returned)::float8 AS mean_rows,
               max(normalized_text) AS normalized_text,
               min(started_at) AS first_seen, max(started_at) AS last_seen
        FROM metadata.query_logs WHERE {_filters(1)}
        GROUP BY 1, 2
        """,
        list(ARRIVAL_COMMANDS),
        since,
        until,
        database,
    )
    cols = ["fingerprint", "role", "executions", "total_ms", "mean_rows", "normalized_text",
            "first_seen", "last_seen"]  # fmt: skip
    return pd.DataFrame([tuple(r) for r in rows], columns=cols)


async def fetch_hourly(
    conn: Any,
    since: datetime | None = None,
    until: datetime | None = None,
    database: str | None = None,
) -> pd.DataFrame:
    """Arrivals per (fingerprint, hour) of the logged clock."""
    rows = await conn.fetch(
        f"""
        SELECT fingerprint, date_bin('1 hour', started_at, TIMESTAMPTZ '2000-01-01 00:00+00')
               AS hour, count(*) AS n
        FROM metadata.query_logs WHERE {_filters(1)}
        GROUP BY 1, 2
        """,
        list(ARRIVAL_COMMANDS),
        since,
        until,
        database,
    )
    frame = pd.DataFrame([tuple(r) for r in rows], columns=["fingerprint", "hour", "n"])
    frame["hour"] = pd.to_datetime(frame["hour"], utc=True)
    return frame


def aggregate_templates(by_role: pd.DataFrame) -> pd.DataFrame:
    """Per fingerprint: executions, total and mean time, mean rows, text, dominant role."""
    g = by_role.groupby("fingerprint", sort=True)
    out = pd.DataFrame(
        {
            "executions": g["executions"].sum(),
            "total_ms": g["total_ms"].sum(),
            "normalized_text": g["normalized_text"].max(),
        }
    )
    weighted = by_role.assign(rows_x=by_role["mean_rows"].fillna(0) * by_role["executions"])
    out["mean_rows"] = weighted.groupby("fingerprint")["rows_x"].sum() / out["executions"]
    out["mean_ms"] = out["total_ms"] / out["executions"]
    top = by_role.sort_values(["executions", "role"], ascending=[False, True])
    out["role"] = top.drop_duplicates("fingerprint").set_index("fingerprint")["role"]
    return out


def history_matrix(
    hourly: pd.DataFrame, fingerprints: Sequence[str], max_bins: int = MAX_HISTORY_BINS
) -> np.ndarray:
    """Hourly counts (fingerprints x the last `max_bins` hours of the log), zeros where idle."""
    if hourly.empty:
        return np.zeros((len(fingerprints), 1))
    last = hourly["hour"].max()
    first = max(hourly["hour"].min(), last - pd.Timedelta(hours=max_bins - 1))
    bins = int((last - first) / pd.Timedelta(hours=1)) + 1
    h = hourly[hourly["hour"] >= first]
    pos = {fp: i for i, fp in enumerate(fingerprints)}
    H = np.zeros((len(fingerprints), bins))
    rows = h["fingerprint"].map(pos)
    ok = rows.notna().to_numpy()
    cols = ((h["hour"] - first) / pd.Timedelta(hours=1)).astype(int).to_numpy()
    np.add.at(H, (rows[ok].astype(int).to_numpy(), cols[ok]), h["n"].to_numpy(float)[ok])
    return H


def profiles(
    model: ClusterModel,
    templates: pd.DataFrame,
    by_role: pd.DataFrame,
    tables: list[tuple[str, ...]],
) -> list[dict[str, Any]]:
    """Per cluster: size, share of executions and time, mean latency, tables, dominant role."""
    t = templates.assign(cluster=model.labels_, silhouette=model.sample_silhouette_)
    t["tables"] = tables
    total_exec = float(t["executions"].sum()) or 1.0
    total_ms = float(t["total_ms"].sum()) or 1.0
    roles = by_role.assign(cluster=by_role["fingerprint"].map(t["cluster"]))
    out = []
    for c in range(model.k_):
        rows = t[t["cluster"] == c]
        execs = float(rows["executions"].sum())
        table_counts: dict[str, float] = {}
        for tabs, n in zip(rows["tables"], rows["executions"], strict=True):
            for name in tabs:
                table_counts[name] = table_counts.get(name, 0.0) + float(n)
        r = roles[roles["cluster"] == c].groupby("role")["executions"].sum()
        r = r.sort_values(ascending=False, kind="stable")
        sil = rows["silhouette"].to_numpy(float)
        examples = rows.sort_values("executions", ascending=False)["normalized_text"].head(3)
        out.append(
            {
                "cluster": c,
                "templates": len(rows),
                "executions": int(execs),
                "share_executions": execs / total_exec,
                "total_ms": float(rows["total_ms"].sum()),
                "share_time": float(rows["total_ms"].sum()) / total_ms,
                "mean_latency_ms": float(rows["total_ms"].sum()) / execs if execs else None,
                "tables": [k for k, _ in sorted(table_counts.items(), key=lambda kv: -kv[1])][:5],
                "dominant_role": str(r.index[0]) if len(r) else None,
                "role_share": float(r.iloc[0] / r.sum()) if len(r) and r.sum() else None,
                "silhouette": float(np.nanmean(sil)) if np.isfinite(sil).any() else None,
                "fingerprints": sorted(rows.index.tolist()),
                "examples": [(s or "")[:160] for s in examples],
            }
        )
    return out


async def store_assignments(
    conn: Any,
    version: int,
    fingerprints: Sequence[str],
    labels: Sequence[int],
    distances: Sequence[float],
    source: str = "train",
) -> int:
    rows = [
        (version, fp, int(c), float(d), source)
        for fp, c, d in zip(fingerprints, labels, distances, strict=True)
    ]
    await conn.executemany(
        """
        INSERT INTO metadata.query_clusters (model_version, fingerprint, cluster, distance, source)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (model_version, fingerprint) DO UPDATE
        SET cluster = EXCLUDED.cluster, distance = EXCLUDED.distance, source = EXCLUDED.source,
            assigned_at = now()
        """,
        rows,
    )
    return len(rows)


# -------------------------------------------------------------------- fit from a template set


def fit_clusters(
    by_role: pd.DataFrame,
    hourly: pd.DataFrame,
    model: ClusterModel | None = None,
) -> tuple[ClusterModel, pd.DataFrame, dict[str, Any]]:
    """Fit on logged templates; returns the model, the template table and the card's info."""
    templates = aggregate_templates(by_role)
    fps = templates.index.tolist()
    feats, tables = template_features(
        templates["normalized_text"].tolist(),
        fps,
        templates["mean_ms"].tolist(),
        templates["mean_rows"].tolist(),
    )
    H = history_matrix(hourly, fps)
    model = (model or ClusterModel()).fit(feats, H, weights=templates["executions"].to_numpy())
    info = {
        "metrics": {
            "silhouette": _num(model.silhouette_),
            "davies_bouldin": _num(model.davies_bouldin_),
            "k": model.k_,
            "templates": len(fps),
            "coverage": 1.0,
            "silhouette_by_k": {str(k): v for k, v in model.silhouettes_by_k_.items()},
        },
        "profiles": profiles(model, templates, by_role, tables),
        "params": model.to_dict()["params"],
        "features": list(model.feature_names_),
        "history_bins": model.history_bins_,
    }
    return model, templates, info


# ------------------------------------------------------------------------ registry & trainer


def card_markdown_for(card: dict[str, Any], fallback: Callable[[dict[str, Any]], str]) -> str:
    """A card for people: the metrics table, then profiles or per-series results."""
    m = card.get("metrics", {})
    window = card.get("data_window", {})
    lines = [
        f"# {card.get('name')} v{card.get('version')}",
        "",
        str(card.get("description", "")),
        "",
        f"- created: {card.get('created_at')}",
        f"- status: {card.get('status', '')} ({card.get('reason', '')})",
        f"- data window: {window.get('start')} .. {window.get('end')},"
        f" {window.get('rows')} statements, {window.get('fingerprints')} templates",
        f"- libraries: {', '.join(f'{k} {v}' for k, v in card.get('libraries', {}).items())}",
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k, v in m.items():
        if isinstance(v, int | float) or v is None:
            lines.append(f"| {k} | {'—' if v is None else round(float(v), 4)} |")
    for p in card.get("profiles", []):
        if p is card.get("profiles", [])[0]:
            lines += ["", "## Clusters", "", "| cluster | templates | executions | time |"
                      " mean ms | role | tables |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        mean = p.get("mean_latency_ms")
        lines.append(
            f"| {p['cluster']} | {p['templates']} | {p['share_executions']:.1%} |"
            f" {p['share_time']:.1%} | {'—' if mean is None else f'{mean:.2f}'} |"
            f" {p['dominant_role']} | {', '.join(p['tables'][:3])} |"
        )
    series = card.get("series", {})
    if series:
        lines += ["", "## Series (test span)", "", "| series | model | mape 1h | mape 6h |"
                  " naive mape 1h |", "|---|---|---|---|---|"]  # fmt: skip
        for name, s in series.items():
            t = s.get("test", {})

            def f(v: Any) -> str:
                return "—" if v is None else f"{v:.3f}"

            lines.append(
                f"| {name} | {s.get('model')} | {f(t.get('mape_1h'))} | {f(t.get('mape_6h'))} |"
                f" {f(s.get('naive_test', {}).get('mape_1h'))} |"
            )
    lines += ["", "## Parameters", "", "```json", json.dumps(card.get("params", {})), "```", ""]
    return "\n".join(lines)


async def train_clusters(
    meta_conn: Any,
    warehouse_conn: Any | None,
    registry: Registry,
    config: TrainConfig,
    progress: Progress = _no_progress,
) -> TrainResult:
    """Cluster the logged templates, store assignments, gate and register a version."""
    from .registry import card_markdown
    from .train import new_card, run_registered

    version = await registry.next_version(CLUSTERS)
    card = new_card(
        CLUSTERS,
        version,
        "Templates clustered by SQL features and arrival-history shape"
        " (k-means, k by silhouette; QueryBot 5000 style).",
        config,
    )

    async def work(art: Path) -> tuple[bool, str]:
        progress("extract", 0.0)
        by_role = await fetch_templates(meta_conn, config.since, config.until, config.database)
        hourly = await fetch_hourly(meta_conn, config.since, config.until, config.database)
        progress("extract", 1.0)
        executions = int(by_role["executions"].sum()) if len(by_role) else 0
        if executions < config.min_rows:
            raise ValueError(f"{executions} logged statements, fewer than {config.min_rows}")
        model, templates, info = fit_clusters(
            by_role, hourly, ClusterModel(random_state=config.seed)
        )
        progress("fit", 1.0)
        card.update(info)
        card["data_window"] = {
            "start": by_role["first_seen"].min().isoformat(),
            "end": by_role["last_seen"].max().isoformat(),
            "rows": executions,
            "fingerprints": len(templates),
        }
        await store_assignments(
            meta_conn,
            version,
            templates.index.tolist(),
            model.labels_.tolist(),
            model.distances_.tolist(),
        )
        art.mkdir(parents=True, exist_ok=True)
        model.save(art / "model.json")
        progress("register", 1.0)
        return gate(model, len(templates))

    async def cleanup() -> None:
        await meta_conn.execute(
            "DELETE FROM metadata.query_clusters WHERE model_version = $1", version
        )

    result = await run_registered(
        CLUSTERS, registry, card, work, cleanup, lambda c: card_markdown_for(c, card_markdown)
    )
    await _prune_assignments(meta_conn)
    return result


def gate(model: ClusterModel, templates: int) -> tuple[bool, str]:
    """A clustering serves when it is well defined; newer data replaces older clusters."""
    if model.k_ == 1:
        return True, f"one cluster of {templates} templates (too few to compare k)"
    if not np.isfinite(model.silhouette_):
        return False, "silhouette is not finite"
    if model.silhouette_ <= 0:
        return False, f"silhouette {model.silhouette_:.3f} <= 0: no cluster structure"
    return True, (
        f"k={model.k_} by silhouette {model.silhouette_:.3f}"
        f" (Davies-Bouldin {model.davies_bouldin_:.3f}) over {templates} templates"
    )


async def _prune_assignments(conn: Any) -> None:
    """Assignments of versions the registry no longer holds go with them."""
    await conn.execute(
        "DELETE FROM metadata.query_clusters q WHERE NOT EXISTS (SELECT 1 FROM ml.model_registry"
        " r WHERE r.model_name = $1 AND r.version = q.model_version)",
        CLUSTERS,
    )


# ------------------------------------------------------------------------ serving side


async def active_entry(conn: Any) -> tuple[int, dict[str, Any], str | None] | None:
    """(version, card, artifact_path) of the active clustering, or None."""
    row = await conn.fetchrow(
        "SELECT version, card, artifact_path FROM ml.model_registry"
        " WHERE model_name = $1 AND is_active",
        CLUSTERS,
    )
    if row is None:
        return None
    card = row["card"]
    return (
        int(row["version"]),
        json.loads(card) if isinstance(card, str) else card,
        row["artifact_path"],
    )


async def load_active(conn: Any) -> tuple[ClusterModel, int] | None:
    found = await active_entry(conn)
    if found is None or not found[2]:
        return None
    path = Path(found[2]) / "model.json"
    if not path.exists():
        return None
    return ClusterModel.load(path), found[0]


async def cluster_profiles(conn: Any) -> list[dict[str, Any]]:
    """Profiles of the active clustering (see the module docstring), busiest first."""
    found = await active_entry(conn)
    if found is None:
        return []
    version, card, _ = found
    counts = {
        r["cluster"]: r["n"]
        for r in await conn.fetch(
            "SELECT cluster, count(*) AS n FROM metadata.query_clusters"
            " WHERE model_version = $1 GROUP BY cluster",
            version,
        )
    }
    out = []
    for p in card.get("profiles", []):
        row = {k: v for k, v in p.items() if k != "fingerprints"}
        row["model_version"] = version
        row["trained_templates"] = p.get("templates")
        row["templates"] = int(counts.get(p["cluster"], p.get("templates") or 0))
        out.append(row)
    return out


async def assign_unassigned(conn: Any, registry: Registry | None = None) -> int:
    """Assign every logged template the active clustering has not seen (nearest centroid)."""
    loaded = await load_active(conn)
    if loaded is None:
        return 0
    model, version = loaded
    rows = await conn.fetch(
        f"""
        SELECT l.fingerprint, max(l.normalized_text) AS normalized_text,
               avg(l.duration_ms)::float8 AS mean_ms, avg(l.rows_returned)::float8 AS mean_rows
        FROM metadata.query_logs l
        WHERE {_filters(2)}
          AND NOT EXISTS (SELECT 1 FROM metadata.query_clusters q
                          WHERE q.model_version = $1 AND q.fingerprint = l.fingerprint)
        GROUP BY l.fingerprint
        """,
        version,
        list(ARRIVAL_COMMANDS),
        None,
        None,
        None,
    )
    if not rows:
        return 0
    fps = [r["fingerprint"] for r in rows]
    feats, _ = template_features(
        [r["normalized_text"] for r in rows],
        fps,
        [r["mean_ms"] or 0.0 for r in rows],
        [r["mean_rows"] for r in rows],
    )
    labels, dist = model.assign_with_distance(feats)
    return await store_assignments(
        conn, version, fps, labels.tolist(), dist.tolist(), source="online"
    )
