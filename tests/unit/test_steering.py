"""The steering bandit on synthetic latencies: it finds the fast arm, retires slow ones, stops
exploring once confident, and its A/B test tells a real gain from noise."""

from __future__ import annotations

import math
import random

import pytest

from models.steering import (
    ARMS,
    STOCK,
    ArmStats,
    Policy,
    TemplateState,
    mann_whitney,
    plan_shape,
    reset_sql,
    set_sql,
    welch_t,
)

#: true median latency (ms) of each arm for one template
TRUE = {"stock": 80.0, "no_nestloop": 85.0, "no_hashjoin": 300.0, "no_mergejoin": 82.0,
        "hash_only": 90.0, "no_indexscan": 8.0}  # fmt: skip


def _run(
    policy: Policy, truth: dict[str, float], n: int, seed: int,
    predicted: dict[str, float] | None = None,
) -> tuple[TemplateState, list[str]]:  # fmt: skip
    rng = random.Random(seed)
    noise = random.Random(seed + 1)
    st = TemplateState()
    if predicted is not None:
        policy.warm_start(st, predicted)
    for _ in range(3):  # the template's stock history that made it eligible
        policy.update(st, STOCK, truth[STOCK] * math.exp(noise.gauss(0, 0.1)), rng)
    chosen = []
    for _ in range(n):
        arm = policy.choose(st, rng)
        chosen.append(arm)
        policy.update(st, arm, truth[arm] * math.exp(noise.gauss(0, 0.1)), rng)
    return st, chosen


def test_thompson_sampling_converges_on_the_fast_arm() -> None:
    for seed in range(5):
        st, chosen = _run(Policy(), TRUE, 80, seed)
        assert st.converged == "no_indexscan", (seed, st.converged)
        assert chosen[-20:] == ["no_indexscan"] * 20  # exploration stopped
        # exploration cost: the slow arms were tried only a few times
        assert chosen.count("no_hashjoin") <= 4


def test_an_arm_clearly_slower_than_stock_is_retired() -> None:
    policy = Policy()
    rng = random.Random(0)
    st = TemplateState()
    for ms in (50, 52, 49, 51, 50):
        policy.update(st, STOCK, ms, rng)
    events = [policy.update(st, "no_hashjoin", ms, rng) for ms in (200, 210, 190, 205)]
    assert "retired:no_hashjoin" in events
    assert "no_hashjoin" not in st.live()
    assert all(policy.choose(st, rng) != "no_hashjoin" for _ in range(200))


def test_stock_stays_when_nothing_beats_it() -> None:
    truth = {a: 50.0 * (1.0 if a == STOCK else 1.6) for a in ARMS}
    st, chosen = _run(Policy(), truth, 120, 3)
    assert st.converged == STOCK  # every other arm was dropped: exploration is over
    assert chosen[-60:] == [STOCK] * 60
    assert all(chosen.count(a) <= 3 for a in ARMS if a != STOCK)  # and it was cheap
    # arms about as fast as stock are dropped too: a gain below min_gain is not worth a risk
    even = {a: 50.0 for a in ARMS}
    st, chosen = _run(Policy(), even, 200, 4)
    assert chosen[-50:].count(STOCK) >= 45


def test_disabled_and_withdrawn_arms() -> None:
    st, _ = _run(Policy(), TRUE, 60, 1)
    rng = random.Random(9)
    st.converged = None
    picks = {Policy().choose(st, rng, disabled=["no_indexscan"]) for _ in range(100)}
    assert "no_indexscan" not in picks
    st.withdrawn = True
    assert Policy().choose(st, rng) == STOCK


def test_welch_and_mann_whitney() -> None:
    a, b = ArmStats(), ArmStats()
    for x in (1.0, 1.1, 0.9, 1.0):
        a.add(x)
    for x in (2.0, 2.1, 1.9, 2.0):
        b.add(x)
    assert welch_t(b, a) > 10 and welch_t(a, b) < -10
    rng = random.Random(4)
    fast = [10 * math.exp(rng.gauss(0, 0.2)) for _ in range(30)]
    slow = [20 * math.exp(rng.gauss(0, 0.2)) for _ in range(12)]
    p, ratio = mann_whitney(fast, slow)
    assert p < 0.001 and 0.4 < ratio < 0.6
    same = [20 * math.exp(rng.gauss(0, 0.2)) for _ in range(30)]
    p, ratio = mann_whitney(same, slow)
    assert p > 0.05


