"""The training pipeline: extract -> features -> fit (bounded random search) -> evaluate -> gate
-> register.

`train_model(name, ...)` runs one model's pipeline and always leaves a registry row: a new active
version, an inactive candidate with the reason it lost the gate, or a ``failed`` row with the
error, in which case the previously active version keeps serving. It is a plain coroutine on
asyncpg connections so that `pgsage train`, the scheduler inside `pgsage serve` (in a separate
process) and the accuracy bench all share it.
"""

from __future__ import annotations

import contextlib
import platform
import random
import shutil
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .advisor_rank import train_advisor_rank
from .anomaly import train_anomaly
from .clusters import train_clusters
from .cost import (
    CostModel,
    baselines,
    log_ms,
    regression_metrics,
    report,
    to_json,
)
from .dataset import FEATURES, Dataset, Progress, build_dataset, template_split, time_split
from .forecast import train_forecast
from .registry import Entry, Registry, card_markdown

COST = "cost"
#: bounded random search: each key is sampled independently
#: (`objective`: L2 on log latency, or the robust huber / l1; chosen like the rest, by the
#: validation rows' mean absolute error of log latency)
SEARCH_SPACE: dict[str, tuple[Any, ...]] = {
    "objective": ("regression", "huber", "l1"),
    "learning_rate": (0.03, 0.05, 0.1),
    "num_leaves": (4, 7, 15, 31, 63),
    "min_child_samples": (2, 3, 5, 10, 20),
    "subsample": (0.7, 0.9, 1.0),
    "colsample_bytree": (0.5, 0.7, 0.9),
    "reg_lambda": (0.0, 1.0, 5.0),
}


@dataclass
class TrainConfig:
    since: datetime | None = None
    until: datetime | None = None
    max_rows: int = 200_000
    database: str | None = None
    #: parameter sets tried (the defaults first)
    n_iter: int = 8
    seed: int = 0
    #: fewer usable rows than this is a failed run, not a model
    min_rows: int = 200
    holdout_share: float = 0.2
    statement_timeout_ms: int = 2_000
    n_jobs: int = 1
    #: the gate: the candidate's test q-error p90 must be below the active's times this
    min_improvement: float = 1.0


@dataclass
class TrainResult:
    name: str
    version: int
    status: str  # active | candidate | failed
    reason: str
    card: dict[str, Any] = field(default_factory=dict)
    entry: Entry | None = None

    @property
    def activated(self) -> bool:
        return self.status == "active"


def _no_progress(stage: str, fraction: float) -> None:
    return None


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in ("lightgbm", "scikit-learn", "numpy", "pandas", "sqlglot", "pgsage"):
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "unknown"
    return out


# ------------------------------------------------------------------------------ fit, evaluate


