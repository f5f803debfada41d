"""The anomaly detectors on synthetic logs with planted anomalies; severity and incidents."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.anomaly import (
    FEATURES,
    AnomalyModel,
    Detector,
    DetectorConfig,
    Execution,
    Flag,
    IncidentTracker,
    Interval,
    ZScoreDetector,
    fit_and_evaluate,
    group_incidents,
    score_report,
    severity,
)

DAY = 86400.0
T0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC


def synthetic_log(
    seed: int = 0, days: float = 4.0, per_hour: float = 60.0
) -> tuple[list[Execution], dict[str, str]]:
    """Twenty templates with lognormal latency and isolated hiccups (x3-x10, unlabelled: a
    busy machine), with the same set of anomalies planted in each half: a plan regression (x12
    for a run of executions), a rate burst (40 extra in 15 minutes), an error burst and an
    unseen heavy query."""
    rng = np.random.default_rng(seed)
    fps = [f"fp{i:02d}" for i in range(20)]
    base_ms = dict(zip(fps, np.exp(rng.uniform(-1.0, 3.0, len(fps))), strict=True))
    weights = rng.dirichlet(np.ones(len(fps)) * 2)
    rows = dict(zip(fps, rng.integers(1, 200, len(fps)), strict=True))
    n = int(days * 24 * per_hour)
    ts = np.sort(rng.uniform(T0, T0 + days * DAY, n))
    out: list[tuple[float, str, float, bool, str | None]] = []
    for t in ts:
        fp = str(rng.choice(fps, p=weights))
        ms = base_ms[fp] * float(np.exp(rng.normal(0, 0.25)))
        if rng.random() < 0.02:
            ms *= float(rng.uniform(3, 10))  # hiccup: not an anomaly of the query
        out.append((float(t), fp, ms, False, None))
    by_weight = [fps[i] for i in np.argsort(-weights)]
    for half in (0, 1):
        at = T0 + days * DAY * (0.5 * half + 0.1)
        slow_fp, burst_fp = by_weight[half], by_weight[5 + half]
        # plan regression: x12 for four hours
        s0, s1 = at, at + 4 * 3600
        out = [(t, fp, ms * 12, e, f"slow:{half}") if fp == slow_fp and s0 <= t < s1
               else (t, fp, ms, e, lab) for t, fp, ms, e, lab in out]  # fmt: skip
        # rate burst: 40 extra arrivals in 15 minutes
        b0 = at + 0.15 * DAY
        out = [(t, fp, ms, e, f"burst:{half}") if fp == burst_fp and b0 <= t < b0 + 900
               else (t, fp, ms, e, lab) for t, fp, ms, e, lab in out]  # fmt: skip
        out += [(b0 + float(x), burst_fp, base_ms[burst_fp], False, f"burst:{half}")
                for x in np.sort(rng.uniform(0, 900, 40))]  # fmt: skip
        # error burst: 25 failures in 10 minutes
        e0 = at + 0.25 * DAY
        out += [(e0 + float(x), "fp_bad", 0.3, True, f"errors:{half}")
                for x in np.sort(rng.uniform(0, 600, 25))]  # fmt: skip
        # a never-seen heavy query, twice
        h0, heavy = at + 0.3 * DAY, f"fp_heavy{half}"
        out += [(h0, heavy, 900.0, False, f"heavy:{half}"),
                (h0 + 120, heavy, 1100.0, False, f"heavy:{half}")]  # fmt: skip
    out.sort(key=lambda r: r[0])
    executions = [
        Execution(t, fp, "SELECT", ms, int(rows.get(fp, 1)), e, 100, None, False, lab, "app")
        for t, fp, ms, e, lab in out
    ]
    kinds = {}
    for half in (0, 1):
        for prefix, kind in (("slow", "seq_scan"), ("burst", "rate_burst"),
                             ("errors", "error_burst"), ("heavy", "heavy_unseen")):  # fmt: skip
            kinds[f"{prefix}:{half}"] = kind
    return executions, kinds


@pytest.fixture(scope="module")
def evaluated() -> dict[str, Any]:
    executions, kinds = synthetic_log()
    return fit_and_evaluate(executions, kinds, train_share=0.5).info


def test_isolation_forest_detector_beats_the_zscore_baseline(evaluated: dict[str, Any]) -> None:
    full, z = evaluated["test"], evaluated["zscore"]
    assert full["f1"] >= 0.85, full
    assert full["fpr"] <= 0.02
    assert full["f1"] > z["f1"] + 0.2, (full["f1"], z["f1"])
    # per execution, on the latency anomaly alone, the forest also beats the z-score
    forest, zs = evaluated["iforest_latency_only"], evaluated["zscore"]
    assert forest["per_kind"]["seq_scan"]["f1"] > zs["per_kind"]["seq_scan"]["f1"]
    assert forest["precision"] > zs["precision"]


def test_every_planted_kind_is_found_and_grouped(evaluated: dict[str, Any]) -> None:
    per = evaluated["test"]["per_kind"]
    assert per["seq_scan"]["recall"] >= 0.7
    assert per["rate_burst"]["recall"] >= 0.8
    assert per["error_burst"]["recall"] >= 0.9
    assert per["heavy_unseen"]["recall"] == 1.0
    for kind in ("rate_burst", "error_burst", "heavy_unseen"):
        assert per[kind]["precision"] >= 0.8, (kind, per[kind])
    events = evaluated["events"]
    assert events["labels_detected"] == events["labels"] == 4
    # a few hundred anomalous executions became a handful of incidents
    assert events["incidents"] <= 20


def test_zscore_is_fitted_per_fingerprint() -> None:
    ex = [Execution(T0 + i, "a", "SELECT", 10.0 + (i % 3), 1, False, 10) for i in range(30)]
    z = ZScoreDetector(k=3).fit(ex)
    probe = [ex[0]._replace(duration_ms=11.0), ex[0]._replace(duration_ms=100.0),
             ex[0]._replace(fingerprint="unknown", duration_ms=1e6)]  # fmt: skip
    assert list(z.predict(probe)) == [False, True, False]


def test_severity_from_score_and_impact() -> None:
    assert severity(0.55, 10.0, 1, 0) == "low"
    assert severity(0.65, 2_000.0, 3, 0) == "medium"
    assert severity(0.8, 30_000.0, 10, 0) == "high"
    assert severity(0.9, 0.0, 40, 40) == "high"  # 40 failures are impact enough
    assert severity(0.9, 0.0, 1, 0) == "medium"  # very odd but harmless


def _flag(ts: float, kind: str = "latency", fp: str = "a", i: int = 0, excess: float = 100.0,
          score: float = 0.7) -> Flag:  # fmt: skip
    return Flag(i, ts, kind, fp, score, excess, kind == "error_burst", None)


def test_incidents_group_consecutive_flags_of_one_cause() -> None:
    flags = [_flag(0), _flag(60, fp="b"), _flag(120), _flag(5000), _flag(130, "rate_burst", "c"),
             _flag(140, "rate_burst", "d"), _flag(150, "error_burst", "e")]  # fmt: skip
    incidents = group_incidents(flags, gap_s=900)
    latency = [i for i in incidents if i.kind == "latency"]
    assert [(i.start, i.end, i.executions) for i in latency] == [(0, 120, 3), (5000, 5000, 1)]
    assert sorted(latency[0].fingerprints) == ["a", "b"]
    assert latency[0].impact_ms == pytest.approx(300.0)
    # bursts are per template; errors across templates
    assert sorted(i.fingerprints[0] for i in incidents if i.kind == "rate_burst") == ["c", "d"]
    assert [i.errors for i in incidents if i.kind == "error_burst"] == [1]


def test_tracker_closes_stale_incidents_and_reports_escalation() -> None:
    tracker = IncidentTracker(gap_s=100)
    (inc,) = tracker.add([_flag(0, excess=10.0, score=0.8)])
    assert inc.severity == "medium" and tracker.open_count == 1
    tracker.add([_flag(10 + k, i=k, excess=2_000.0, score=0.8) for k in range(10)])
    assert inc.severity == "high" and inc.executions == 11
    assert tracker.close_stale(50) == []
    assert tracker.close_stale(500) == [inc] and not inc.open and tracker.open_count == 0


def test_cold_detector_flags_a_big_slowdown_only_after_warmup() -> None:
    det = Detector(None)
    ex = [Execution(T0 + i, "a", "SELECT", 1.0 + 0.01 * (i % 5), 1, False, 10) for i in range(300)]
    assert [f for f in det.process(ex) if f.kind == "latency"] == []
    slow = det.process([ex[0]._replace(ts=T0 + 301, duration_ms=50.0)])
    assert [f.kind for f in slow] == ["latency"]
    assert slow[0].excess_ms == pytest.approx(49.0, rel=0.05)


def test_forecast_interval_path_flags_cluster_arrivals_above_upper() -> None:
    executions, _ = synthetic_log(days=1.0)
    model = AnomalyModel(n_estimators=50).fit(executions)
    det = model.detector()
    start = T0 + 2 * DAY
    det.use_forecasts({"c1": [Interval(start, start + 300, 5.0)]}, {"fp01": "c1", "fp02": "c1"})
    calm = [Execution(start + 10 * k, "fp01", "SELECT", 1.0, 1, False, 10) for k in range(5)]
    assert [f for f in det.process(calm) if f.kind == "rate_burst"] == []
    burst = [Execution(start + 60 + k, "fp02", "SELECT", 1.0, 1, False, 10) for k in range(20)]
    flagged = {f.seq for f in det.process(burst) if f.kind == "rate_burst"}
    assert len(flagged) >= 20  # the whole window's arrivals of the cluster


def test_score_report_shares_a_cause_s_false_positives_across_its_kinds() -> None:
    flags = ["latency", "latency", None, "latency", "rate_burst", None]
    labels = ["seq_scan", "drift", "drift", None, "rate_burst", "rate_burst"]
    r = score_report(flags, labels)
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (3, 1, 2, 0)
    assert r["per_kind"]["seq_scan"] == pytest.approx(
        {"executions": 1, "detected": 1, "recall": 1.0, "precision": 0.5, "f1": 2 / 3}
    )
    assert r["per_kind"]["drift"]["recall"] == 0.5
    assert r["per_kind"]["rate_burst"]["precision"] == 1.0


def test_model_round_trips_through_its_artifact(tmp_path: Path) -> None:
    executions, _ = synthetic_log(days=1.0)
    model = AnomalyModel(n_estimators=30).fit(executions)
    model.save(tmp_path / "model.joblib")
    again = AnomalyModel.load(tmp_path / "model.joblib")
    probe = executions[-200:]
    assert model.flags(probe) == again.flags(probe)
    assert again.threshold_ == model.threshold_ and again.feature_names_ == model.feature_names_


def _steady_log(days: float = 3.0, seed: int = 1) -> tuple[list[Execution], dict[str, float]]:
    """Ten templates of steady latency (+-25%, x3-x6 hiccups on 2%) at 60 arrivals an hour."""
    rng = np.random.default_rng(seed)
    fps = [f"s{i}" for i in range(10)]
    base = dict(zip(fps, np.exp(rng.uniform(0.0, 3.0, len(fps))), strict=True))
    n = int(days * 24 * 60)
    ts = np.sort(rng.uniform(T0, T0 + days * DAY, n))
    out = []
    for t in ts:
        fp = fps[int(rng.integers(len(fps)))]
        ms = base[fp] * float(np.exp(rng.normal(0, 0.25)))
        if rng.random() < 0.02:
            ms *= float(rng.uniform(3, 6))
        out.append(Execution(float(t), fp, "SELECT", ms, 1, False, 100, None, False, None, "app"))
    return out, base


def test_a_lone_lock_wait_is_flagged_even_when_training_saw_one() -> None:
    """The spike view: seconds beyond the expected isolate at once, whatever ratio the training
    history's own lock waits reached (so the `beyond` rule does not fire)."""
    log, base = _steady_log()
    cut = len(log) * 2 // 3
    train, test = log[:cut], log[cut:]
    i = next(k for k in range(200, cut) if train[k].fingerprint == "s1")
    train[i] = train[i]._replace(duration_ms=base["s1"] + 1500.0)
    model = AnomalyModel(random_state=0).fit(train)
    j = next(k for k in range(100, len(test)) if test[k].fingerprint == "s1")
    test[j] = test[j]._replace(duration_ms=base["s1"] + 1400.0)
    assert test[j].duration_ms / base["s1"] < math.exp(model.residual_max_ + math.log(2.0))
    flags = [f for f in model.detector().process(test) if f.kind == "latency"]
    assert j in {f.seq for f in flags}
    # without labels the threshold is the contamination quantile (0.5%): the x3-x6 hiccups
    # (2% of the executions) are not all alarms
    assert len(flags) <= 0.01 * len(test), len(flags)