def test_hint_sql_comes_from_the_arm_table_only() -> None:
    assert set_sql("hash_only") == "SET enable_nestloop = off; SET enable_mergejoin = off"
    assert reset_sql("hash_only", custom_plan=True) == (
        "RESET enable_nestloop; RESET enable_mergejoin; RESET plan_cache_mode"
    )
    assert set_sql(STOCK, custom_plan=True) == "SET plan_cache_mode = force_custom_plan"


def test_a_pinned_fingerprint_runs_its_arm_every_time() -> None:
    """Pins from the index advisor: from the first execution, no exploration, no holdout,
    no learning; dry run only reports; steering_exclude still wins; SHOW STEERING says so."""
    from optimizer.fingerprint import compute_fingerprint
    from proxy.settings import Settings
    from proxy.steering import DRY_RUN, PIN, SteeringController

    sql = "SELECT id FROM shop.events WHERE flag = 1 ORDER BY created DESC LIMIT 7"
    other = "SELECT id FROM shop.events WHERE created = 5"
    fp = compute_fingerprint(sql).id
    ctl = SteeringController(Settings(steering_enabled=True, steering_holdout=0.5))
    ctl.pins = {fp: "no_indexscan"}
    decisions = [ctl.decide(sql) for _ in range(50)]
    assert {d[1:] for d in decisions if d is not None} == {("no_indexscan", PIN)}
    assert None not in decisions and ctl.decide(other) is None
    key = decisions[0][0]
    ctl.observe(sql, decisions[0], 123.0)
    assert ctl.states[key].arms["no_indexscan"].n == 0  # a pin is not an experiment
    assert any(r[0] == fp and r[1] == "pinned:no_indexscan" for r in ctl.rows())

    dry = SteeringController(Settings(steering_enabled=True, steering_dry_run=True))
    dry.pins = {fp: "no_indexscan"}
    assert dry.decide(sql)[1:] == ("no_indexscan", DRY_RUN)  # type: ignore[index]
    excluded = SteeringController(Settings(steering_enabled=True, steering_exclude=[fp]))
    excluded.pins = {fp: "no_indexscan"}
    assert excluded.decide(sql) is None
    unknown = SteeringController(Settings(steering_enabled=True))
    unknown.pins = {fp: "not_an_arm"}  # never reaches SQL: only ARMS names are applied
    assert unknown.decide(sql) is None


def test_a_converged_arm_is_on_trial_until_the_ab_test_decides() -> None:
    """After convergence, half the executions run stock (the trial's control, same period);
    an arm slower than its holdout with confidence is withdrawn without waiting for the full
    sample; a validated arm keeps the usual 10% holdout."""
    from proxy.settings import Settings
    from proxy.steering import HOLDOUT, STEER, SteeringController

    sql = "SELECT count(*) FROM t WHERE a = 1"
    ctl = SteeringController(Settings(steering_enabled=True, steering_seed=1))
    key = ctl.key(sql)
    assert key is not None
    for _ in range(5):
        ctl.observe(sql, None, 100.0)  # stock runs make the template eligible
    st = ctl.states[key]
    st.converged = "no_nestloop"
    modes = [ctl.decide(sql)[2] for _ in range(2000)]  # type: ignore[index]
    assert 0.44 < modes.count(HOLDOUT) / len(modes) < 0.56
    # the trial: the arm is clearly slower than the stock runs beside it -> withdrawn early
    st.samples["no_nestloop"] = [150.0 + i for i in range(8)]
    st.holdout = [100.0 + i for i in range(8)]
    (d,) = ctl.evaluate()
    assert (d["action"], d["status"]) == ("revert", "reverted") and st.withdrawn
    assert ctl.decide(sql) is None  # withdrawn: the stock plan, unsteered

    # a faster arm with enough samples is validated; then the holdout drops to 10%
    other = "SELECT count(*) FROM t WHERE b = 1"
    k2 = ctl.key(other)
    assert k2 is not None
    for _ in range(5):
        ctl.observe(other, None, 100.0)
    st2 = ctl.states[k2]
    st2.converged = "no_hashjoin"
    st2.samples["no_hashjoin"] = [50.0 + i for i in range(20)]
    st2.holdout = [100.0 + i for i in range(8)]
    (d2,) = ctl.evaluate()
    assert d2["status"] == "validated"
    modes = [ctl.decide(other)[2] for _ in range(2000)]  # type: ignore[index]
    assert 0.06 < modes.count(HOLDOUT) / len(modes) < 0.14 and STEER in modes


