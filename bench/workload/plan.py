"""The run's plan: every arrival, statement, parameter and label, as a function of the seed.

`Plan.arrivals()` merges the roles' arrival streams and the anomalies' extra executions in
simulated time order. Each stream draws from its own generator seeded by (seed, stream), so
the sequence depends only on the configuration and the data profile, never on how fast the
server answers; the runner only decides when (in real time) each arrival is sent.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from .anomalies import Anomaly, Injector, make_schedule
from .roles import ROLES, Arrival, dashboard_arrivals, mix_arrivals, role_rate
from .templates import Profile, Sampler

ANOMALY_STREAM = 1000


@dataclass
class PlanConfig:
    seed: int
    start: datetime  # simulated time at the run's first moment
    speed: float  # simulated seconds per real second
    duration: float  # real seconds
    qps: float  # average statements per real second, over weeks of the activity curve
    users: dict[str, int] = field(default_factory=lambda: {r.name: r.users for r in ROLES})
    anomalies: bool = True
    anomalies_per_day: float = 4.0
    run_tag: str = "r0"

    @property
    def sim_start(self) -> float:
        return self.start.timestamp()

    @property
    def sim_end(self) -> float:
        return self.sim_start + self.duration * self.speed


class Plan:
    def __init__(self, config: PlanConfig, profile: Profile) -> None:
        self.config = config
        self.profile = profile
        c = config
        self.schedule: list[Anomaly] = (
            make_schedule(c.seed, c.sim_start, c.sim_end, speed=c.speed, qps=c.qps,
                          run_tag=c.run_tag, per_day=c.anomalies_per_day)
            if c.anomalies else []
        )  # fmt: skip
        self.injector = Injector(self.schedule, profile.first_sale.date())

    def sampler(self, stream: int) -> Sampler:
        return Sampler(self.profile, np.random.default_rng([self.config.seed, stream]), stream)

    def _role_stream(self, index: int) -> Iterator[Arrival]:
        c = self.config
        role = ROLES[index]
        users = c.users.get(role.name, 0)
        if users <= 0:
            return iter(())
        gen = dashboard_arrivals if role.name == "dashboard" else mix_arrivals
        rate = role_rate(role, c.qps, c.speed)
        return gen(role, users, self.sampler(index + 1), rate, c.sim_start, c.sim_end)

    def arrivals(self) -> Iterator[Arrival]:
        """Every arrival of the run in simulated time order (a fresh, identical pass per call)."""
        streams = [
            (self.injector.apply(a) for a in self._role_stream(i)) for i in range(len(ROLES))
        ]
        extras = self.injector.extras(lambda i: self.sampler(ANOMALY_STREAM + i), self.config.users)
        counter = itertools.count()
        # ties keep the streams' order, so the merge is deterministic too
        for a in heapq.merge(*streams, extras, key=lambda a: a.sim):
            a.order = next(counter)
            yield a

    def label_counts(self) -> Counter[str]:
        """Labelled statements per label in the plan (one full pass)."""
        counts: Counter[str] = Counter()
        for a in self.arrivals():
            for st in a.statements:
                if st.label:
                    counts[st.label] += 1
        return counts

    def size(self) -> tuple[int, int]:
        """(arrivals, statements) in the plan."""
        arrivals = statements = 0
        for a in self.arrivals():
            arrivals += 1
            statements += len(a.statements)
        return arrivals, statements