def test_a_persistent_moderate_slowdown_is_flagged_and_a_machine_wide_stall_is_not() -> None:
    """The level-shift view: x8 on every execution of one template for hours is flagged once a
    few of them are in; a stall that slows every template at once (the machine: the same
    milliseconds added to whatever runs then) is netted out by the system's level."""
    log, _ = _steady_log(days=4.0)
    cut = len(log) // 2
    s0 = log[cut].ts + 3600
    slow = [e._replace(duration_ms=e.duration_ms * 8, label="slow")
            if e.fingerprint == "s2" and s0 <= e.ts < s0 + 6 * 3600 else e
            for e in log]  # fmt: skip
    st0 = s0 + 8 * 3600  # later: 25 ms more for every template, 30 executions in a row
    k0 = next(k for k, e in enumerate(slow) if e.ts >= st0)
    stalled = [e._replace(duration_ms=e.duration_ms + 25.0) if k0 <= k < k0 + 30 else e
               for k, e in enumerate(slow)]  # fmt: skip
    model = AnomalyModel(random_state=0).fit(stalled[:cut])
    flags = [f for f in model.detector().process(stalled[cut:]) if f.kind == "latency"]
    hit = {f.seq for f in flags if stalled[cut + f.seq].label == "slow"}
    planted = [k for k, e in enumerate(stalled[cut:]) if e.label == "slow"]
    assert len(hit) >= len(planted) * 0.6, (len(hit), len(planted))
    in_stall = [f for f in flags if k0 <= cut + f.seq < k0 + 30]
    assert len(in_stall) <= 3, in_stall


