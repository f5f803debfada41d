"""Serving the cost model: a prediction cache per fingerprint and literal class in front of the
active model.

Redshift's Stage predictor puts a per-query cache in front of its model; so does pgsage. The
query log worker asks `predicted(fingerprint, command, text, normalized)` for every logged
execution: a dict lookup keyed by the fingerprint and the *static class* of the text
(`models.dataset.static_class`: the literal class, so that a 1-day and a 90-day range of one
template are predicted apart, and the normalised-text variant). The class of a text is
memoised, so a repeated text costs two dict lookups. A miss is remembered and computed later by
`fill()` in the background (static features with EXPLAIN of the text as sent, in the database it
ran in, history from the live aggregates, calendar of now), never delaying anything; until then
the latest prediction of another class of the same fingerprint stands in. The cache is dropped
when another model version becomes active and entries expire after `ttl` seconds, so history
features follow the workload.

Serving fills exactly the features the model trains on (`models.dataset.FEATURES`): static,
temporal and history features. Load at the time of each execution is deliberately not a model
feature: a prediction cached per class and reused for `ttl` seconds cannot know it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from optimizer.features import temporal_features
from optimizer.literals import ClassKeys

from .dataset import (
    FEATURES,
    HISTORY_FEATURES,
    HISTORY_WINDOW,
    MODELLED_COMMANDS,
    STATIC_FEATURES,
    Explainer,
    StaticFeatures,
    history_features,
    text_variant,
)
from .registry import Registry, model_dir

#: a cache key: (fingerprint, static class of the text)
Key = tuple[str, str]
#: texts whose static class is memoised (the memo is cleared when it grows past this)
MAX_CLASS_MEMO = 50_000
#: databases whose static features (and EXPLAIN connections) are kept at once
MAX_DATABASES = 8
#: start times kept per fingerprint for the rate over the past hour
MAX_STARTS = 5_000
_HOUR = 3_600.0


@dataclass(frozen=True, slots=True)
class History:
    """What the live aggregates know of a fingerprint (the serving side of history features)."""

    calls: int
    median_ms: float | None
    p90_ms: float | None
    mean_ms: float | None
    rate_1h: float | None = None
    #: latency of the latest execution; the mean stands in when the caller does not know it
    last_ms: float | None = None


class CostServer:
    def __init__(self, ttl: float = 120.0, max_entries: int = 20_000, max_pending: int = 2_000):
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_pending = max_pending
        self.model: Any = None
        self.version: str | None = None
        self._cache: OrderedDict[Key, tuple[float, float]] = OrderedDict()  # key -> (ms, at)
        #: the latest prediction of any class per fingerprint: a stand-in for a new class
        self._latest: dict[str, float] = {}
        #: key -> (command, text, normalized, database it ran in)
        self._pending: OrderedDict[Key, tuple[str, str | None, str, str | None]] = OrderedDict()
        self._keys = ClassKeys(text_variant, MAX_CLASS_MEMO)
        #: static features per database the statements ran in, each with the connection its
        #: EXPLAINs and catalog reads use (None: the warehouse connection given to `fill`)
        self._statics: OrderedDict[str | None, tuple[Any, StaticFeatures]] = OrderedDict()
        #: observed executions per fingerprint: (started, finished, ms, (text, normalized)),
        #: the latest HISTORY_WINDOW; start times of the past hour; how many in all
        self._recent: dict[str, deque[tuple[float, float, float, tuple[str | None, str]]]] = {}
        self._starts: dict[str, deque[float]] = {}
        self._count: dict[str, int] = {}
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------ lookups (per record)

    def key(self, fingerprint: str, text: str | None, normalized: str) -> Key:
        """The cache key of an execution, with the same static class training uses."""
        return self._keys.key(fingerprint, text, normalized)  # (compiled)

    def predicted(self, fingerprint: str, command: str, text: str | None, normalized: str,
                  database: str | None = None) -> float | None:  # fmt: skip
        """The cached prediction in ms, or None (the miss is queued for `fill`, which plans the
        text in `database`, the one it ran in; None: the warehouse database)."""
        if self.model is None or command not in MODELLED_COMMANDS:
            return None
        key = self._keys.key(fingerprint, text, normalized)  # (self.key, without a call)
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[1] < self.ttl:
            self.hits += 1
            return hit[0]
        self.misses += 1
        if key not in self._pending and len(self._pending) < self.max_pending:
            self._pending[key] = (command, text, normalized, database)
        if hit is not None:  # a stale value beats none until refreshed
            return hit[0]
        return self._latest.get(fingerprint)

    def observe(self, fingerprint: str, command: str, text: str | None, normalized: str,
                started: float, finished: float, duration_ms: float) -> None:  # fmt: skip
        """One finished, successful execution (times in epoch seconds of the log's clock).

        With executions observed, `fill` computes a template's history features with
        `history_features`, the very function training uses (rolling median, p90, last,
        rate over the past hour, and the latency per unit of plan cost scaled to the class
        predicted); without, it reads the live aggregates passed to it.
        """
        self.observe_many(
            fingerprint, command, [started], [(started, finished, duration_ms, text, normalized)]
        )

    def observe_many(
        self,
        fingerprint: str,
        command: str,
        starts: Sequence[float],
        latest: Sequence[tuple[float, float, float, str | None, str]],
    ) -> None:
        """A batch of one fingerprint's finished, successful executions, in the order they were
        logged: the start time of each, and (started, finished, ms, text, normalized) of at least
        the last `HISTORY_WINDOW` of them (the rolling window keeps no more; the log worker
        hands over a batch of a template's executions in one call, not one call each)."""
        if command not in MODELLED_COMMANDS or not starts:
            return
        # the literal class is computed when the history is read (`_observed`): that happens
        # for the executions a prediction is computed for, not for every logged one
        recent = self._recent.get(fingerprint)
        if recent is None:
            if len(self._recent) >= self.max_entries:  # the longest-known fingerprint goes
                self.forget(next(iter(self._recent)))
            recent = self._recent[fingerprint] = deque(maxlen=HISTORY_WINDOW)
            self._starts[fingerprint] = deque(maxlen=MAX_STARTS)
        recent.extend(
            (started, finished, ms, (text, normalized))
            for started, finished, ms, text, normalized in latest[-HISTORY_WINDOW:]
        )
        kept = self._starts[fingerprint]
        kept.extend(starts[-MAX_STARTS:])
        horizon = starts[-1] - _HOUR
        while kept[0] < horizon:
            kept.popleft()
        self._count[fingerprint] = self._count.get(fingerprint, 0) + len(starts)

    def _observed(
        self,
        key: Key,
        at: float,
        cost: float,
        computed: dict[tuple[str, str], dict[str, float]] | None = None,
    ) -> dict[str, float] | None:
        """History features of `key`'s template at `at` from observed executions (None when
        none were observed); `computed` holds the static features of its database."""
        recent = self._recent.get(key[0])
        if not recent:
            return None
        if computed is None:
            computed = {}
        ns = 1e9
        _, finished_, ms_, texts = zip(*recent, strict=True)
        finished, ms = np.asarray(finished_), np.asarray(ms_)
        classes = [self.key(key[0], t, n)[1] for t, n in texts]
        costs = [computed.get((key[0], c), {}).get("plan_total_cost", math.nan) for c in classes]
        starts = np.asarray(self._starts[key[0]], dtype=float)
        out = history_features(
            (starts * ns).astype(np.int64),
            (finished * ns).astype(np.int64),
            ms.astype(float),
            np.array([int(at * ns)], dtype=np.int64),
            np.asarray(costs, dtype=float),
            np.array([cost], dtype=float),
        )
        feats = {k: float(v[0]) for k, v in out.items()}
        # the window holds the latest executions; the count is of all of them
        feats["hist_count"] = float(self._count[key[0]] - int(np.sum(finished >= at)))
        return feats

    # ------------------------------------------------------------------ background

    async def refresh_model(self, meta_conn: Any, root: str | None = None) -> bool:
        """Load the active version if it changed; True when the model changed."""
        from .train import load_active_cost_model  # (scikit-learn and LightGBM: seconds)

        loaded = await load_active_cost_model(Registry(meta_conn, model_dir(root)))
        version = None if loaded is None else f"{loaded[1].name}:v{loaded[1].version}"
        if version == self.version:
            return False
        self.model = None if loaded is None else loaded[0]
        self.version = version
        self._cache.clear()
        self._latest.clear()
        return True

    def forget(self, fingerprint: str) -> None:
        """Drop what was observed of a fingerprint (e.g. one the live aggregates evicted)."""
        for table in (self._recent, self._starts, self._count):
            table.pop(fingerprint, None)

    def _static_for(
        self, database: str | None, conn: Any, statement_timeout_ms: int
    ) -> StaticFeatures:
        """The static features of `database`, planned on `conn` (started again when the
        connection changed: a reconnect must not leave EXPLAIN on a closed one)."""
        held = self._statics.get(database)
        if held is not None and held[0] is conn:
            self._statics.move_to_end(database)
            return held[1]
        static = StaticFeatures(Explainer(conn, statement_timeout_ms), conn)
        self._statics[database] = (conn, static)
        self._statics.move_to_end(database)
        while len(self._statics) > MAX_DATABASES:
            self._statics.popitem(last=False)
        return static

    async def fill(
        self,
        warehouse_conn: Any,
        history: dict[str, History],
        now: datetime,
        limit: int = 50,
        statement_timeout_ms: int = 2_000,
        conn_for: Callable[[str], Awaitable[Any]] | None = None,
    ) -> int:
        """Compute up to `limit` queued predictions; returns how many were computed.

        A statement is planned in the database it ran in: `conn_for(database)` gives a
        connection to it (without `conn_for`, or for no database: `warehouse_conn`)."""
        if self.model is None or not self._pending:
            return 0
        todo: list[tuple[Key, tuple[str, str | None, str, str | None]]] = []
        while self._pending and len(todo) < limit:
            todo.append(self._pending.popitem(last=False))
        rows = []
        for key, (_command, text, normalized, database) in todo:
            conn = warehouse_conn
            if database is not None and conn_for is not None:
                try:
                    conn = await conn_for(database)
                except Exception:  # that database cannot be reached: no prediction
                    continue
            statics = self._static_for(
                None if conn is warehouse_conn else database, conn, statement_timeout_ms
            )
            try:
                static = await statics.features(key[0], text, normalized)
            except Exception:  # EXPLAIN of a statement that no longer plans: no prediction
                continue
            feats = serving_features(static, history.get(key[0]), now)
            observed = self._observed(
                key, now.timestamp(), static.get("plan_total_cost", math.nan), statics.computed
            )
            if observed is not None:
                feats.update(observed)
            rows.append((key, feats))
        if not rows:
            return 0
        frame = pd.DataFrame([f for _, f in rows]).reindex(columns=list(FEATURES))
        names = list(getattr(self.model, "feature_names_", FEATURES))
        predicted = self.model.predict(frame.reindex(columns=names).astype(float))
        at = time.monotonic()
        for (key, _), ms in zip(rows, np.asarray(predicted, dtype=float), strict=True):
            if math.isfinite(ms):
                self._cache[key] = (float(ms), at)
                self._cache.move_to_end(key)
                self._latest[key[0]] = float(ms)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        if len(self._latest) > self.max_entries:
            self._latest = {fp: self._latest[fp] for fp, _ in self._cache}
        return len(rows)


def serving_features(
    static: dict[str, float], history: History | None, now: datetime
) -> dict[str, float]:
    """The feature row of one prediction: every name in `FEATURES`, as training computes it
    (static features of the text, the calendar of `now`, the template's history)."""
    feats: dict[str, float] = dict.fromkeys(FEATURES, math.nan)
    feats.update({k: static.get(k, math.nan) for k in STATIC_FEATURES})
    feats.update(temporal_features(now))
    feats.update(_history(history))
    return feats


def _history(h: History | None) -> dict[str, float]:
    nan = float("nan")
    out = dict.fromkeys(HISTORY_FEATURES, nan)
    if h is None:
        out["hist_count"] = 0.0
        return out
    last = h.last_ms if h.last_ms is not None else h.mean_ms
    out.update(
        hist_count=float(h.calls),
        hist_median_ms=nan if h.median_ms is None else h.median_ms,
        hist_p90_ms=nan if h.p90_ms is None else h.p90_ms,
        hist_last_ms=nan if last is None else last,
        hist_rate_1h=nan if h.rate_1h is None else h.rate_1h,
    )
    return out
