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