def test_a_burst_in_a_quiet_hour_is_judged_against_the_day_s_shape() -> None:
    """At night the trailing window may hold no other traffic to scale an expectation by: the
    training history's arrivals at that hour of the day stand in for it."""
    rng = np.random.default_rng(3)
    fps = [f"q{i}" for i in range(10)]
    out = []
    for day in range(3):
        for hour in range(24):
            n = 60 if 8 <= hour < 20 else 20
            for t in np.sort(rng.uniform(0, 3600, n)):
                ts = T0 + day * DAY + hour * 3600 + float(t)
                fp = fps[int(rng.integers(len(fps)))]
                out.append(
                    Execution(ts, fp, "SELECT", 2.0, 1, False, 100, None, False, None, "app")
                )
    b0 = T0 + 2 * DAY + 3 * 3600  # 03:00 on the third day: nothing else in those ten minutes
    out = [e for e in out if not b0 - 600 <= e.ts < b0 + 600]
    out += [Execution(b0 + float(x), "q0", "SELECT", 2.0, 1, False, 100, None, False, "b", "app")
            for x in np.sort(rng.uniform(0, 600, 25))]  # fmt: skip
    out.sort(key=lambda e: e.ts)
    cut = next(k for k, e in enumerate(out) if e.ts >= T0 + 2 * DAY)
    model = AnomalyModel(n_estimators=20, random_state=0).fit(out[:cut])
    assert model.hourly_[3] * 600 >= 2  # the history's usual traffic at 03:00
    flags = model.detector().process(out[cut:])
    burst = {f.seq for f in flags if f.kind == "rate_burst"}
    planted = {k for k, e in enumerate(out[cut:]) if e.label == "b"}
    assert len(burst & planted) >= 20 and not burst - planted