def test_convergence_starts_the_trial_afresh() -> None:
    import random

    from models.steering import STOCK, Policy, TemplateState

    policy, st, rng = Policy(), TemplateState(), random.Random(0)
    for _ in range(10):
        policy.update(st, STOCK, 100.0, rng)
    st.holdout = [100.0] * 5  # holdout runs from the exploration phase
    events = [policy.update(st, "no_nestloop", 20.0, rng) for _ in range(6)]
    assert "converged:no_nestloop" in events
    assert st.holdout == [] and len(st.samples["no_nestloop"]) < 6


def test_show_steering_lists_every_template_the_most_executed_first() -> None:
    """SHOW STEERING had a cap of 50 rows in an order that meant nothing: past 50 templates,
    some (a steered trap in the steering bench) never showed up, whatever LIMIT was asked."""
    from proxy.settings import Settings
    from proxy.steering import SteeringController

    ctl = SteeringController(Settings(steering_enabled=True))
    for t in range(70):
        sql = f"SELECT c{t} FROM shop.events WHERE id = 1"
        for _ in range(3 + t % 7):  # unsteered SELECTs feed the template's stock statistics
            ctl.observe(sql, None, 30.0)
    rows = ctl.rows()
    assert len(rows) == 70
    pulls = [int(r[2].split("/")[-1]) for r in rows]  # "stock=30.0ms/N"
    assert pulls == sorted(pulls, reverse=True) and pulls[0] == 9 and pulls[-1] == 3
    assert len(ctl.rows(limit=10)) == 10


def _plan(node: str, *children: dict, **extra: str) -> dict:
    out: dict = {"Node Type": node, "Total Cost": 1.0, "Plan Rows": 10, **extra}
    if children:
        out["Plans"] = list(children)
    return out


def test_arms_with_a_plan_seen_before_are_retired_untried() -> None:
    scan = [{"Plan": _plan("Seq Scan", **{"Relation Name": "t"})}]
    costlier = [{"Plan": _plan("Seq Scan", **{"Relation Name": "t", "Total Cost": 9e9})}]
    by_index = [{"Plan": _plan("Index Scan", **{"Relation Name": "t", "Index Name": "t_pk"})}]
    assert plan_shape(scan) == plan_shape(costlier)  # estimates are not the plan
    assert plan_shape(scan) != plan_shape(by_index)
    shapes = {a: plan_shape(scan) for a in ARMS}
    shapes["no_indexscan"] = plan_shape(by_index)  # (only to have one that differs)
    st = TemplateState()
    assert Policy().same_plans(st, shapes) == ["no_nestloop", "no_hashjoin", "no_mergejoin",
                                               "hash_only"]  # fmt: skip
    assert st.converged is None and st.live() == [STOCK, "no_indexscan"]
    # two arms sharing a plan that is not stock's: the first is kept, the second retired
    join = [{"Plan": _plan("Hash Join", _plan("Seq Scan"), _plan("Hash"))}]
    shapes = {a: plan_shape(scan) for a in ARMS}
    shapes["no_nestloop"] = shapes["hash_only"] = plan_shape(join)
    st = TemplateState()
    assert "hash_only" in Policy().same_plans(st, shapes)
    assert st.live() == [STOCK, "no_nestloop"]
    # no switch changes the plan: nothing to explore, the template runs stock
    st = TemplateState()
    Policy().same_plans(st, {a: plan_shape(scan) for a in ARMS})
    assert st.converged == STOCK and st.live() == [STOCK]
    rng = random.Random(1)
    assert {Policy().choose(st, rng) for _ in range(50)} == {STOCK}


