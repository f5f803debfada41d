"""The cost (latency) predictor, its baselines and the accuracy report they share.

`CostModel` is LightGBM regression on log latency over the features of `models.dataset`, with a
second, history-free booster for templates that have no history yet (``hist_count`` 0: a template
never seen before, in training or online), which the main booster has hardly any rows of.
Baselines, fitted on the same training rows and scored on the same held-out rows:

- `FingerprintMedian`: the template's median latency (global median for unseen templates);
- `ExplainCostFit(scope="fingerprint" | "global")`: PostgreSQL's EXPLAIN total cost calibrated
  by a log-log linear fit, per template (falling back to the global fit) or for all rows.

All follow scikit-learn's conventions: `__init__` stores parameters, `fit` returns self, fitted
attributes end in ``_``; `predict` returns milliseconds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin

#: latencies are floored here before taking logs (the proxy's timer resolution is ~1 µs)
MIN_MS = 0.01
#: a fast/medium/slow class split for the confusion matrix, in ms
CLASS_EDGES = (1.0, 100.0)
#: features of a template's own past executions (blank for a template never seen before)
HISTORY_PREFIX = "hist_"
HISTORY_COUNT = "hist_count"
CALIBRATED, MEDIAN, PLAN_COST = "hist_calibrated_ms", "hist_median_ms", "plan_total_cost"
#: the line after which a saved model file holds the cold-start booster
COLD_MARKER = "# pgsage: cold-start booster"


def log_ms(values: Any) -> np.ndarray:
    return np.log(np.maximum(np.asarray(values, dtype=float), MIN_MS))


class CostModel(RegressorMixin, BaseEstimator):
    """LightGBM on log(latency in ms); `predict` returns ms.

    `objective` is LightGBM's: ``regression`` (L2: the mean of log latency), ``huber`` or
    ``l1`` (the median: robust to the latency spikes of a busy host, and what minimises the
    absolute error in ms).

    With `cold_start` (and a ``hist_count`` column), a second booster is fitted on the same rows
    without the history features and predicts the rows whose template has no history yet: the
    main booster learns to lean on a template's history and has only its first execution to
    learn what to do without it, which generalises badly to new templates.
    """

    def __init__(
        self,
        n_estimators: int = 400,
        learning_rate: float = 0.05,
        num_leaves: int = 31,
        min_child_samples: int = 10,
        subsample: float = 0.9,
        colsample_bytree: float = 0.9,
        reg_lambda: float = 1.0,
        early_stopping_rounds: int = 40,
        cold_start: bool = True,
        objective: str = "regression",
        random_state: int = 0,
        n_jobs: int = 1,
    ) -> None:
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.reg_lambda = reg_lambda
        self.early_stopping_rounds = early_stopping_rounds
        self.cold_start = cold_start
        self.objective = objective
        self.random_state = random_state
        self.n_jobs = n_jobs

    def _lgb_params(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_child_samples,
            "bagging_fraction": self.subsample,
            "bagging_freq": 1 if self.subsample < 1 else 0,
            "feature_fraction": self.colsample_bytree,
            "lambda_l2": self.reg_lambda,
            "seed": self.random_state,
            "num_threads": self.n_jobs,
            "deterministic": True,
            "verbosity": -1,
        }

    def fit(
        self,
        X: pd.DataFrame,
        y: Any,
        eval_set: tuple[pd.DataFrame, Any] | None = None,
    ) -> CostModel:
        """Fit on latencies `y` (ms); with `eval_set`, stop early on its log-space L2."""
        self.feature_names_ = [str(c) for c in X.columns]
        self.n_features_in_ = len(self.feature_names_)
        self.booster_, self.best_iteration_ = self._train(X, y, eval_set, self.feature_names_)
        self.cold_booster_: lgb.Booster | None = None
        self.cold_iteration_ = 0
        cold = [f for f in self.feature_names_ if not f.startswith(HISTORY_PREFIX)]
        if self.cold_start and HISTORY_COUNT in self.feature_names_ and cold:
            self.cold_booster_, self.cold_iteration_ = self._train(X, y, eval_set, cold)
        return self

    def _train(
        self,
        X: pd.DataFrame,
        y: Any,
        eval_set: tuple[pd.DataFrame, Any] | None,
        names: list[str],
    ) -> tuple[lgb.Booster, int]:
        train = lgb.Dataset(X[names], label=log_ms(y), free_raw_data=True)
        valid = []
        callbacks = []
        if eval_set is not None:
            Xv, yv = eval_set
            valid = [lgb.Dataset(Xv[names], label=log_ms(yv), reference=train)]
            callbacks = [lgb.early_stopping(self.early_stopping_rounds, verbose=False)]
        booster = lgb.train(
            self._lgb_params(),
            train,
            num_boost_round=self.n_estimators,
            valid_sets=valid,
            callbacks=callbacks,
        )
        return booster, int(booster.best_iteration or booster.num_trees())

    def predict_log(self, X: pd.DataFrame) -> np.ndarray:
        X = _fill_calibration(X)
        out = self.booster_.predict(X[self.feature_names_], num_iteration=self.best_iteration_)
        out = np.asarray(out, dtype=float)
        cold_booster = getattr(self, "cold_booster_", None)
        if cold_booster is not None and HISTORY_COUNT in X.columns:
            rows = np.flatnonzero(~(X[HISTORY_COUNT].to_numpy(float) > 0))  # 0 or unknown
            if len(rows):
                cold = X.iloc[rows][cold_booster.feature_name()]
                out[rows] = cold_booster.predict(cold, num_iteration=self.cold_iteration_)
        return out

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return np.exp(self.predict_log(X))

    def feature_importance(self) -> dict[str, float]:
        """Total gain per feature, as a share of the total (largest first)."""
        gain = self.booster_.feature_importance("gain", iteration=self.best_iteration_)
        total = float(gain.sum()) or 1.0
        pairs = sorted(zip(self.feature_names_, gain, strict=True), key=lambda p: -p[1])
        return {name: round(float(g) / total, 5) for name, g in pairs}

    def save(self, path: Path) -> None:
        """LightGBM's own text format (the best iteration only), with the cold-start booster,
        if any, appended after `COLD_MARKER`: LightGBM itself reads such a file as the main
        booster alone, and the artifact stays one file."""
        text = self.booster_.model_to_string(num_iteration=self.best_iteration_)
        if getattr(self, "cold_booster_", None) is not None:
            cold = self.cold_booster_.model_to_string(num_iteration=self.cold_iteration_)
            text = f"{text.rstrip()}\n{COLD_MARKER}\n{cold}"
        Path(path).write_text(text)

    @classmethod
    def load(cls, path: Path, params: dict[str, Any] | None = None) -> CostModel:
        model = cls(**(params or {}))
        main, _, cold = Path(path).read_text().partition(f"\n{COLD_MARKER}\n")
        model.booster_ = lgb.Booster(model_str=main)
        model.feature_names_ = list(model.booster_.feature_name())
        model.n_features_in_ = len(model.feature_names_)
        model.best_iteration_ = model.booster_.num_trees()
        model.cold_booster_, model.cold_iteration_ = None, 0
        if model.cold_start and cold.strip():  # versions saved before cold start have none
            model.cold_booster_ = lgb.Booster(model_str=cold)
            model.cold_iteration_ = model.cold_booster_.num_trees()
        return model


def _fill_calibration(X: pd.DataFrame) -> pd.DataFrame:
    """``hist_calibrated_ms`` from ``hist_median_ms`` where a row has history and a plan cost
    but no calibration: the live aggregates serving reads (models/serve.py) keep no latency per
    unit of cost, and for a template run at one plan cost the two are the same. Training rows
    never look like that (with history and a plan cost, the calibration is always there), and
    without this the model would read those rows as a template's first execution."""
    if not {CALIBRATED, MEDIAN, HISTORY_COUNT, PLAN_COST} <= set(X.columns):
        return X
    cal = X[CALIBRATED].to_numpy(float)
    fill = (
        np.isnan(cal)
        & (X[HISTORY_COUNT].to_numpy(float) > 0)
        & np.isfinite(X[MEDIAN].to_numpy(float))
        & np.isfinite(X[PLAN_COST].to_numpy(float))
    )
    if not fill.any():
        return X
    return X.assign(**{CALIBRATED: np.where(fill, X[MEDIAN].to_numpy(float), cal)})


