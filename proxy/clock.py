"""The proxy's clock for logged timestamps: real time, or a simulated clock for the workload bench.

The hot path takes `time.monotonic()` only; the recorder maps those readings to epoch seconds
here. With `clock_speed = K` and `clock_start = T`, the moment the clock is (re)anchored is T and
every real second after it is K simulated seconds, so a week of warehouse life can be logged in
minutes. `SET clock_start` / `SET clock_speed` in the admin console re-anchor it at once.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from datetime import UTC, datetime

MAX_SEGMENTS = 64

Segment = tuple[float, float, float]  # (monotonic at the anchor, epoch at the anchor, speed)


class SimClock:
    """Piecewise-linear map from `time.monotonic()` to (simulated) epoch seconds.

    Each re-anchoring starts a new segment; earlier readings keep the segment they fell in, so
    statements queued before a `SET clock_start` are stamped with the clock of their time.
    """

    __slots__ = ("_anchor_epoch", "_anchor_mono", "_starts", "segments", "speed")

    def __init__(self, speed: float = 1.0, start: datetime | None = None) -> None:
        self.segments: list[Segment] = []
        self._starts: list[float] = []
        self.speed = 1.0
        self._anchor_mono = 0.0
        self._anchor_epoch = 0.0
        self.set(speed, start)

    def set(self, speed: float, start: datetime | None) -> None:
        """Re-anchor: now is `start` (or the real time) and time runs `speed` times faster."""
        mono = time.monotonic()
        if start is None:
            epoch = time.time()
        else:
            epoch = (start if start.tzinfo else start.replace(tzinfo=UTC)).timestamp()
        self.load([*self.segments[-(MAX_SEGMENTS - 1) :], (mono, epoch, speed)])

    def load(self, segments: list[Segment]) -> None:
        """Adopt another process's segments (the query log worker mirrors the proxy's clock)."""
        self.segments = list(segments)
        self._starts = [seg[0] for seg in self.segments]
        self._anchor_mono, self._anchor_epoch, self.speed = self.segments[-1]

    @property
    def simulated(self) -> bool:
        return self.speed != 1.0 or abs(self._anchor_epoch - time.time()) > 5 * 60 * self.speed

    @property
    def anchor(self) -> Segment:
        """The current segment: `epoch(m)` is `e + (m - mono) * speed` for every m >= mono."""
        return self.segments[-1]

    def epoch(self, monotonic: float) -> float:
        """Epoch seconds (possibly simulated) of a `time.monotonic()` reading."""
        if monotonic >= self._anchor_mono:
            return self._anchor_epoch + (monotonic - self._anchor_mono) * self.speed
        i = max(bisect_right(self._starts, monotonic) - 1, 0)
        mono, epoch, speed = self.segments[i]
        return epoch + (monotonic - mono) * speed

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.epoch(time.monotonic()), UTC)


#: the process-wide clock; the service configures it from settings
CLOCK = SimClock()