def test_an_arm_the_cost_model_predicts_faster_is_tried_first() -> None:
    """Bao's warm start: an arm the model expects to be faster starts from that prediction,
    so the bandit tries it first and converges on it with less exploration of the others."""
    # the model's level is off (x3 everywhere): only the ratios to stock matter
    predicted = {a: 3 * ms for a, ms in TRUE.items()}
    cold_other = warm_other = cold_first = warm_first = 0
    for seed in range(10):
        st, chosen = _run(Policy(), TRUE, 80, seed)
        cold_other += sum(a not in (STOCK, "no_indexscan") for a in chosen)
        cold_first += chosen.index("no_indexscan")
        st, chosen = _run(Policy(), TRUE, 80, seed, predicted)
        assert st.converged == "no_indexscan", (seed, st.converged)
        assert chosen[-20:] == ["no_indexscan"] * 20
        assert set(st.prior) == {"no_indexscan"}  # the only arm predicted faster
        warm_other += sum(a not in (STOCK, "no_indexscan") for a in chosen)
        warm_first += chosen.index("no_indexscan")
    assert warm_first < cold_first / 2, (warm_first, cold_first)
    assert warm_other < cold_other, (warm_other, cold_other)


def test_a_prediction_never_holds_an_arm_back() -> None:
    """The planner's mistakes are the arms worth finding, and a model reading the planner's
    estimates calls them slower: a prediction that an arm is slower leaves it as it would be
    without a model, so the bandit still finds it, exactly as from a cold start."""
    wrong = dict(TRUE, no_indexscan=320.0)  # the winning arm predicted 4x slower
    for seed in range(5):
        _, cold_chosen = _run(Policy(), TRUE, 80, seed)
        warm, warm_chosen = _run(Policy(), TRUE, 80, seed, wrong)
        assert warm.prior == {} and warm.predicted["no_indexscan"] == pytest.approx(math.log(4))
        assert warm_chosen == cold_chosen and warm.converged == "no_indexscan"


def test_a_wrong_prediction_of_a_gain_is_outweighed_by_real_executions() -> None:
    """An arm predicted 4x faster that is not: a few executions retire it, and the stock
    plan stays (the prediction weighs what the model's error earns it)."""
    truth = {a: 50.0 * (1.0 if a == STOCK else 1.6) for a in ARMS}
    liked = dict(truth, no_mergejoin=12.5)
    for seed in range(5):
        st, chosen = _run(Policy(), truth, 120, seed, liked)
        assert "no_mergejoin" in st.retired and st.converged == STOCK, (seed, st.retired)
        # it cost what a cold start costs: two tries of every arm, then stock for good
        assert all(chosen.count(a) <= 3 for a in ARMS if a != STOCK)
        assert chosen[-50:] == [STOCK] * 50


def test_warm_start_clips_and_skips_what_it_cannot_use() -> None:
    policy = Policy(prior_clip=4.0)
    st = TemplateState()
    st.retired.add("no_hashjoin")
    priors = policy.warm_start(
        st, {STOCK: 10.0, "no_nestloop": 1000.0, "no_hashjoin": 1.0, "no_mergejoin": 5.0,
             "hash_only": math.nan, "no_indexscan": 1.0}, error_sd=0.3,
    )  # fmt: skip
    assert priors == st.prior == {"no_mergejoin": math.log(0.5), "no_indexscan": -math.log(4.0)}
    assert st.predicted == {**priors, "no_nestloop": math.log(4.0)}
    assert st.prior_sd == 0.3
    assert policy.warm_start(TemplateState(), {"no_nestloop": 5.0}) == {}  # no stock: nothing


def test_a_models_error_sets_the_weight_of_its_predictions() -> None:
    from proxy.steering import error_sd

    assert error_sd({"test": {"qerror_p90": math.e**1.645}}) == pytest.approx(1.0)
    assert error_sd({"qerror_p90": 1.8}) == pytest.approx(math.log(1.8) / 1.645)
    assert error_sd({}) == error_sd({"qerror_p90": float("nan")}) == 0.5
    # a precise model's prediction weighs up to one execution, a poor one's much less
    st = TemplateState(prior_sd=0.01)
    assert Policy._kappa(st, 0.05) == 1.0
    st.prior_sd = 2.0
    assert Policy._kappa(st, 0.05) == 0.05