class FingerprintMedian(RegressorMixin, BaseEstimator):
    """Baseline: each template's median training latency (global median when unseen)."""

    def __init__(self, key: str = "fingerprint") -> None:
        self.key = key

    def fit(self, X: pd.DataFrame, y: Any) -> FingerprintMedian:
        logs = pd.Series(log_ms(y), index=X.index)
        self.medians_ = logs.groupby(X[self.key]).median().to_dict()
        self.global_ = float(np.median(logs)) if len(logs) else 0.0
        return self

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        logs = X[self.key].map(self.medians_).fillna(self.global_).to_numpy(float)
        return np.exp(logs)


class ExplainCostFit(RegressorMixin, BaseEstimator):
    """Baseline: log(latency) = a + b * log(EXPLAIN total cost), per template or global.

    Per template, templates with too few rows or a constant cost keep the global slope and get
    their own intercept; unseen templates and rows without a plan use the global fit (and the
    global median latency when no row had a plan at all).
    """

    def __init__(
        self, scope: str = "fingerprint", min_rows: int = 5, cost: str = "plan_total_cost"
    ) -> None:
        self.scope = scope
        self.min_rows = min_rows
        self.cost = cost

    def fit(self, X: pd.DataFrame, y: Any) -> ExplainCostFit:
        x = np.log1p(X[self.cost].to_numpy(float))
        t = log_ms(y)
        ok = np.isfinite(x)
        self.median_ = float(np.median(t)) if len(t) else 0.0
        self.global_ = _linfit(x[ok], t[ok]) if ok.sum() >= 2 else (self.median_, 0.0)
        self.per_key_: dict[str, tuple[float, float]] = {}
        if self.scope == "fingerprint":
            keys = X["fingerprint"].to_numpy()
            for key in np.unique(keys[ok]):
                m = ok & (keys == key)
                xs, ts = x[m], t[m]
                if len(xs) >= self.min_rows and np.ptp(xs) > 1e-6:
                    self.per_key_[str(key)] = _linfit(xs, ts)
                else:  # own level, global slope
                    slope = self.global_[1]
                    self.per_key_[str(key)] = (float(np.mean(ts - slope * xs)), slope)
        return self

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        x = np.log1p(X[self.cost].to_numpy(float))
        a = np.full(len(X), self.global_[0])
        b = np.full(len(X), self.global_[1])
        if self.per_key_:
            for i, key in enumerate(X["fingerprint"].to_numpy()):
                fit = self.per_key_.get(str(key))
                if fit is not None:
                    a[i], b[i] = fit
        out = a + b * x
        return np.exp(np.where(np.isfinite(out), out, self.median_))


