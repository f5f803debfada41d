"""Serving the cost model: a per-fingerprint prediction cache in front of the active model.

Redshift's Stage predictor puts a per-query cache in front of its model; so does pgsage. The
query log worker asks `predicted(fingerprint)` for every logged execution (a dict lookup); a
miss is remembered and computed later by `fill()` in the background (static features with
EXPLAIN, history from the live aggregates, calendar of now), never delaying anything. The cache
is dropped when another model version becomes active and entries expire after `ttl` seconds,
so history features follow the workload.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from optimizer.features import temporal_features

from .dataset import FEATURES, MODELLED_COMMANDS, Explainer, StaticFeatures
from .registry import Registry, model_dir
from .train import load_active_cost_model


@dataclass(frozen=True, slots=True)
class History:
    """What the live aggregates know of a fingerprint (the serving side of history features)."""

    calls: int
    median_ms: float | None
    p90_ms: float | None
    mean_ms: float | None
    rate_1h: float | None = None


class CostServer:
    def __init__(self, ttl: float = 120.0, max_entries: int = 20_000, max_pending: int = 2_000):
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_pending = max_pending
        self.model: Any = None
        self.version: str | None = None
        self._cache: OrderedDict[str, tuple[float, float]] = OrderedDict()  # fp -> (ms, at)
        self._pending: OrderedDict[str, tuple[str, str | None, str]] = OrderedDict()
        self._static: StaticFeatures | None = None
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------ lookups (per record)

    def predicted(self, fingerprint: str, command: str, text: str | None, normalized: str
                  ) -> float | None:  # fmt: skip
        """The cached prediction in ms, or None (the miss is queued for `fill`)."""
        if self.model is None or command not in MODELLED_COMMANDS:
            return None
        hit = self._cache.get(fingerprint)
        if hit is not None and time.monotonic() - hit[1] < self.ttl:
            self.hits += 1
            return hit[0]
        self.misses += 1
        if fingerprint not in self._pending and len(self._pending) < self.max_pending:
            self._pending[fingerprint] = (command, text, normalized)
        return hit[0] if hit is not None else None  # a stale value beats none until refreshed

    # ------------------------------------------------------------------ background

    async def refresh_model(self, meta_conn: Any, root: str | None = None) -> bool:
        """Load the active version if it changed; True when the model changed."""
        loaded = await load_active_cost_model(Registry(meta_conn, model_dir(root)))
        version = None if loaded is None else f"{loaded[1].name}:v{loaded[1].version}"
        if version == self.version:
            return False
        self.model = None if loaded is None else loaded[0]
        self.version = version
        self._cache.clear()
        return True

    async def fill(self, warehouse_conn: Any, history: dict[str, History], now: datetime,
                   limit: int = 50, statement_timeout_ms: int = 2_000) -> int:  # fmt: skip
        """Compute up to `limit` queued predictions; returns how many were computed."""
        if self.model is None or not self._pending:
            return 0
        if self._static is None:
            self._static = StaticFeatures(Explainer(warehouse_conn, statement_timeout_ms),
                                          warehouse_conn)  # fmt: skip
        todo = []
        while self._pending and len(todo) < limit:
            todo.append(self._pending.popitem(last=False))
        rows = []
        calendar = temporal_features(now)
        for fp, (_command, text, normalized) in todo:
            try:
                feats = dict(await self._static.features(fp, text, normalized))
            except Exception:  # EXPLAIN of a statement that no longer plans: no prediction
                continue
            h = history.get(fp)
            feats.update(calendar)
            feats.update(_history(h))
            rows.append((fp, feats))
        if not rows:
            return 0
        frame = pd.DataFrame([f for _, f in rows]).reindex(columns=list(FEATURES))
        names = list(getattr(self.model, "feature_names_", FEATURES))
        predicted = self.model.predict(frame.reindex(columns=names).astype(float))
        at = time.monotonic()
        for (fp, _), ms in zip(rows, np.asarray(predicted, dtype=float), strict=True):
            if math.isfinite(ms):
                self._cache[fp] = (float(ms), at)
                self._cache.move_to_end(fp)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return len(rows)


def _history(h: History | None) -> dict[str, float]:
    nan = float("nan")
    if h is None:
        return {"hist_count": 0.0}
    return {
        "hist_count": float(h.calls),
        "hist_median_ms": nan if h.median_ms is None else h.median_ms,
        "hist_p90_ms": nan if h.p90_ms is None else h.p90_ms,
        "hist_last_ms": nan if h.mean_ms is None else h.mean_ms,
        "hist_rate_1h": nan if h.rate_1h is None else h.rate_1h,
    }
