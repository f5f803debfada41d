"""The advisor's learned ranker: predicts the real (validated) gain of an index candidate.

What-if costs mislead (an index the planner loves can be slower for real, a covering index can
be better than its estimate), so once enough candidates have been built and measured, a
gradient-boosting model trained on those outcomes (`metadata.optimization_history`, kind
``index``, validated or reverted, with the features `models.advisor.features` stored at
recommendation time) orders the candidates instead of the raw what-if gain.

Target: the measured share of time saved on the candidate's own fingerprints,
``1 - after_ms / before_ms`` (clipped to [-1, 1]). Score of a candidate: its what-if gain scaled
by predicted share / estimated share. With fewer than `min_history` outcomes the trainer
registers a non-serving candidate saying so, and the advisor keeps the what-if order.

Registered as ``TRAINERS["advisor_rank"]``; saved with joblib beside a JSON card.
"""

from __future__ import annotations

import json
import math
import shutil
import traceback
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .registry import Registry, card_markdown

if TYPE_CHECKING:
    from .train import TrainConfig, TrainResult

NAME = "advisor_rank"
MIN_HISTORY = 20
FEATURES: tuple[str, ...] = (
    "log_gain_ms",
    "gain_share",
    "weight_share",
    "best_cost_ratio",
    "mean_cost_ratio",
    "log_size",
    "log_rows",
    "n_columns",
    "n_include",
    "partial",
    "n_fingerprints",
    "n_regressions",
    "write_share",
    "reason_where",
    "reason_single",
    "reason_order_by",
    "reason_group_by",
    "reason_join",
    "reason_include",
    "reason_partial",
)


def _matrix(rows: Sequence[Mapping[str, float]]) -> np.ndarray:
    return np.array(
        [
            [float(r.get(f, math.nan) if r.get(f) is not None else math.nan) for f in FEATURES]
            for r in rows
        ],
        dtype=float,
    ).reshape(len(rows), len(FEATURES))


class AdvisorRanker:
    """Gradient boosting on candidate features -> measured share of time saved."""

    name = "learned ranker"

    def __init__(
        self,
        n_estimators: int = 100,
        max_depth: int = 2,
        learning_rate: float = 0.1,
        random_state: int = 0,
    ) -> None:
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.random_state = random_state

    def fit(self, X: Sequence[Mapping[str, float]], y: Sequence[float]) -> AdvisorRanker:
        from sklearn.ensemble import HistGradientBoostingRegressor

        self.model_ = HistGradientBoostingRegressor(
            max_iter=self.n_estimators,
            max_depth=self.max_depth,
            learning_rate=self.learning_rate,
            min_samples_leaf=3,
            random_state=self.random_state,
        ).fit(_matrix(X), np.clip(np.asarray(y, dtype=float), -1.0, 1.0))
        self.feature_names_ = list(FEATURES)
        self.n_samples_ = len(y)
        return self

    def predict(self, X: Sequence[Mapping[str, float]]) -> np.ndarray:
        """Predicted share of time saved, in [-1, 1]."""
        out: np.ndarray = np.clip(self.model_.predict(_matrix(X)), -1.0, 1.0)
        return out

    def predict_gain(self, X: Sequence[Mapping[str, float]], gains: Sequence[float]) -> list[float]:
        """Scores in the what-if gain's unit: gain x predicted share / estimated share."""
        if not X:
            return []
        out = []
        for row, share, gain in zip(X, self.predict(X), gains, strict=True):
            est = max(1.0 - float(row.get("mean_cost_ratio", 1.0)), 0.05)
            out.append(gain * float(share) / est)
        return out

    def save(self, path: Path) -> None:
        import joblib

        joblib.dump(self, path)

    @staticmethod
    def load(path: Path) -> AdvisorRanker:
        import joblib

        model = joblib.load(path)
        if not isinstance(model, AdvisorRanker):
            raise TypeError(f"{path} does not hold an AdvisorRanker")
        return model


# ------------------------------------------------------------------------------ data


