"""The proxy's clock for logged timestamps: real time, or a simulated clock for the workload bench.

The hot path takes `time.monotonic()` only; the recorder maps those readings to epoch seconds
here. With `clock_speed = K` and `clock_start = T`, the moment the clock is (re)anchored is T and
every real second after it is K simulated seconds, so a week of warehouse life can be logged in
minutes. `SET clock_start` / `SET clock_speed` in the admin console re-anchor it at once.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime


class SimClock:
    __slots__ = ("_anchor_epoch", "_anchor_mono", "speed")

    def __init__(self, speed: float = 1.0, start: datetime | None = None) -> None:
        self.speed = 1.0
        self._anchor_mono = 0.0
        self._anchor_epoch = 0.0
        self.set(speed, start)

    def set(self, speed: float, start: datetime | None) -> None:
        """Re-anchor: now is `start` (or the real time) and time runs `speed` times faster."""
        mono = time.monotonic()
        self._anchor_mono = mono
        if start is None:
            self._anchor_epoch = time.time()
        else:
            self._anchor_epoch = (start if start.tzinfo else start.replace(tzinfo=UTC)).timestamp()
        self.speed = speed

    @property
    def simulated(self) -> bool:
        return self.speed != 1.0 or abs(self._anchor_epoch - time.time()) > 5 * 60 * self.speed

    def epoch(self, monotonic: float) -> float:
        """Epoch seconds (possibly simulated) of a `time.monotonic()` reading."""
        return self._anchor_epoch + (monotonic - self._anchor_mono) * self.speed

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.epoch(time.monotonic()), UTC)


#: the process-wide clock; the service configures it from settings
CLOCK = SimClock()
