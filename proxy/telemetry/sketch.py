"""A bounded quantile sketch for latencies (log-spaced buckets, ~2% relative error).

DDSketch's idea without the dependency: a value v > 0 falls in bucket ceil(log(v)/log(gamma));
quantiles come from cumulative counts. Memory is bounded by `max_buckets`; when exceeded the
lowest buckets collapse into one, which only coarsens the fastest latencies.
"""

from __future__ import annotations

import math

import numpy as np


class QuantileSketch:
    __slots__ = ("_buckets", "_log_gamma", "count", "gamma", "max_buckets", "zero")

    def __init__(self, relative_accuracy: float = 0.02, max_buckets: int = 512) -> None:
        self.gamma = (1 + relative_accuracy) / (1 - relative_accuracy)
        self._log_gamma = math.log(self.gamma)
        self.max_buckets = max_buckets
        self._buckets: dict[int, int] = {}
        self.zero = 0
        self.count = 0

    def add(self, value: float) -> None:
        self.count += 1
        if value <= 1e-9:
            self.zero += 1
            return
        key = math.ceil(math.log(value) / self._log_gamma)
        b = self._buckets
        b[key] = b.get(key, 0) + 1
        if len(b) > self.max_buckets:
            self._collapse()

    def add_many(self, values: list[float]) -> None:
        if len(values) < 16:
            for v in values:
                self.add(v)
            return
        arr = np.asarray(values, dtype=np.float64)
        positive = arr[arr > 1e-9]
        self.count += len(arr)
        self.zero += len(arr) - len(positive)
        keys, counts = np.unique(np.ceil(np.log(positive) / self._log_gamma), return_counts=True)
        b = self._buckets
        for k, c in zip(keys.tolist(), counts.tolist(), strict=True):
            b[int(k)] = b.get(int(k), 0) + c
        while len(b) > self.max_buckets:
            self._collapse()

    def _collapse(self) -> None:
        keys = sorted(self._buckets)
        low, second = keys[0], keys[1]
        self._buckets[second] += self._buckets.pop(low)

    def quantile(self, q: float) -> float | None:
        if self.count == 0:
            return None
        rank = q * (self.count - 1)
        seen = self.zero
        if rank < seen:
            return 0.0
        for key in sorted(self._buckets):
            seen += self._buckets[key]
            if seen > rank:
                # midpoint of the bucket (gamma^(k-1), gamma^k] in log space
                return 2 * self.gamma**key / (self.gamma + 1)
        return 2 * self.gamma ** max(self._buckets) / (self.gamma + 1)