async def load_outcomes(conn: Any) -> tuple[list[dict[str, float]], list[float], list[float]]:
    """Features, measured share saved and what-if estimated share of every validated outcome."""
    rows = await conn.fetch(
        """
        SELECT detail->'features' AS features, measured_before_ms, measured_after_ms
        FROM metadata.optimization_history
        WHERE kind = 'index' AND action = 'recommend' AND status IN ('validated', 'reverted')
          AND measured_before_ms > 0 AND measured_after_ms IS NOT NULL
          AND detail ? 'features'
        ORDER BY created_at, id
        """
    )
    X, y, est = [], [], []
    for r in rows:
        feats = r["features"]
        feats = json.loads(feats) if isinstance(feats, str) else dict(feats)
        X.append(feats)
        y.append(1.0 - r["measured_after_ms"] / r["measured_before_ms"])
        est.append(1.0 - float(feats.get("mean_cost_ratio", 1.0)))
    return X, y, est


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return math.nan
    return float(spearmanr(a, b).statistic)


# ------------------------------------------------------------------------------ training


async def train_advisor_rank(
    meta_conn: Any,
    warehouse_conn: Any | None,
    registry: Registry,
    config: TrainConfig,
    progress: Any = None,
) -> TrainResult:
    """Fit on past outcomes; activate only if it orders the held-out outcomes better than
    the what-if estimate does (Spearman correlation with the measured share saved)."""
    from .train import TrainResult, library_versions

    version = await registry.next_version(NAME)
    card: dict[str, Any] = {
        "name": NAME,
        "version": version,
        "description": "Measured share of time an index saves, gradient boosting over what-if"
        " and candidate features; orders the advisor's candidates.",
        "created_at": datetime.now(UTC).isoformat(),
        "libraries": library_versions(),
        "features": list(FEATURES),
    }
    art = registry.artifact_dir(NAME, version)
    try:
        X, y, est = await load_outcomes(meta_conn)
        card["data_window"] = {"rows": len(y)}
        if len(y) < MIN_HISTORY:
            reason = (
                f"{len(y)} validated outcomes, fewer than {MIN_HISTORY}:"
                " the advisor keeps the what-if order"
            )
            card.update(status="candidate", reason=reason)
            entry = await registry.register(NAME, version, card, activate=False, reason=reason)
            return TrainResult(NAME, version, "candidate", reason, card, entry)
        split = max(int(len(y) * 0.75), len(y) - 20)
        model = AdvisorRanker(random_state=config.seed).fit(X[:split], y[:split])
        held = model.predict(X[split:]).tolist()
        metrics = {
            "spearman_model": _spearman(held, y[split:]),
            "spearman_whatif": _spearman(est[split:], y[split:]),
            "mae_model": float(np.mean(np.abs(np.asarray(held) - np.asarray(y[split:])))),
            "mae_whatif": float(np.mean(np.abs(np.asarray(est[split:]) - np.asarray(y[split:])))),
            "train_rows": split,
            "test_rows": len(y) - split,
        }
        if progress is not None:
            progress("fit", 1.0)
        model = AdvisorRanker(random_state=config.seed).fit(X, y)
        sm, sw = metrics["spearman_model"], metrics["spearman_whatif"]
        ok = math.isfinite(sm) and (not math.isfinite(sw) or sm > sw)
        reason = (
            f"held-out Spearman {sm:.3f} vs what-if {sw:.3f}"
            if math.isfinite(sm)
            else "held-out outcomes do not vary"
        )
        card.update(metrics=metrics, status="active" if ok else "candidate", reason=reason)
        art.mkdir(parents=True, exist_ok=True)
        model.save(art / "model.joblib")
        (art / "card.json").write_text(json.dumps(card, default=str, indent=2))
        (art / "card.md").write_text(card_markdown(card))
        entry = await registry.register(NAME, version, card, activate=ok, reason=reason)
        return TrainResult(NAME, version, entry.status, reason, card, entry)
    except Exception as exc:
        shutil.rmtree(art, ignore_errors=True)
        reason = f"{type(exc).__name__}: {exc}"
        card.update(status="failed", reason=reason, traceback=traceback.format_exc(limit=5))
        entry = await registry.register(
            NAME, version, card, activate=False, reason=reason, status="failed"
        )
        return TrainResult(NAME, version, "failed", reason, card, entry)


async def load_active_ranker(conn: Any, root: Path | None = None) -> AdvisorRanker | None:
    """The active ranker, or None (too little history, or none trained): what-if order."""
    entry = await Registry(conn, root).active(NAME)
    if entry is None or not entry.artifact_path:
        return None
    try:
        return AdvisorRanker.load(Path(entry.artifact_path) / "model.joblib")
    except Exception:
        return None