def new_card(
    name: str,
    version: int,
    description: str,
    config: Any,
    libraries: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The card every training run starts from (the run fills in data, metrics and gate)."""
    return {
        "name": name,
        "version": version,
        "description": description,
        "created_at": datetime.now(UTC).isoformat(),
        "libraries": {**library_versions(), **(libraries or {})},
        "config": {k: str(v) for k, v in vars(config).items()},
    }


async def run_registered(
    name: str,
    registry: Registry,
    card: dict[str, Any],
    work: Callable[[Path], Awaitable[tuple[bool, str]]],
    cleanup: Callable[[], Awaitable[None]] | None = None,
    render: Callable[[dict[str, Any]], str] = card_markdown,
) -> TrainResult:
    """Run `work(artifact_dir)` (it fills `card`, writes the model, returns (activate, reason))
    and register the version with its JSON and Markdown cards. Any exception registers a failed
    run (with the reason and a short traceback), removes its artifacts and keeps the previously
    active version serving."""
    version = int(card["version"])
    art = registry.artifact_dir(name, version)
    try:
        activate, reason = await work(art)
        card["status"], card["reason"] = ("active" if activate else "candidate"), reason
        card.setdefault("gate", {}).update(activated=activate, reason=reason)
        art.mkdir(parents=True, exist_ok=True)
        (art / "card.json").write_text(to_json(card))
        (art / "card.md").write_text(render(card))
        entry = await registry.register(name, version, card, activate=activate, reason=reason)
        return TrainResult(name, version, entry.status, reason, card, entry)
    except Exception as exc:
        shutil.rmtree(art, ignore_errors=True)
        if cleanup is not None:
            with contextlib.suppress(Exception):
                await cleanup()
        reason = f"{type(exc).__name__}: {exc}"
        card.update(status="failed", reason=reason, traceback=traceback.format_exc(limit=5))
        entry = await registry.register(
            name, version, card, activate=False, reason=reason, status="failed"
        )
        return TrainResult(name, version, "failed", reason, card, entry)


def _candidates(n_iter: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out: list[dict[str, Any]] = [{}]
    while len(out) < n_iter:
        params = {k: rng.choice(v) for k, v in SEARCH_SPACE.items()}
        if params not in out:
            out.append(params)
    return out


def search(
    X: pd.DataFrame,
    y: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    config: TrainConfig,
    progress: Progress = _no_progress,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Best parameters (with n_estimators = the early-stopped iteration) by validation log-MAE."""
    trials = []
    for i, params in enumerate(_candidates(config.n_iter, config.seed)):
        model = CostModel(random_state=config.seed, n_jobs=config.n_jobs, **params)
        model.fit(X.iloc[train], y[train], eval_set=(X.iloc[val], y[val]))
        score = float(np.mean(np.abs(model.predict_log(X.iloc[val]) - log_ms(y[val]))))
        trials.append({**params, "n_estimators": model.best_iteration_, "val_log_mae": score})
        progress("fit", (i + 1) / config.n_iter)
    best = min(trials, key=lambda t: t["val_log_mae"])
    params = {k: v for k, v in best.items() if k != "val_log_mae"}
    params["n_estimators"] = max(int(params["n_estimators"]), 10)
    return params, trials


def evaluate(
    model: CostModel, frame: pd.DataFrame, fit_rows: np.ndarray, eval_rows: np.ndarray
) -> dict[str, Any]:
    """The model's report on `eval_rows`, with each baseline fitted on `fit_rows` beside it."""
    evaluated = frame.iloc[eval_rows]
    out = report(evaluated, model.predict(evaluated[model.feature_names_]))
    fitted = frame.iloc[fit_rows]
    y_fit = fitted["duration_ms"].to_numpy(float)
    out["baselines"] = {
        name: regression_metrics(evaluated["duration_ms"], b.fit(fitted, y_fit).predict(evaluated))
        for name, b in baselines().items()
    }
    return out


def fit_cost_model(
    data: Dataset, config: TrainConfig, progress: Progress = _no_progress
) -> tuple[CostModel, dict[str, Any]]:
    """Search, refit on train+validation, and evaluate on the time split and held-out templates."""
    frame, X, y = data.frame, data.X, data.y
    train, val, test = time_split(len(frame))
    params, trials = search(X, y, train, val, config, progress)
    fit_rows = np.concatenate([train, val])
    model = CostModel(random_state=config.seed, n_jobs=config.n_jobs, **params)
    model.fit(X.iloc[fit_rows], y[fit_rows])
    progress("evaluate", 0.3)
    metrics = evaluate(model, frame, fit_rows, test)
    progress("evaluate", 0.6)
    held = template_split(frame["fingerprint"].iloc[fit_rows], config.holdout_share, config.seed)
    is_held = frame["fingerprint"].isin(held).to_numpy()
    position = np.arange(len(frame))
    seen_rows = fit_rows[~is_held[fit_rows]]
    held_rows = position[is_held & (position >= len(train))]
    held_out: dict[str, Any] = {"fingerprints": sorted(held), "rows": len(held_rows)}
    if len(held_rows) and len(seen_rows):
        unseen = CostModel(random_state=config.seed, n_jobs=config.n_jobs, **params)
        unseen.fit(X.iloc[seen_rows], y[seen_rows])
        held_out.update(evaluate(unseen, frame, seen_rows, held_rows))
    progress("evaluate", 1.0)
    info = {
        "params": params,
        "search": trials,
        "metrics": metrics,
        "held_out_templates": held_out,
        "feature_importance": model.feature_importance(),
        "split": {
            "time": {"train": len(train), "validation": len(val), "test": len(test)},
            "test_query_ids": [int(q) for q in frame["query_id"].iloc[test]],
        },
    }
    return model, info


# ------------------------------------------------------------------------------------ gate


def gate(
    candidate: dict[str, Any],
    active: CostModel | None,
    active_entry: Entry | None,
    test_frame: pd.DataFrame,
    config: TrainConfig,
) -> tuple[bool, str, dict[str, Any]]:
    """Whether the candidate replaces the active version, compared on the same test rows."""
    cand = candidate["qerror_p90"]
    if not np.isfinite(cand):
        return False, "candidate metrics are not finite", {}
    if active_entry is None:
        return True, "first version", {}
    if active is None:
        return True, f"active v{active_entry.version} cannot be loaded", {}
    missing = [f for f in active.feature_names_ if f not in test_frame.columns]
    if missing:
        return True, f"active v{active_entry.version} needs missing features {missing[:3]}", {}
    theirs = regression_metrics(
        test_frame["duration_ms"], active.predict(test_frame[active.feature_names_])
    )
    detail = {"version": active_entry.version, "metrics_on_same_rows": theirs}
    if cand < theirs["qerror_p90"] * config.min_improvement:
        return (
            True,
            f"beats active v{active_entry.version} on {len(test_frame)} held-out rows:"
            f" q-error p90 {cand:.3f} < {theirs['qerror_p90']:.3f}",
            detail,
        )
    return (
        False,
        f"does not beat active v{active_entry.version} on the same {len(test_frame)} rows:"
        f" q-error p90 {cand:.3f} >= {theirs['qerror_p90']:.3f}",
        detail,
    )


# ------------------------------------------------------------------------------- pipeline


async def train_cost(
    meta_conn: Any,
    warehouse_conn: Any | None,
    registry: Registry,
    config: TrainConfig,
    progress: Progress = _no_progress,
) -> TrainResult:
    """Extract, fit, evaluate, gate and register a version of the cost model."""
    version = await registry.next_version(COST)
    card = new_card(
        COST,
        version,
        "Latency of a statement (ms), LightGBM regression on log latency"
        " over SQL, EXPLAIN, catalog, time, load and history features.",
        config,
    )

    async def work(art: Path) -> tuple[bool, str]:
        data = await build_dataset(
            meta_conn,
            warehouse_conn,
            since=config.since,
            until=config.until,
            max_rows=config.max_rows,
            database=config.database,
            statement_timeout_ms=config.statement_timeout_ms,
            progress=progress,
        )
        card["data_window"] = data.window()
        if len(data) < config.min_rows:
            raise ValueError(f"{len(data)} usable logged rows, fewer than {config.min_rows}")
        model, info = fit_cost_model(data, config, progress)
        card.update(info)
        card["features"] = list(model.feature_names_)
        _, _, test = time_split(len(data))
        test_frame = data.frame.iloc[test]
        active_entry = await registry.active(COST)
        active = load_cost_model(active_entry)
        ok, reason, detail = gate(card["metrics"], active, active_entry, test_frame, config)
        card["gate"] = {"active": detail}
        art.mkdir(parents=True, exist_ok=True)
        model.save(art / "model.txt")
        progress("register", 1.0)
        return ok, reason

    return await run_registered(COST, registry, card, work)


def load_cost_model(entry: Entry | None) -> CostModel | None:
    """The cost model of a registry row (None if it has no readable artifact)."""
    if entry is None or not entry.artifact_path:
        return None
    try:
        return CostModel.load(_model_file(entry), entry.params)
    except Exception:
        return None


def _model_file(entry: Entry) -> Any:
    from pathlib import Path

    return Path(entry.artifact_path or "") / "model.txt"


async def load_active_cost_model(registry: Registry) -> tuple[CostModel, Entry] | None:
    """The serving side: the active cost model and its registry row (None if there is none)."""
    entry = await registry.active(COST)
    model = load_cost_model(entry)
    return None if model is None or entry is None else (model, entry)


Trainer = Callable[[Any, Any, Registry, TrainConfig, Progress], Awaitable[TrainResult]]
#: every model `pgsage train all` trains, by name (other issues add theirs)
TRAINERS: dict[str, Trainer] = {
    COST: train_cost,
    "clusters": train_clusters,
    "forecast": train_forecast,
    "advisor_rank": train_advisor_rank,
    "anomaly": train_anomaly,
}

__all__ = [
    "FEATURES",
    "TRAINERS",
    "TrainConfig",
    "TrainResult",
    "fit_cost_model",
    "gate",
    "load_active_cost_model",
    "load_cost_model",
    "train_cost",
]