def _linfit(x: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    if np.ptp(x) <= 1e-9:
        return float(np.mean(t)), 0.0
    slope, intercept = np.polyfit(x, t, 1)
    return float(intercept), float(slope)


def baselines() -> dict[str, RegressorMixin]:
    """The baselines every cost model is reported against, by name."""
    return {
        "fingerprint_median": FingerprintMedian(),
        "explain_cost_per_fingerprint": ExplainCostFit("fingerprint"),
        "explain_cost_global": ExplainCostFit("global"),
    }


# ---------------------------------------------------------------------------------- metrics


def qerror(y_true_ms: Any, y_pred_ms: Any) -> np.ndarray:
    """max(pred/true, true/pred) per row, with both floored at MIN_MS."""
    t = np.maximum(np.asarray(y_true_ms, float), MIN_MS)
    p = np.maximum(np.asarray(y_pred_ms, float), MIN_MS)
    return np.maximum(p / t, t / p)


def regression_metrics(y_true_ms: Any, y_pred_ms: Any) -> dict[str, float]:
    """R² on log latency, MAE as a share of mean latency, q-error quantiles."""
    t = np.asarray(y_true_ms, float)
    p = np.asarray(y_pred_ms, float)
    if len(t) == 0:
        return {"rows": 0}
    lt, lp = log_ms(t), log_ms(p)
    ss_tot = float(np.sum((lt - lt.mean()) ** 2))
    r2 = 1.0 - float(np.sum((lt - lp) ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    q = qerror(t, p)
    return {
        "rows": len(t),
        "r2_log": r2,
        "mae_ms": float(np.mean(np.abs(t - p))),
        "mae_share": float(np.mean(np.abs(t - p)) / max(float(np.mean(t)), 1e-12)),
        "qerror_p50": float(np.quantile(q, 0.5)),
        "qerror_p90": float(np.quantile(q, 0.9)),
        "qerror_p99": float(np.quantile(q, 0.99)),
        "qerror_mean": float(np.mean(q)),
    }


def latency_class(ms: Any, edges: Sequence[float] = CLASS_EDGES) -> np.ndarray:
    """0 fast, 1 medium, 2 slow."""
    return np.searchsorted(np.asarray(edges, float), np.asarray(ms, float), side="right")


def confusion(
    y_true_ms: Any, y_pred_ms: Any, edges: Sequence[float] = CLASS_EDGES
) -> dict[str, Any]:
    """fast/medium/slow confusion matrix: rows are the actual class, columns the predicted."""
    k = len(edges) + 1
    m = np.zeros((k, k), dtype=int)
    np.add.at(m, (latency_class(y_true_ms, edges), latency_class(y_pred_ms, edges)), 1)
    names = ["fast", "medium", "slow"] if k == 3 else [f"c{i}" for i in range(k)]
    return {"edges_ms": list(edges), "labels": names, "matrix": m.tolist()}


def worst_fingerprints(
    frame: pd.DataFrame, y_pred_ms: Any, top: int = 10, text_chars: int = 80
) -> list[dict[str, Any]]:
    """Templates with the highest median q-error on these rows."""
    q = qerror(frame["duration_ms"].to_numpy(float), y_pred_ms)
    data = pd.DataFrame(
        {"fingerprint": frame["fingerprint"].to_numpy(), "q": q, "ms": frame["duration_ms"]}
    )
    g = data.groupby("fingerprint").agg(
        rows=("q", "size"), qerror_p50=("q", "median"), median_ms=("ms", "median")
    )
    g = g.sort_values("qerror_p50", ascending=False).head(top)
    texts = frame.drop_duplicates("fingerprint").set_index("fingerprint")["normalized_text"]
    return [
        {
            "fingerprint": fp,
            "rows": int(r.rows),
            "qerror_p50": round(float(r.qerror_p50), 3),
            "median_ms": round(float(r.median_ms), 3),
            "text": str(texts.get(fp, ""))[:text_chars],
        }
        for fp, r in g.iterrows()
    ]


def report(frame: pd.DataFrame, y_pred_ms: Any) -> dict[str, Any]:
    """Metrics, confusion matrix and worst templates of predictions for these rows."""
    y = frame["duration_ms"].to_numpy(float)
    return {
        **regression_metrics(y, y_pred_ms),
        "confusion": confusion(y, y_pred_ms),
        "worst_fingerprints": worst_fingerprints(frame, y_pred_ms),
    }


def to_json(value: Any) -> str:
    """JSON with NaN/inf written as null (cards must be valid JSON)."""
    return json.dumps(_clean(value), indent=2, sort_keys=False)


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float | np.floating):
        v = float(value)
        return v if np.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
