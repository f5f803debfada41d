"""The cost model, its baselines, metrics, gate and card, on synthetic rows (no database)."""

from __future__ import annotations

import json

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from models.cost import (
    COLD_MARKER,
    CostModel,
    ExplainCostFit,
    FingerprintMedian,
    confusion,
    qerror,
    regression_metrics,
    report,
    to_json,
)
from models.registry import card_markdown, model_dir
from models.train import TrainConfig, gate


def synthetic(n: int = 1500, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Latency ~ cost^0.8 per template with template-specific speed, plus 10% noise."""
    rng = np.random.default_rng(seed)
    fp = rng.integers(0, 20, n)
    cost = np.exp(rng.uniform(0, 10, n))
    speed = np.exp(np.linspace(-2, 2, 20))[fp]
    y = 0.01 * speed * cost**0.8 * np.exp(rng.normal(0, 0.1, n))
    frame = pd.DataFrame(
        {
            "fingerprint": [f"fp{i}" for i in fp],
            "plan_total_cost": cost,
            "template": fp.astype(float),
            "noise": rng.normal(size=n),
            "duration_ms": y,
        }
    )
    return frame, y


def test_cost_model_follows_scikit_learn_conventions():
    model = CostModel(num_leaves=7, n_estimators=50)
    assert model.get_params()["num_leaves"] == 7
    assert not [k for k in vars(model) if k.endswith("_")]  # __init__ stores params only
    copy = clone(model)
    assert copy.get_params() == model.get_params()
    frame, y = synthetic(300)
    X = frame[["plan_total_cost", "template", "noise"]]
    assert model.fit(X, y) is model
    assert model.n_features_in_ == 3 and model.feature_names_ == list(X.columns)


def test_cost_model_learns_log_latency_and_round_trips_through_text(tmp_path):
    frame, y = synthetic()
    X = frame[["plan_total_cost", "template", "noise"]]
    model = CostModel(n_estimators=300).fit(
        X[:1000], y[:1000], eval_set=(X[1000:1200], y[1000:1200])
    )
    pred = model.predict(X[1200:])
    m = regression_metrics(y[1200:], pred)
    assert m["r2_log"] > 0.95 and m["qerror_p50"] < 1.3
    imp = model.feature_importance()
    assert list(imp)[-1] == "noise" and sum(imp.values()) == pytest.approx(1.0, abs=1e-3)
    path = tmp_path / "model.txt"
    model.save(path)
    assert path.read_text().startswith("tree")
    loaded = CostModel.load(path)
    assert np.allclose(loaded.predict(X[1200:]), pred)


def with_history(frame: pd.DataFrame, y: np.ndarray) -> pd.DataFrame:
    """The synthetic rows with a template history: the median of the template's earlier rows."""
    logs = pd.Series(np.log(y), index=frame.index)
    grouped = logs.groupby(frame["fingerprint"])
    median = grouped.transform(lambda s: s.expanding().median().shift(1))
    out = frame.assign(
        hist_count=grouped.cumcount().astype(float),
        hist_median_ms=np.exp(median),
        hist_calibrated_ms=np.exp(median),
    )
    return out[["plan_total_cost", "noise", "hist_count", "hist_median_ms", "hist_calibrated_ms"]]


def test_templates_without_history_get_the_cold_start_booster(tmp_path):
    frame, y = synthetic()
    X = with_history(frame, y)
    model = CostModel(n_estimators=200).fit(X[:1200], y[:1200])
    assert model.cold_booster_ is not None
    assert "hist_median_ms" not in model.cold_booster_.feature_name()
    test = X[1200:]
    cold = test.assign(hist_count=0.0, hist_median_ms=np.nan, hist_calibrated_ms=np.nan)
    expected = model.cold_booster_.predict(cold[model.cold_booster_.feature_name()])
    assert np.allclose(model.predict_log(cold), expected)
    assert not np.allclose(model.predict_log(test), expected)
    path = tmp_path / "model.txt"
    model.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.txt"]  # one artifact file
    loaded = CostModel.load(path)
    assert np.allclose(loaded.predict(cold), model.predict(cold))
    assert np.allclose(loaded.predict(test), model.predict(test))
    # LightGBM alone reads the file as the main booster
    assert np.allclose(lgb.Booster(model_file=str(path)).predict(test), model.predict_log(test))
    main = path.read_text().partition(COLD_MARKER)[0]
    path.write_text(main)  # a version saved before cold start: main booster only
    assert CostModel.load(path).cold_booster_ is None
    assert np.allclose(CostModel.load(path).predict(test), model.predict(test))
    plain = CostModel(n_estimators=50, cold_start=False).fit(X[:1200], y[:1200])
    assert plain.cold_booster_ is None


def test_serving_without_a_calibration_reads_the_template_median():
    """The live aggregates serving reads keep no latency per unit of plan cost."""
    frame, y = synthetic()
    X = with_history(frame, y)
    model = CostModel(n_estimators=100).fit(X[:1200], y[:1200])
    test = X[1200:]
    served = test.assign(hist_calibrated_ms=np.nan)
    expected = test.assign(hist_calibrated_ms=test["hist_median_ms"])
    assert np.allclose(model.predict(served), model.predict(expected))
    no_plan = served.assign(plan_total_cost=np.nan)  # as in training: no plan, no calibration
    assert (
        np.isnan(no_plan["hist_calibrated_ms"]).all() and np.isfinite(model.predict(no_plan)).all()
    )


def test_serving_supplies_every_feature_the_model_trains_on():
    """Training and serving compute the same features: the row serving builds for a prediction
    has every model feature and nothing else, and per-execution load is not among them (a
    prediction cached per fingerprint and literal class cannot know it)."""
    from datetime import datetime

    from models.dataset import FEATURES, HISTORY_FEATURES, LOAD_COLUMNS, STATIC_FEATURES
    from models.serve import History, serving_features

    assert not set(LOAD_COLUMNS) & set(FEATURES)
    static = dict.fromkeys(STATIC_FEATURES, 1.0)
    seen = History(12, 3.0, 9.0, 4.0, rate_1h=6.0, last_ms=2.5)
    row = serving_features(static, seen, datetime(2024, 1, 2, 10, 30))
    assert list(row) == list(FEATURES)
    assert all(np.isfinite(row[k]) for k in HISTORY_FEATURES if k != "hist_calibrated_ms")
    assert row["hist_last_ms"] == 2.5 and row["hour"] == 10.0
    # the mean stands in for the latest latency when the caller does not know it
    unknown_last = serving_features(static, History(3, 1.0, 2.0, 1.5), datetime(2024, 1, 2))
    assert unknown_last["hist_last_ms"] == 1.5
    never = serving_features(static, None, datetime(2024, 1, 2))
    assert never["hist_count"] == 0.0 and np.isnan(never["hist_median_ms"])


def test_accuracy_bench_checks_targets_and_every_baseline_on_each_split():
    from bench.accuracy import checks

    def split(p90: float, base: float) -> dict[str, dict[str, float]]:
        return {"cost_model": {"qerror_p90": p90}, "explain_cost_global": {"qerror_p90": base}}

    result = {
        "time_split": {
            "cost_model": {"r2_log": 0.91, "qerror_p50": 1.31, "qerror_p90": 2.0},
            "fingerprint_median": {"qerror_p90": 1.9},
        },
        "held_out_templates": {**split(3.0, 4.0), "fingerprints": 5},
        "held_out_templates_cold": split(5.0, 4.0),
    }
    assert checks(result) == {
        "time_split r2_log >= 0.9": True,
        "time_split qerror_p50 <= 1.3": False,
        "time_split qerror_p90 <= 2.5": True,
        "time_split qerror_p90 < fingerprint_median": False,
        "held_out_templates qerror_p90 < explain_cost_global": True,
        "held_out_templates_cold qerror_p90 < explain_cost_global": False,
    }


def test_baselines():
    frame, y = synthetic()
    train, test = frame[:1200], frame[1200:]
    med = FingerprintMedian().fit(train, y[:1200])
    unseen = test.assign(fingerprint="never-seen")
    assert np.allclose(med.predict(unseen), np.exp(np.median(np.log(y[:1200]))))
    per_fp = ExplainCostFit("fingerprint").fit(train, y[:1200])
    glob = ExplainCostFit("global").fit(train, y[:1200])
    # the per-template calibration recovers the generating law; the global one cannot
    q_fp = qerror(y[1200:], per_fp.predict(test))
    q_gl = qerror(y[1200:], glob.predict(test))
    assert np.median(q_fp) < 1.2 < np.median(q_gl)
    assert per_fp.per_key_["fp3"][1] == pytest.approx(0.8, abs=0.1)  # log1p bends small costs
    no_plan = test.assign(plan_total_cost=np.nan)
    assert np.isfinite(per_fp.predict(no_plan)).all()


def test_metrics():
    assert list(qerror([1, 10, 0.0], [2, 5, 0.0])) == [2.0, 2.0, 1.0]
    y = np.array([1.0, 10.0, 100.0, 1000.0])
    perfect = regression_metrics(y, y)
    assert perfect["r2_log"] == 1.0 and perfect["qerror_p99"] == 1.0 and perfect["mae_share"] == 0
    m = regression_metrics(y, y * 2)
    assert m["qerror_p50"] == 2.0
    assert m["mae_share"] == pytest.approx(np.mean(y) / np.mean(y))
    c = confusion([0.5, 50, 500, 500], [0.5, 500, 500, 5])
    assert c["labels"] == ["fast", "medium", "slow"]
    assert c["matrix"] == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
    frame = pd.DataFrame(
        {"fingerprint": ["a", "a", "b"], "duration_ms": [1.0, 1.0, 10.0], "normalized_text": "x"}
    )
    worst = report(frame, [1.0, 1.0, 100.0])["worst_fingerprints"]
    assert worst[0]["fingerprint"] == "b" and worst[0]["qerror_p50"] == 10.0
    assert json.loads(to_json({"a": float("nan"), "b": np.float32(1.5)})) == {"a": None, "b": 1.5}


def test_gate_compares_on_the_same_rows():
    frame, y = synthetic()
    X = frame[["plan_total_cost", "template"]]
    good = CostModel(n_estimators=200).fit(X[:1200], y[:1200])
    weak = CostModel(n_estimators=3, num_leaves=2).fit(X[:1200], y[:1200])
    test = frame[1200:]

    class Row:
        version = 4

    cand_good = regression_metrics(y[1200:], good.predict(test))
    cand_weak = regression_metrics(y[1200:], weak.predict(test))
    ok, reason, detail = gate(cand_good, weak, Row(), test, TrainConfig())
    assert ok and "beats active v4" in reason
    assert detail["metrics_on_same_rows"]["rows"] == len(test)
    ok, reason, _ = gate(cand_weak, good, Row(), test, TrainConfig())
    assert not ok and "does not beat active v4" in reason
    assert gate(cand_weak, None, None, test, TrainConfig())[:2] == (True, "first version")
    nan = {**cand_good, "qerror_p90": float("nan")}
    assert not gate(nan, None, None, test, TrainConfig())[0]


def test_model_dir_is_configurable_and_outside_the_code(monkeypatch, tmp_path):
    monkeypatch.setenv("PGSAGE_MODEL_DIR", str(tmp_path / "m"))
    assert model_dir() == tmp_path / "m"
    assert model_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("PGSAGE_MODEL_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert model_dir() == tmp_path / "data" / "pgsage" / "models"


def test_card_markdown_lists_model_and_baselines():
    metrics = {"r2_log": 0.9, "mae_share": 0.1, "qerror_p50": 1.2, "qerror_p90": 2.0}
    card = {
        "name": "cost",
        "version": 3,
        "metrics": {**metrics, "baselines": {"fingerprint_median": {**metrics, "qerror_p90": 3}}},
        "data_window": {"rows": 10},
        "params": {"num_leaves": 7},
    }
    md = card_markdown(card)
    assert md.startswith("# cost v3")
    assert "| cost | 0.900 | 0.100 | 1.200 | 2.000 | — |" in md
    assert "| fingerprint_median |" in md and '"num_leaves": 7' in md