def test_an_artifact_of_an_older_layout_is_refused(tmp_path: Path) -> None:
    executions, _ = synthetic_log(days=1.0)
    model = AnomalyModel(n_estimators=10).fit(executions)
    # what a model pickled before the views has (and lacks): its state without forests_ (by
    # the pickle protocol: the compiled class's attributes cannot be deleted)
    state = dict(model.__getstate__())
    del state["forests_"]
    old = AnomalyModel.__new__(AnomalyModel)
    old.__setstate__(state)
    old.save(tmp_path / "model.joblib")
    with pytest.raises(TypeError, match="older layout"):
        AnomalyModel.load(tmp_path / "model.joblib")


def test_views_name_known_features_only() -> None:
    with pytest.raises(ValueError, match="unknown forest features"):
        AnomalyModel(views=(("residual", "nope"),))
    single = AnomalyModel(n_estimators=10, views=(FEATURES,)).fit(synthetic_log(days=1.0)[0])
    assert single.feature_names_ == list(FEATURES) and len(single.forests_) == 1


def test_the_online_fast_path_flags_exactly_what_the_full_vectors_do() -> None:
    """Online (`features_out` None) the detector builds a feature vector only for executions
    slower than expected; with vectors for every execution (training) the flags are the same."""
    executions, _ = synthetic_log(seed=3, days=2.0)
    half = len(executions) // 2
    model = AnomalyModel().fit(executions[:half])
    for cold in (False, True):
        fast = Detector(None if cold else model)
        full = Detector(None if cold else model)
        got = fast.process(executions[half:])
        want = full.process(executions[half:], features_out=[])
        assert [f for f in got if f.kind == "latency"], "the log plants latency anomalies"
        assert got == want


