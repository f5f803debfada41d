from collections.abc import Iterator

import pytest

pytest_plugins = ["tests.fix_proxy", "tests.fix_pgcluster", "tests.fix_service"]


@pytest.fixture(autouse=True)
def _real_clock_after_each_test() -> Iterator[None]:
    """A test that ran the workload simulator leaves the process-wide clock on simulated time;
    the next test (training windows, retention) must see real time again."""
    yield
    from proxy.clock import CLOCK

    if CLOCK.simulated:
        CLOCK.set(1.0, None)
