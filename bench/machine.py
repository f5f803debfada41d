"""How busy the machine is when a benchmark measures latency.

Every latency-based score here (cost model accuracy, anomaly F1, steering gains) moves with the
machine's load: on two shared cores a sub-millisecond lookup slows several-fold when other work
runs. A benchmark records the load average at its start and end in its JSON and warns when the
start is busy, so a number taken on a loaded machine is recognisable as such.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


def busy_warning(what: str, load: list[float], n: int) -> str | None:
    """The warning for a 1-minute load average above half the CPUs, else None."""
    if load[0] <= 0.5 * n:
        return None
    return (
        f"warning: 1-minute load average is {load[0]:.2f} on {n} CPUs; other work on this "
        f"machine will distort {what}"
    )


def warn_if_busy(what: str, stream: TextIO = sys.stderr) -> list[float]:
    """The load average now, with `busy_warning` on `stream` when there is one."""
    load = load_average()
    warning = busy_warning(what, load, cpus())
    if warning:
        print(warning, file=stream)
    return load
