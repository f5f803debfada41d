"""The steering bench's result check: a LIMIT query's tie at the cut is not a wrong result."""

from bench.gain_steering import same_result, sort_keys

SQL = "SELECT id, sold_at FROM s WHERE c = $1 ORDER BY sold_at DESC LIMIT 3"


def test_sort_keys() -> None:
    assert sort_keys(SQL) == ["sold_at"]
    assert sort_keys("SELECT id FROM s ORDER BY id") is None  # no LIMIT: compared exactly
    assert sort_keys("SELECT id FROM s ORDER BY lower(x) LIMIT 2") is None


def test_ties_at_the_cut_are_valid_answers() -> None:
    a = [{"id": 1, "sold_at": 9}, {"id": 2, "sold_at": 8}, {"id": 3, "sold_at": 7}]
    b = [{"id": 1, "sold_at": 9}, {"id": 2, "sold_at": 8}, {"id": 4, "sold_at": 7}]
    assert same_result(SQL, a, b)
    wrong_key = [{"id": 1, "sold_at": 9}, {"id": 2, "sold_at": 8}, {"id": 3, "sold_at": 6}]
    assert not same_result(SQL, a, wrong_key)
    wrong_row = [{"id": 5, "sold_at": 9}, {"id": 2, "sold_at": 8}, {"id": 3, "sold_at": 7}]
    assert not same_result(SQL, a, wrong_row)
    assert not same_result("SELECT id FROM s", [{"id": 1}], [{"id": 2}])


def test_a_busy_machine_is_named_in_a_warning() -> None:
    """The latency benchmarks record the load average and warn above half the CPUs."""
    import io

    from bench.machine import busy_warning, warn_if_busy

    assert busy_warning("the scores", [0.9, 0.5, 0.4], 2) is None
    warning = busy_warning("the scores", [3.4, 2.0, 1.0], 2)
    assert warning is not None and "3.40 on 2 CPUs" in warning and "the scores" in warning
    out = io.StringIO()
    load = warn_if_busy("the scores", out)
    assert len(load) == 3 and all(x >= 0 for x in load)


def test_p95_after_convergence_uses_the_rounds_after_the_template_settled() -> None:
    """The p95s of a template are taken from the round after SHOW STEERING first found it
    settled (exploration before that is not "after convergence"), when enough rounds remain;
    otherwise from the second half."""
    from types import SimpleNamespace

    from bench.gain_steering import settled_from, summarise

    stmts = [("q", "SELECT 1", ()), ("q", "SELECT 1", ()), ("r", "SELECT 2", ())]
    rounds = 12
    # q explores a slow arm in rounds 0-6 (200 ms), settles at round 6; r never settles
    on = [[200.0 if r < 7 else 30.0, 30.0, 30.0 if r != 11 else 90.0] for r in range(rounds)]
    off = [[30.0, 30.0, 30.0] for _ in range(rounds)]
    statuses = [{"q": "exploring" if r < 6 else "converged:stock", "r": "exploring"}
                for r in range(rounds)]  # fmt: skip
    assert settled_from(statuses, "q", rounds) == 7 and settled_from(statuses, "r", rounds) is None
    assert settled_from(statuses, "q", 10) is None  # three rounds left: too few
    args = SimpleNamespace(min_ms=20.0, scale=1.0, rounds=rounds, per_template=2,
                           protocol="extended", rewrites=False, eval_interval=30.0,
                           warm_start=True)  # fmt: skip
    doc = summarise(stmts, {"on": on, "off": off}, {}, {}, args, {}, statuses)
    rows = {r["template"]: r for r in doc["templates"]}
    assert rows["q"]["p95_from_round"] == 7 and rows["q"]["p95_ratio"] == 1.0
    # r's p95 is the second half's: its slow last round counts
    assert rows["r"]["p95_from_round"] == 6 and rows["r"]["p95_ratio"] == 3.0
    # without statuses (older JSON): the second half for every template
    doc = summarise(stmts, {"on": on, "off": off}, {}, {}, args, {})
    assert {r["template"]: r["p95_from_round"] for r in doc["templates"]} == {"q": 6, "r": 6}