def _drifting(
    log: list[Execution], fp: str, start: float, hours: float, top: float
) -> list[Execution]:
    """`fp` grows from 1x to `top`x over `hours` from `start`, then is back to normal;
    executions at 3x or more are labelled (as the simulator's drift labels them)."""
    out = []
    for e in log:
        if e.fingerprint == fp and start <= e.ts < start + hours * 3600:
            factor = 1.0 + (top - 1.0) * (e.ts - start) / (hours * 3600)
            e = e._replace(duration_ms=e.duration_ms * factor,
                           label="drift" if factor >= 3.0 else None)  # fmt: skip
        out.append(e)
    return out


def test_a_drift_is_kept_out_of_the_baseline_and_flagged() -> None:
    """A template slowing down gradually: with its lasting slowdown held out of the running
    median (`DetectorConfig.hold`), the executions well into the drift stay slow against the
    baseline and are flagged; with every execution entering it (hold=0) the median follows."""
    log, _ = _steady_log(days=4.0)
    cut = len(log) // 2
    start = log[cut].ts + 3600
    hours = 36.0
    drifted = _drifting(log, "s3", start, hours=hours, top=12.0)
    test = drifted[cut:]
    labelled = {k for k, e in enumerate(test) if e.label == "drift"}
    assert len(labelled) >= 100
    recall = {}
    for hold in (0, 64):
        config = replace(DetectorConfig(), hold=hold)
        model = AnomalyModel(random_state=0, config=config).fit(drifted[:cut])
        flags = [f for f in model.detector().process(test) if f.kind == "latency"]
        recall[hold] = len({f.seq for f in flags} & labelled) / len(labelled)
        # (the drift's first executions, under 3x, are slow too: only flags elsewhere are false)
        outside = [f for f in flags if not start <= f.ts < start + hours * 3600]
        assert len(outside) <= 6, (hold, outside)
    # (the first labelled executions, at 3-4x while the held baseline sits near 2x, are within
    # `MIN_Z` spreads of it and not judged: the steady part of the drift is)
    assert recall[64] >= 0.6, recall
    assert recall[0] < 0.1, recall  # the running median followed the drift