def test_the_bandit_compares_expected_latency_not_the_median() -> None:
    """A template whose executions differ by parameter (a cheap and an expensive customer): an
    arm that halves the cheap runs and slows the expensive ones by 40% has the lower median
    (geometric mean 11.8 ms against 15.8) and the higher total (36 ms a pair against 27.5).
    The posterior's expected latency (exp(mu + sigma^2 / 2)) sees the total."""
    stock = (5.0, 50.0)
    arm = (2.0, 70.0)
    for seed in range(10):
        policy, rng, noise = Policy(), random.Random(seed), random.Random(seed + 1)
        st = TemplateState()
        chosen = []
        for i in range(200):
            pick = policy.choose(st, rng) if i >= 4 else STOCK
            truth = arm if pick == "no_hashjoin" else stock
            ms = truth[i % 2] * math.exp(noise.gauss(0, 0.05))
            chosen.append(pick)
            # the other arms run as stock does, give or take 40%: they get dropped
            if pick not in (STOCK, "no_hashjoin"):
                ms *= 1.4
            policy.update(st, pick, ms, rng)
        assert st.converged != "no_hashjoin", (seed, st.converged)
        # comparing medians, it ran in 51-76 of the last 100 executions in three of five seeds
        assert chosen[-100:].count("no_hashjoin") <= 30, seed


def test_the_ab_test_keeps_only_an_arm_no_slower_in_total() -> None:
    """The arm halves the cheap executions of a template and slows its expensive ones: faster
    by Mann-Whitney U (medians), slower in total. It is not validated, and once the trial has
    twice the samples it needs, it is withdrawn; the decision records both ratios."""
    from proxy.settings import Settings
    from proxy.steering import SteeringController

    sql = "SELECT count(*) FROM t WHERE c = 1"
    ctl = SteeringController(Settings(steering_enabled=True, steering_seed=1))
    key = ctl.key(sql)
    assert key is not None
    for _ in range(5):
        ctl.observe(sql, None, 20.0)
    st = ctl.states[key]
    st.converged = "no_hashjoin"
    # holdout: 3 cheap runs of 10 ms for 1 expensive of 100; the arm: 4 ms and 180 ms
    st.holdout = [10.0 + i % 3 * 0.1 if i % 4 else 100.0 for i in range(24)]
    st.samples["no_hashjoin"] = [4.0 + i % 3 * 0.1 if i % 4 else 180.0 for i in range(24)]
    assert ctl.evaluate() == []  # not validated (not enough for a withdrawal either)
    assert not st.withdrawn
    st.samples["no_hashjoin"] = [4.0 + i % 3 * 0.1 if i % 4 else 180.0 for i in range(40)]
    (d,) = ctl.evaluate()
    assert d["status"] == "reverted" and st.withdrawn
    assert d["detail"]["median_ratio"] < 0.5 < 1.0 < d["detail"]["mean_ratio"]
    assert d["detail"]["p_value"] < 0.05  # the medians alone would have validated it


def test_a_clear_gain_is_validated_before_the_full_sample() -> None:
    """While an arm is on trial half its template's executions run the stock plan: a gain as
    clear as the planner traps' (every arm run 30x faster than every stock run) is validated
    after 8 runs each (p = 0.00008 < alpha / 20), a modest one waits for the full sample."""
    from proxy.settings import Settings
    from proxy.steering import SteeringController

    ctl = SteeringController(Settings(steering_enabled=True, steering_seed=1))
    keys = []
    for sql in ("SELECT 1 FROM t WHERE d = 1", "SELECT 1 FROM t WHERE e = 1"):
        key = ctl.key(sql)
        assert key is not None
        for _ in range(5):
            ctl.observe(sql, None, 30.0)
        ctl.states[key].converged = "no_indexscan"
        ctl.states[key].holdout = [30.0 + i for i in range(8)]
        keys.append(key)
    ctl.states[keys[0]].samples["no_indexscan"] = [1.0 + i / 10 for i in range(8)]
    # 20% faster, overlapping: significant at 0.05, not at 0.0025
    ctl.states[keys[1]].samples["no_indexscan"] = [24.0 + i * 1.2 for i in range(8)]
    decisions = ctl.evaluate()
    assert [(d["status"], d["detail"]["template"]) for d in decisions] == [("validated", keys[0])]
    assert keys[1] not in ctl.validated and not ctl.states[keys[1]].withdrawn