def test_a_lasting_shift_becomes_the_new_normal_after_hold_executions() -> None:
    """A slowdown's executions are held out of the baseline from the third in a row on; after
    `hold` of them the slower level enters (a plan slower for good stops being news) until an
    execution is ordinary again. A lone spike is never held."""
    hold = 16
    det = Detector(None, DetectorConfig(hold=hold))
    t = iter(range(10_000))

    def run(ms: float, n: int) -> None:
        """`n` executions of "fp" at `ms`, each between two of other templates at their usual
        time (alone, its slowdown would be the system's level: see `_expect`)."""
        batch = []
        for _ in range(n):
            for fp, each in (("a", 2.0), ("fp", ms), ("b", 3.0)):
                batch.append(Execution(T0 + next(t), fp, "SELECT", each, 1, False, 100))
        det.process(batch)

    run(1.0, 80)
    run(9.0, 1)  # one spike
    st = det.fps["fp"]
    assert st.held == 0 and 9.0 in [round(math.exp(x), 6) for x in st.lat]  # the spike went in
    run(6.0, 2 + hold)
    assert st.held == hold  # the first two went in, the rest were held
    assert math.exp(st.med) == pytest.approx(1.0, rel=0.05)
    run(6.0, det.config.history)
    assert math.exp(st.med) == pytest.approx(6.0, rel=0.05)  # the new normal
    run(6.0, 5)
    assert st.held == 0  # ordinary again: the next slowdown would be held


def test_the_rolling_median_is_the_window_s_median() -> None:
    """The system's level is kept sorted as values come and go: at every step the same as the
    median of the last CONTEXT values sorted afresh (ties and negatives included)."""
    from collections import deque

    from models.anomaly import CONTEXT, _Rolling, _small_median

    rng = np.random.default_rng(2)
    rolling, window = _Rolling(CONTEXT), deque(maxlen=CONTEXT)
    for x in np.round(rng.normal(0, 1, 2000), 1):  # rounded: many ties
        window.append(float(x))
        assert rolling.add(float(x)) == _small_median(window)
    assert rolling.add(float("nan")) == _small_median([*list(window)[1:], 0.0])


def test_a_template_whose_time_follows_its_parameters_is_judged_by_its_own_spread() -> None:
    """`MIN_Z`: a lookup that takes 1 ms for one parameter and 8 ms for another is not news at
    3x its median, while the same 3x on a steady template is: `_slow` judges an execution
    against the template's own spread (residual_z), unless it is slower by far."""
    from models.anomaly import FEATURES, MIN_Z, _slow

    def feats(residual: float, z: float, run2: float = 0.5, excess: float = 1.0) -> list[float]:
        f = [0.0] * len(FEATURES)
        for name, v in (("residual", residual), ("residual_z", z), ("residual_run2", run2),
                        ("excess", excess)):  # fmt: skip
            f[FEATURES.index(name)] = v
        return f

    three = math.log(3.0)
    assert _slow(feats(three, three / 0.2))  # a steady template (spread 0.2): 5.5 spreads
    assert not _slow(feats(three, three / 0.8))  # a wide one (spread 0.8): 1.4 spreads
    assert three / 0.8 < MIN_Z <= three / 0.2
    assert _slow(feats(math.log(30.0), 1.0))  # x30: slower by far, whatever the spread
    assert _slow(feats(three, 1.0, excess=9.0), late=5.0)  # seconds late: a lock wait
    assert not _slow(feats(three, 10.0, run2=-0.1))  # a lone hiccup (the previous was fine)
