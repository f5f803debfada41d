"""Anomaly detection over the query log: per execution, per workload window, grouped into incidents.

One implementation serves training, evaluation and the online detector in the query log worker:
`Detector.process()` walks executions in time order, computes each one's features from what came
*before* it (leak-free: running per-fingerprint baselines, trailing windows), scores it and updates
its state. Detectors, each with the cause it reports as the incident kind:

- ``latency`` (per execution): Isolation Forests over the residual between the actual and the
  expected latency: the log ratio to the cost model's ``predicted_cost_ms`` when the log has one,
  else to the fingerprint's running median, net of the system's level (the larger of the median
  log ratio and the median milliseconds beyond their templates' expected of the last `CONTEXT`
  warm executions of any template of its class, reads or writes: a busy machine slows everything
  at once, and mostly by the same few milliseconds, x30 for a 0.5 ms lookup and x1.2 for a 50 ms
  aggregate; a busy WAL slows the writes together and not the reads). Every scored
  execution gets the vector `FEATURES` (the residual, its persistence over the fingerprint's last
  executions, the milliseconds beyond the expected, the residual over the fingerprint's spread,
  the system's level, rows and bytes against the fingerprint's median, the error flag, the hour
  of the simulated clock and the template's rarity); one forest per view of `IF_VIEWS` is fitted
  on the successful executions of warm fingerprints, the executions it judges (less those the
  training labels mark anomalous, when there are labels: see `AnomalyModel.fit`):

  * a spike: the residual and the milliseconds beyond the expected (a lock wait adds seconds,
    the machine's noise tens of milliseconds), and
  * a level shift: the median of the fingerprint's last nine residuals (a plan regression or a
    growing scan slows every execution, a hiccup one).

  A view's score counts as its rank among the training executions' (the views' raw scores are not
  comparable); an execution is flagged when it is slower than expected and either again, or by
  far (x20, or more milliseconds than all but 0.1% of the training executions), and some view
  ranks it at or above that view's threshold, or its residual is past the training range (+ log
  2). Thresholds: calibrated together on the training rows' labels when the workload simulator
  left some (best F1 of the whole detector, each view among the top 5% of its ranks among the
  ordinary training executions, `GRID_LOW`, or off; ties to the fewer flags), else each view
  flags `contamination / views` of the training.
  Why not one forest over every column: the columns that do not describe the latency (hour,
  rarity, rows, bytes, the error flag) dilute it, as a forest isolates on a random column at
  each split: on the simulated runs each one added to the residual moved the labelled slow
  executions down the ranking, and one forest over all of them ranked one to ten unlabelled
  executions at or above each of three lock waits of 0.6 to 1.4 s on a 1.8 ms lookup (x296 to
  x777), which the views rank above all of them.
  ``AnomalyModel(views=(FEATURES,))`` fits that forest, for comparison.
- ``rate_burst`` (workload): a fingerprint's arrivals in the trailing `rate_window_s` against an
  interval: the forecast's (``metadata.workload_forecasts``) when given, else a trailing seasonal
  baseline: the fingerprint's share of the traffic times the rest of the traffic in the window
  (the rest follows the day's shape; when the window is quieter than the training history at
  that hour of the day, the history's traffic stands in: a burst at night has no one else to
  scale by), upper bound the larger of a Poisson quantile and `rate_factor` times the mean, and
  at least `rate_min_count` arrivals, sustained for `burst_min_span_s` (what a lock or a stall
  held back arrives at once when it clears: a pile-up, not a burst anyone sent). A confirmed
  burst covers the fingerprint's run of arrivals at burst pace.
- ``error_burst`` (workload): failed executions in the trailing window beyond the interval of the
  training error rate.
- ``heavy_unseen`` (workload): a fingerprint run fewer than `unseen_calls` times before (never or
  hardly ever seen) whose execution is expensive (above the training latency quantile
  `unseen_quantile`).

`ZScoreDetector` is the baseline to beat: |latency - mean| / std per fingerprint. `IncidentTracker`
groups consecutive flags of one cause into incidents with a severity from score and impact.
`train_anomaly` is the registry trainer (``pgsage train anomaly``).
"""

from __future__ import annotations

import io
import math
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np

from .dataset import MODELLED_COMMANDS, Progress
from .registry import Entry, Registry

NAME = "anomaly"
KINDS = ("latency", "rate_burst", "error_burst", "heavy_unseen")
#: the workload simulator's label kinds -> the detector cause that should find them
CAUSE_OF_LABEL = {
    "lock_contention": "latency",
    "seq_scan": "latency",
    "drift": "latency",
    "rate_burst": "rate_burst",
    "error_burst": "error_burst",
    "heavy_unseen": "heavy_unseen",
}
LABEL_KINDS = tuple(CAUSE_OF_LABEL)
#: each scored execution's feature vector (`Detector._features`), computed from what came before it
FEATURES = (
    "residual",  # log(actual / expected) net of the system's level (`CONTEXT`)
    "residual_run2",  # min of this residual and the fingerprint's previous one
    "residual_run3",  # ... and the one before: a plan or a lock persists, a hiccup does not
    "residual_med9",  # median of the fingerprint's last `RUN` (this one included): a level shift
    "excess",  # log1p of the milliseconds beyond the expected: the machine's noise adds tens of
    # milliseconds to everything (a ratio of 20 on a 0.5 ms lookup), a lock wait adds seconds
    "residual_z",  # the residual over the fingerprint's spread
    "context",  # the system's level itself
    "rows_ratio",
    "bytes_ratio",
    "error",
    "hour_sin",
    "hour_cos",
    "rarity",
)
#: the forests' inputs, one Isolation Forest per view, each with its own threshold: a spike (how
#: far, in ratio and in milliseconds, beyond the expected) and a level shift (the fingerprint's
#: last executions). See the module doc for why not one forest over every column;
#: `AnomalyModel(views=(FEATURES,))` fits that one for comparison.
IF_VIEWS = (("residual", "excess"), ("residual_run3", "residual_med9"))
IF_FEATURES = tuple(dict.fromkeys(f for view in IF_VIEWS for f in view))
_RES, _RUN2, _EXCESS, _Z = (
    FEATURES.index(n) for n in ("residual", "residual_run2", "excess", "residual_z")
)
#: slower than expected by this many of the template's spreads (`residual_z`, the spread a MAD
#: of its log latency) to be judged at all, unless by far (`_slow`)
MIN_Z = 3.0
VERY_SLOW = math.log(20.0)  # a residual that needs no second slow execution to be believed
#: slower than expected means by 30% at least: in a level shift each execution is slow itself,
#: not just the fingerprint's recent ones (an ordinary run right after slow ones is no trouble)
MIN_SLOW = math.log(1.3)
#: the cold-start rule (no trained model yet) flags only executions this much slower than expected
COLD_SLOW = math.log(5.0)
#: slower than expected by this much three times in a row: kept out of the baseline (`_Fp.held`)
HOLD = math.log(2.0)
LATE_QUANTILE = 0.999
#: the calibration's loosest threshold per view: its top 5% of ordinary training executions
#: (and only those slower than expected again, or by far: `_slow`, about a sixth of them)
GRID_LOW = 0.95
MAX_FINGERPRINTS = 20_000  # per-fingerprint baselines kept by a detector
CONTEXT = 15  # recent executions (all templates of a class) whose median residual is the level
WRITE_COMMANDS = frozenset(("INSERT", "UPDATE", "DELETE", "MERGE", "COPY"))
_MODELLED = frozenset(MODELLED_COMMANDS)
#: a fingerprint's last executions whose residuals tell a lasting slowdown from a hiccup: on two
#: shared cores a lookup is three times slower in three of five executions in a row about once in
#: a hundred; a plan regression or a drift slows every execution for hours
RUN = 9
SEVERITIES = ("low", "medium", "high")
FORECAST_WINDOW_S = 300.0  # the forecaster's window (metadata.workload_forecasts)
#: the simulator's own bookkeeping connections: not simulated users, not scored
SIMULATOR_MACHINERY = ("pgsage-workload-control", "pgsage-workload-anomaly")
#: ... and the planner settings its runner switches around a seq_scan anomaly's statement on
#: the user's own connection (bench/workload/runner.py `_planner_sql`): the injection's means,
#: not user work (two per regressed execution: a rate "burst" of them is the anomaly's echo)
SIMULATOR_SETTINGS = "SELECT set_config(%"  # (normalized text: the names are parameters)


class Execution(NamedTuple):
    """One logged execution, as the detectors read it."""

    ts: float  # epoch seconds of the start (the proxy's clock, simulated under the bench)
    fingerprint: str
    command: str
    duration_ms: float
    rows: int | None
    error: bool
    bytes: int | None
    predicted_ms: float | None = None
    is_catalog: bool = False
    label: str | None = None
    app: str | None = None
    #: the workload simulator's own statement, not a simulated user's (`simulated_users`)
    machinery: bool = False


class Flag(NamedTuple):
    """One anomalous execution (or one covered by a workload-level anomaly)."""

    seq: int  # position in the detector's stream
    ts: float
    kind: str
    fingerprint: str
    score: float  # 0..1
    excess_ms: float  # time beyond the expected (latency kinds); 0 otherwise
    error: bool
    label: str | None


def scored(ex: Execution) -> bool:
    """Statements the detectors look at: client work, not catalog reads or BEGIN/SET."""
    return not ex.is_catalog and (ex.command in MODELLED_COMMANDS or ex.error)


# ------------------------------------------------------------------------ per-fingerprint state


class _Fp:
    """A fingerprint's running baseline: recent log latency, rows and bytes."""

    __slots__ = ("bytes", "bytes_med", "calls", "errors", "held", "lat", "med", "ordered",
                 "recent", "rows", "rows_med", "spread", "stale")  # fmt: skip

    def __init__(self, window: int) -> None:
        self.calls = 0
        self.errors = 0
        self.lat: deque[float] = deque(maxlen=window)
        #: `lat`'s values in order, kept in step by `add` (a bisect and a move per execution)
        #: while they are; out of step (filled directly, or a NaN in the window) when their
        #: lengths differ, and `refresh` sorts again
        self.ordered: list[float] = []
        self.rows: deque[float] = deque(maxlen=window)
        self.bytes: deque[float] = deque(maxlen=window)
        self.med = math.nan
        self.rows_med = 0.0
        self.bytes_med = 0.0
        self.spread = 0.5
        #: the net residuals of the last successful executions, oldest first
        self.recent: deque[float] = deque(maxlen=RUN - 1)
        self.stale = 0
        #: executions of the current slowdown kept out of the baseline (`HOLD`); at the cap
        #: (`DetectorConfig.hold`) the slowdown enters, until an execution is not slow again
        self.held = 0

    def refresh(self) -> None:
        lat = self.lat
        if not lat:
            return  # only failures so far
        ordered = self.ordered
        if len(ordered) != len(lat):  # out of step (filled directly, or a NaN came)
            ordered = sorted(lat)  # (in Python: a fifth of NumPy's median call on 64 values)
            if all(x == x for x in ordered):  # no NaN: the order is kept from here on
                self.ordered = ordered
        med = self.med = _sorted_median(ordered)
        if ordered is self.ordered:
            # the median deviation by walking out from the median (`_deviation_median`), where
            # a sort of the deviations at every refresh was a tenth of the detector's time
            mad = _deviation_median(ordered, med) * 1.4826
        else:  # a NaN in the window: no order to walk, the deviations sorted as they were
            mad = _small_median([abs(x - med) for x in lat]) * 1.4826
        self.spread = max(mad, 0.15)
        self.rows_med = _steady_median(self.rows)
        self.bytes_med = _steady_median(self.bytes)
        self.stale = 0

    def add(self, log_ms: float, log_rows: float, log_bytes: float) -> None:
        lat = self.lat
        ordered = self.ordered
        if len(ordered) == len(lat) and log_ms == log_ms:  # in step, and no NaN to order
            if len(lat) == lat.maxlen:  # the oldest leaves the window
                del ordered[bisect_left(ordered, lat[0])]
            insort(ordered, log_ms)
        elif ordered:
            ordered.clear()  # out of step: `refresh` sorts
        lat.append(log_ms)
        self.rows.append(log_rows)
        self.bytes.append(log_bytes)
        self.stale += 1
        # the median is refreshed at each early execution, then after an eighth of the window
        # is new (at least 4): a median barely moves in that (and NumPy's median costs
        # microseconds a call; every 4th of a fast template's executions made it the worker's
        # largest cost)
        n = len(lat)
        if n <= 16 or self.stale >= max(4, n // 8):
            self.refresh()


@dataclass
class Interval:
    """An externally forecast arrival interval of a fingerprint over a span of time."""

    start: float
    end: float
    upper: float  # arrivals per `rate_window_s` above which the count is anomalous


# ------------------------------------------------------------------------------------ detector


@dataclass
class DetectorConfig:
    history: int = 64
    rate_window_s: float = 600.0
    rate_alpha: float = 1e-3
    rate_factor: float = 3.0
    rate_min_count: int = 12
    #: a burst is sustained: its run of arrivals at burst pace spans at least this long (the
    #: statements a lock or a stall held back reach the server all at once when it clears, a
    #: pile-up of a few seconds that no one sent in a burst)
    burst_min_span_s: float = 120.0
    error_window_s: float = 600.0
    error_min_count: int = 3
    unseen_calls: int = 5
    unseen_quantile: float = 0.95
    min_calls: int = 5  # a fingerprint's latency is judged after this many executions
    #: a lasting slowdown stays out of the baseline for up to this many executions in a row
    #: (0: every execution enters it)
    hold: int = 64
    #: executions seen before "never seen" and arrival rates mean anything (cold start)
    warmup: int = 200


def _newer(items: deque[Any], after: int) -> list[Any]:
    """The items (execution index at [1], ascending) after index `after`, oldest first: once a
    window's items were flagged together, only later ones can be new, so a long burst costs
    constant work per arrival instead of a walk over the whole window."""
    out = []
    for item in reversed(items):
        if item[1] <= after:
            break
        out.append(item)
    out.reverse()
    return out


#: Poisson quantiles computed so far, by (mean's step, alpha): SciPy's ppf costs tens of
#: microseconds a call, and the burst rules ask once per logged execution
_POISSON: dict[tuple[int, float], float] = {}
#: steps of the mean per unit of its logarithm (1024: steps of 0.1%)
_POISSON_STEPS = 1024


def _poisson_upper(mu: float, alpha: float) -> float:
    """The (1 - alpha) quantile of a Poisson count of mean `mu`, with the mean rounded up to
    the next 0.1% step (a bound at least as high as the exact one: never more alarms)."""
    step = math.ceil(math.log(max(mu, 1e-6)) * _POISSON_STEPS)
    key = (step, alpha)
    hit = _POISSON.get(key)
    if hit is None:
        from scipy.stats import poisson

        if len(_POISSON) >= 100_000:
            _POISSON.clear()
        hit = _POISSON[key] = float(poisson.ppf(1.0 - alpha, math.exp(step / _POISSON_STEPS)))
    return hit


def _burst_upper(mu: float, alpha: float, factor: float) -> float:
    """max(`_poisson_upper`(mu, alpha), factor * mu), the burst rule's bound, without the
    quantile where it cannot be the larger: by the Chernoff bound P(X >= k) <= e^-m (e m / k)^k
    (X Poisson of mean m, the rounded-up mean `_poisson_upper` uses; k > m), once that is at
    most alpha for k = floor(factor * mu), the quantile is below k. Same result, and a busy
    template's growing window no longer asks SciPy for a new quantile at every 0.1% step."""
    k = math.floor(factor * mu)
    m = math.exp(math.ceil(math.log(max(mu, 1e-6)) * _POISSON_STEPS) / _POISSON_STEPS)
    if k > m and -m + k * (1.0 + math.log(m / k)) <= math.log(alpha):
        return factor * mu
    return max(_poisson_upper(mu, alpha), factor * mu)


class _Count:
    """Arrivals in a trailing window, counted per second: memory bounded by the window's
    seconds however fast the arrivals come (a fingerprint at 10,000/s over 600 s would
    otherwise keep six million entries)."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets: deque[list[float]] = deque()  # [second, count], oldest first
        self.total = 0

    def add(self, now: float, window: float) -> int:
        second = float(int(now))
        b = self.buckets
        if b and b[-1][0] == second:
            b[-1][1] += 1
        else:
            b.append([second, 1])
        self.total += 1
        while b and b[0][0] < now - window:
            self.total -= int(b.popleft()[1])
        return self.total


class _Run:
    """A fingerprint's latest arrivals at burst pace: when the run began, the last arrival,
    the pace it was judged by, and its members not flagged yet (bounded); how many arrived in
    it and how long the fingerprint had been silent before it."""

    __slots__ = ("count", "last", "members", "pace", "silence", "start")

    def __init__(self, now: float) -> None:
        self.start = self.last = now
        self.pace = math.inf  # unknown until the fingerprint's expectation is
        self.members: deque[tuple[float, int, str | None]] = deque(maxlen=RUN_MEMBERS)
        self.count = 0
        self.silence = 0.0


#: arrivals of one burst remembered to be flagged together (a longer run flags its latest)
RUN_MEMBERS = 10_000


class Detector:
    """The stateful scorer: feed executions in time order, get flags (see the module doc)."""

    def __init__(self, model: AnomalyModel | None, config: DetectorConfig | None = None) -> None:
        self.model = model
        self.config = c = config or (model.config if model is not None else DetectorConfig())
        self.fps: dict[str, _Fp] = {}
        self.shares: dict[str, float] = dict(model.shares_) if model is not None else {}
        self.total_seen = model.total_ if model is not None else 0
        self.error_rate = model.error_rate_ if model is not None else 0.0
        self.expensive_ms = model.expensive_ms_ if model is not None else 50.0
        self.global_log_ms = model.global_log_ms_ if model is not None else 0.0
        #: scored arrivals per second by hour of the day (training), [] without a model
        self.hourly: list[float] = list(model.hourly_) if model is not None else []
        self.intervals: dict[str, list[Interval]] = {}  # per cluster, from the forecaster
        self.cluster_of: dict[str, str] = {}
        self._iv_starts: dict[str, list[float]] = {}
        self._by_cluster: dict[str, deque[tuple[float, int, str | None, str]]] = {}
        self.index = 0
        # trailing windows: all arrivals; per fingerprint (ts, index, label); errors
        self._all = _Count()
        self._by_fp: dict[str, tuple[_Count, _Run]] = {}
        self._errors: deque[tuple[float, int, str, str | None]] = deque()
        self._flagged: set[int] = set()
        self._recent_flagged: deque[int] = deque(maxlen=100_000)
        #: executions up to these indexes were already judged by a burst's flagging pass
        self._errors_done = -1
        self._cluster_done: dict[str, int] = {}
        # the system's level: recent warm executions' log ratios and milliseconds beyond their
        # templates' expected, and the medians of both
        # templates', per class of statement (`_class`: writes share the WAL and commit path,
        # and slow down together when it is busy, which reads do not notice)
        self._context: dict[str, _Rolling] = {}
        self._context_ms: dict[str, _Rolling] = {}
        self._context_level: dict[str, float] = {}
        self._context_level_ms: dict[str, float] = {}
        if model is not None:
            for fp, (lat, rows, nbytes) in model.baselines_.items():
                st = self.fps[fp] = _Fp(c.history)
                st.lat.extend(lat)
                st.rows.extend(rows)
                st.bytes.extend(nbytes)
                st.calls = model.calls_.get(fp, len(lat))
                st.refresh()

    # ---------------------------------------------------------------- features

    def _expect(
        self, ex: Execution, st: _Fp | None
    ) -> tuple[float, float, float, float, bool, float, float]:
        """What the state updates need of one execution (before updating): (the net residual,
        the expected ms, the raw log ratio and ms beyond the template's expected, known, log
        ms, the system's level). The whole `FEATURES` vector (`_complete`) is needed only for
        an execution some detector could flag (`process`).

        The residual is net of the system's level, the larger of two readings of the last
        `CONTEXT` executions of any template of the same class (reads, writes: `_class`; writes
        wait for the WAL and commit together): their median log ratio (everything runs x times
        slower) and their median milliseconds beyond the expected (everything waits y ms more:
        a busy CPU or a stalled event loop adds the same to a 0.5 ms lookup and a 50 ms
        aggregate, x100 to one and x3 to the other). When everything is slow at once, that is
        the machine's trouble, not one statement's.
        """
        log_ms = math.log(max(ex.duration_ms, 1e-3))
        known = st is not None and st.calls >= self.config.min_calls and len(st.lat) > 0
        if ex.predicted_ms is not None and ex.predicted_ms > 0:
            expected = math.log(ex.predicted_ms)
        elif known:
            assert st is not None
            expected = st.med
        else:
            expected = self.global_log_ms
        cls = _class(ex.command)
        ctx = self._context_level.get(cls, 0.0)
        ctx_ms = self._context_level_ms.get(cls, 0.0)
        raw = 0.0 if ex.error else log_ms - expected
        raw_ms = 0.0 if ex.error else ex.duration_ms - math.exp(expected)
        if known:  # the template's expected, and then the system's level on top of it
            expected_ms = max(math.exp(expected + ctx), math.exp(expected) + ctx_ms)
        else:
            expected_ms = math.exp(expected)
        residual = raw if ex.error else log_ms - math.log(expected_ms)
        return residual, expected_ms, raw, raw_ms, known, log_ms, ctx

    def _complete(
        self,
        ex: Execution,
        st: _Fp | None,
        expect: tuple[float, float, float, float, bool, float, float],
    ) -> tuple[list[float], float, float, float, float]:
        residual, expected_ms, raw, raw_ms, known, _, ctx = expect
        spread = st.spread if known and st is not None else 1.0
        log_rows = math.log1p(max(ex.rows or 0, 0))
        log_bytes = math.log1p(max(ex.bytes or 0, 0))
        rows_ratio = log_rows - st.rows_med if known and st is not None else 0.0
        bytes_ratio = log_bytes - st.bytes_med if known and st is not None else 0.0
        hour = (ex.ts % 86400.0) / 3600.0
        share = self.shares.get(ex.fingerprint)
        if share is None and st is not None and self.total_seen:
            share = st.calls / self.total_seen
        rarity = min(-math.log10(max(share or 0.0, 1e-7)), 7.0)
        excess = 0.0 if ex.error else math.log1p(max(ex.duration_ms - expected_ms, 0.0))
        recent = list(st.recent) if st is not None else []
        # (a fingerprint with fewer executions behind it counts the missing ones as ordinary)
        run = [0.0] * (RUN - 1 - len(recent)) + recent + [residual]
        feats = [
            residual,
            min(run[-2:]),
            min(run[-3:]),
            sorted(run)[RUN // 2],
            excess,
            residual / spread,
            ctx,
            rows_ratio,
            bytes_ratio,
            1.0 if ex.error else 0.0,
            math.sin(hour / 24 * 2 * math.pi),
            math.cos(hour / 24 * 2 * math.pi),
            rarity,
        ]
        return feats, residual, expected_ms, raw, raw_ms

    # ---------------------------------------------------------------- processing

    def process(
        self,
        executions: Iterable[Execution],
        features_out: list[list[float]] | None = None,
        held_out: list[bool] | None = None,
    ) -> list[Flag]:
        """Score executions (in time order), update the state; the flags raised by them.
        `features_out` gets each scored execution's `FEATURES`, `held_out` (beside it) whether
        it was kept out of its template's baseline as part of a lasting slowdown."""
        flags: list[Flag] = []
        model = self.model
        batch: list[tuple[int, Execution, list[float], float, float, bool]] = []
        min_calls = self.config.min_calls
        modelled = _MODELLED
        # what could be flagged, and so needs its feature vector: slower than expected by
        # MIN_SLOW for the forests, by COLD_SLOW for the cold-start rule (the rest of the
        # vector of an execution in between was computed for nothing: with a cost model's
        # predictions, whose classes scatter the residuals, that was most executions)
        judged_above = COLD_SLOW if model is None else MIN_SLOW
        for ex in executions:
            i = self.index
            self.index += 1
            if ex.is_catalog or not (ex.command in modelled or ex.error):  # `scored`, inline
                continue
            st = self.fps.get(ex.fingerprint)
            expect = self._expect(ex, st)
            residual, expected_ms, raw, raw_ms, _, log_ms, _ = expect
            warm = st is not None and st.calls > min_calls
            if held_out is not None:
                held_out.append(False)  # (set below if it is held)
            if features_out is not None:
                feats = self._complete(ex, st, expect)[0]
                features_out.append(feats)
                batch.append((i, ex, feats, residual, expected_ms, warm))
            elif warm and not ex.error and residual > judged_above:
                # only an execution slower than expected can be flagged (`_slow`, and the
                # cold-start rule's x5): the rest skip the vector (most of the worker's time)
                feats = self._complete(ex, st, expect)[0]
                batch.append((i, ex, feats, residual, expected_ms, warm))
            self._workload(i, ex, st, flags)
            if st is None:
                if len(self.fps) >= MAX_FINGERPRINTS:
                    self._forget_rare()
                st = self.fps[ex.fingerprint] = _Fp(self.config.history)
            st.calls += 1
            self.total_seen += 1
            if ex.error:
                st.errors += 1
                continue
            recent = st.recent
            if (
                warm
                and residual > HOLD
                and len(recent) >= 2
                and recent[-1] > HOLD
                and recent[-2] > HOLD
                and st.held < self.config.hold
            ):
                # the third execution in a row this much slower than expected: a plan gone bad
                # or data drifting, not noise. Its latency stays out of the baseline, or the
                # running median would follow it and the slowdown would soon look ordinary
                # (after `hold` of them it is let in: slower for good stops being news)
                st.held += 1
                if held_out is not None:
                    held_out[-1] = True
            else:
                if residual <= HOLD:
                    st.held = 0  # over (or the new normal): the next slowdown may be held
                st.add(log_ms, math.log1p(max(ex.rows or 0, 0)), math.log1p(max(ex.bytes or 0, 0)))
            recent.append(residual)
            if warm:
                cls = "write" if ex.command in WRITE_COMMANDS else "read"  # `_class`, inline
                ratios = self._context.get(cls)
                if ratios is None:
                    ratios = self._context[cls] = _Rolling(CONTEXT)
                    self._context_ms[cls] = _Rolling(CONTEXT)
                self._context_level[cls] = ratios.add(raw)
                delay = self._context_ms[cls].add(raw_ms)
                self._context_level_ms[cls] = delay if delay > 0.0 else 0.0
        if model is not None and model.forest_ is not None and batch:
            # only what could be flagged is scored (the forests are the costly part): a young
            # fingerprint is the unseen rule's, a failure the error rule's, and faster than
            # expected (or one hiccup) is no trouble
            late = model.late_
            judged = [b for b in batch if b[5] and not b[1].error and _slow(b[2], late)]
            if judged:
                views = model.view_scores(np.asarray([b[2] for b in judged], float))
                hit = model.over_threshold(views)
                top = views.max(axis=0)  # (the flag's score: the forests' own, for severity)
            for k, (i, ex, f, _residual, expected_ms, _warm) in enumerate(judged):
                # beyond the residuals the forest was fitted on, its path lengths stop growing:
                # a residual past the training range (+ log 2) is anomalous whatever the score
                beyond = f[_RES] > model.residual_max_ + math.log(2.0)
                if hit[k] or beyond:
                    flags.append(self._flag(i, ex, "latency", float(top[k]),
                                            max(ex.duration_ms - expected_ms, 0.0)))  # fmt: skip
        elif model is None:
            # cold start (no trained model yet): a plain residual rule on warm fingerprints
            settled = self.total_seen >= self.config.warmup
            for i, ex, feats, residual, expected_ms, warm in batch:
                st = self.fps.get(ex.fingerprint)
                if not (settled and warm and st is not None and st.calls > 4 * min_calls):
                    continue  # fresh tables and plans make the first executions noisy
                if not ex.error and residual > COLD_SLOW and feats[_Z] > 4.0:
                    score = min(0.5 + residual / 10.0, 1.0)
                    flags.append(self._flag(i, ex, "latency", score,
                                            max(ex.duration_ms - expected_ms, 0.0)))  # fmt: skip
        flags.sort(key=lambda f: (f.ts, f.seq))
        return flags

    def _forget_rare(self) -> None:
        """Bound the state: drop the fingerprints run least (unparsed texts can be endless)."""
        keep = sorted(self.fps.items(), key=lambda kv: kv[1].calls, reverse=True)
        self.fps = dict(keep[: MAX_FINGERPRINTS // 2])
        self._by_fp = {fp: q for fp, q in self._by_fp.items() if fp in self.fps}

    def _flag(self, i: int, ex: Execution, kind: str, score: float, excess: float) -> Flag:
        self._flagged.add(i)
        self._recent_flagged.append(i)
        if len(self._flagged) > 200_000:
            self._flagged = set(self._recent_flagged)
        return Flag(i, ex.ts, kind, ex.fingerprint, score, excess, ex.error, ex.label)

    def _workload(self, i: int, ex: Execution, st: _Fp | None, out: list[Flag]) -> None:
        """The workload-level rules on one arrival; their flags are appended to `out`."""
        c = self.config
        now = ex.ts
        # ---- arrivals of this fingerprint against its interval (constant work per arrival)
        total = self._all.add(now, c.rate_window_s)
        state = self._by_fp.get(ex.fingerprint)
        if state is None:
            state = self._by_fp[ex.fingerprint] = (_Count(), _Run(now))
        counter, run = state
        count = counter.add(now, c.rate_window_s)
        gap = now - run.last
        if gap >= run.pace or (run.members and run.members[0][0] < now - c.rate_window_s):
            run.start = now  # an arrival at the ordinary pace: a new run begins with it
            run.members.clear()
            run.count, run.silence = 0, gap
        run.last = now
        run.count += 1
        run.members.append((now, i, ex.label))
        warm = self.total_seen >= c.warmup
        cluster = self.cluster_of.get(ex.fingerprint)
        if cluster is not None and cluster in self.intervals and not ex.error:
            self._cluster_rate(i, ex, cluster, out)
        elif warm and count >= c.rate_min_count and not ex.error:  # (failures: the error rule)
            mu = self._rate_mu(ex.fingerprint, now, total - count)
            upper = None if mu is None else _burst_upper(mu, c.rate_alpha, c.rate_factor)
            if upper is not None:
                run.pace = c.rate_window_s / max(upper, 1.0)
            # ... and this arrival came at burst pace (not an ordinary one after a burst)
            paced = upper is not None and gap < run.pace
            # the burst: the run of arrivals at burst pace up to this one (older ones came at
            # the ordinary pace and were expected), once sustained (not a mere pile-up)
            if (
                upper is not None
                and count > upper
                and paced
                and (now - run.start >= c.burst_min_span_s)
                and not self._repaying(run, mu, now)
            ):
                score = min(0.6 + 0.1 * math.log2(count / max(upper, 1.0)), 1.0)
                for ts, j, label in run.members:
                    if j not in self._flagged:
                        self._flagged.add(j)
                        self._recent_flagged.append(j)
                        out.append(Flag(j, ts, "rate_burst", ex.fingerprint, score, 0.0,
                                        False, label))  # fmt: skip
                run.members.clear()  # flagged; the run goes on
        # ---- failed executions against the error rate
        if ex.error:
            errs = self._errors
            errs.append((now, i, ex.fingerprint, ex.label))
            while errs and errs[0][0] < now - c.error_window_s:
                errs.popleft()
            expected = self.error_rate * total
            upper = max(_poisson_upper(expected, c.rate_alpha), c.error_min_count - 1)
            if len(errs) > upper:
                score = min(0.6 + 0.1 * math.log2(len(errs) / max(upper, 1.0)), 1.0)
                newer, self._errors_done = _newer(errs, self._errors_done), i
                for ts, j, fp, label in newer:
                    if j not in self._flagged:
                        self._flagged.add(j)
                        self._recent_flagged.append(j)
                        out.append(Flag(j, ts, "error_burst", fp, score, 0.0, True, label))
        # ---- never (or hardly ever) seen, and expensive
        calls = st.calls if st is not None else 0
        if warm and not ex.error and calls < c.unseen_calls and ex.duration_ms >= self.expensive_ms:
            excess = ex.duration_ms - math.exp(self.global_log_ms)
            score = min(0.6 + 0.1 * math.log2(ex.duration_ms / self.expensive_ms), 1.0)
            out.append(self._flag(i, ex, "heavy_unseen", score, max(excess, 0.0)))

    def _cluster_rate(self, i: int, ex: Execution, cluster: str, out: list[Flag]) -> None:
        """The forecaster's path: the cluster's arrivals in the forecast window vs its upper."""
        ivs = self.intervals[cluster]
        k = bisect_right(self._iv_starts[cluster], ex.ts) - 1
        if k < 0 or not ivs[k].start <= ex.ts < ivs[k].end:
            return
        iv = ivs[k]
        q = self._by_cluster.setdefault(cluster, deque())
        q.append((ex.ts, i, ex.label, ex.fingerprint))
        while q and q[0][0] < iv.start:
            q.popleft()
        if len(q) <= max(iv.upper, self.config.rate_min_count - 1):
            return
        score = min(0.6 + 0.1 * math.log2(len(q) / max(iv.upper, 1.0)), 1.0)
        newer = _newer(q, self._cluster_done.get(cluster, -1))
        self._cluster_done[cluster] = i
        for ts, j, label, fp in newer:
            if j not in self._flagged:
                self._flagged.add(j)
                self._recent_flagged.append(j)
                out.append(Flag(j, ts, "rate_burst", fp, score, 0.0, False, label))

    def use_forecasts(self, intervals: dict[str, list[Interval]], cluster_of: dict[str, str]
                      ) -> None:  # fmt: skip
        """Judge arrivals of clustered templates against forecast intervals (per cluster)."""
        self.intervals = {k: sorted(v, key=lambda iv: iv.start) for k, v in intervals.items()}
        self._iv_starts = {k: [iv.start for iv in v] for k, v in self.intervals.items()}
        self.cluster_of = cluster_of

    def _repaying(self, run: _Run, mu: float | None, now: float) -> bool:
        """The run follows a silence too long for the fingerprint's rate to be chance (its
        arrivals held back: a lock, a stalled client) and brings no more arrivals than the
        silence and the run together should have: a release repaying the deficit, not a
        burst. (A lock on a table its lookups read empties the template for an hour, then the
        queued users' statements arrive within minutes.)"""
        c = self.config
        if mu is None or mu <= 0.0:
            return False
        rate = mu / c.rate_window_s
        if rate * run.silence < -math.log(c.rate_alpha):  # P(silence) >= alpha: ordinary
            return False
        owed = rate * (now - run.start + run.silence)
        return run.count <= _poisson_upper(owed, c.rate_alpha)

    def _rate_mu(self, fp: str, now: float, others: int) -> float | None:
        """Expected arrivals of `fp` in the trailing window (the burst rule's bound is a Poisson
        quantile of it, at least `rate_factor` times it): its share of the traffic times the
        rest of the traffic in the window, or, when the window is quieter than the training
        history's at this hour of the day (a burst at night has no one else to scale by), the
        rest of the traffic that history expects."""
        c = self.config
        usual = self.hourly[int(now % 86400.0 // 3600.0)] * c.rate_window_s if self.hourly else 0.0
        if others < 2 and usual < 2:
            return None  # no other traffic to scale an expectation by
        share = self.shares.get(fp)
        if share is None:
            st = self.fps.get(fp)
            if st is None or self.total_seen < 100:
                return None  # nothing to compare with yet
            share = max(st.calls / self.total_seen, 1.0 / self.total_seen)
        share = min(share, 0.5)
        return share * max(others, usual * (1.0 - share)) / (1.0 - share)


# ------------------------------------------------------------------------------ the estimator


class AnomalyModel:
    """Isolation Forest + workload rules, scikit-learn style (`fit` returns self)."""

    def __init__(
        self,
        n_estimators: int = 100,  # per view
        max_samples: int | str = 256,
        contamination: float = 0.005,
        random_state: int = 0,
        config: DetectorConfig | None = None,
        views: Sequence[Sequence[str]] = IF_VIEWS,
    ) -> None:
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.contamination = contamination
        self.random_state = random_state
        self.config = config or DetectorConfig()
        unknown = [f for view in views for f in view if f not in FEATURES]
        if unknown or not views or not all(views):
            raise ValueError(f"unknown forest features {unknown} (choose from {FEATURES})")
        self.views = tuple(tuple(view) for view in views)

    def fit(
        self, executions: Sequence[Execution], anomalous: np.ndarray | None = None
    ) -> AnomalyModel:
        """Replay the history (leak-free features), fit the forests, keep the final baselines.

        The forests are fitted on the executions they will judge: successful ones of warm
        fingerprints (failures are the error rule's, young templates the unseen rule's), less
        those known to be anomalous (`anomalous`, a mask over `executions`: the training
        labels, when the workload simulator left some). A view's surprise is then a rank among
        ordinary executions: when a simulated week's plan regressions and drifts make up a few
        percent of the judged rows, ranks among all of them put those anomalies in the top few
        percent, where no threshold can flag them without flagging noise that ranks as high.
        """
        from sklearn.ensemble import IsolationForest

        keep = [i for i, e in enumerate(executions) if scored(e)]
        rows = [executions[i] for i in keep]
        if not rows:
            raise ValueError("no scorable executions to fit on")
        known: np.ndarray = np.zeros(len(rows), bool)
        if anomalous is not None:
            known = np.asarray(anomalous, bool)[keep]
        ok_ms = np.array([e.duration_ms for e in rows if not e.error], float)
        logs = np.log(np.maximum(ok_ms, 1e-3))
        self.global_log_ms_ = float(np.median(logs)) if len(ok_ms) else 0.0
        self.expensive_ms_ = (
            float(np.quantile(ok_ms, self.config.unseen_quantile)) if len(ok_ms) else 50.0
        )
        counts: dict[str, int] = {}
        for e in rows:
            counts[e.fingerprint] = counts.get(e.fingerprint, 0) + 1
        self.total_ = len(rows)
        self.shares_ = {fp: n / len(rows) for fp, n in counts.items()}
        self.error_rate_ = sum(e.error for e in rows) / len(rows)
        self.hourly_ = _hourly_rate(rows)
        self.forest_ = None
        self.threshold_: list[float] = [math.inf] * len(self.views)
        self.baselines_: dict[str, tuple[list[float], list[float], list[float]]] = {}
        self.calls_: dict[str, int] = {}
        self.columns_ = [[FEATURES.index(f) for f in view] for view in self.views]
        replay = self._replay()
        feats: list[list[float]] = []
        held: list[bool] = []
        replay.process(rows, feats, held)
        X = np.asarray(feats, float)
        judged = _warm_mask(rows, self.config.min_calls) & ~np.array([e.error for e in rows])
        # the reference of ordinary leaves out the known anomalies; without labels, the lasting
        # slowdowns the detector held out of their template's baseline stand in for them (a
        # plan regression in the history would otherwise teach the forests that running x10
        # slower for hours is ordinary). With labels, the labels alone decide (on the
        # simulator's runs, leaving the held executions in the reference then scored better)
        if anomalous is None:
            known |= np.asarray(held, bool)
        if (judged & ~known).any():
            judged &= ~known
        if not judged.any():
            judged = np.ones(len(rows), bool)  # a short history: fit on what there is
        self.residual_max_ = float(X[judged, _RES].max())
        #: a delay (log1p ms beyond the expected) that needs no second slow execution to count:
        #: beyond what all but one in a thousand of the judged training executions saw
        self.late_ = float(np.quantile(X[judged, _EXCESS], LATE_QUANTILE))
        Xj = X[judged]
        self.forests_ = [
            IsolationForest(
                n_estimators=self.n_estimators,
                max_samples=self.max_samples if isinstance(self.max_samples, str)
                else min(int(self.max_samples), len(Xj)),
                random_state=self.random_state,
            ).fit(Xj[:, cols])
            for cols in self.columns_
        ]  # fmt: skip
        self.forest_ = self.forests_[0]
        #: each view's scores of the judged training rows, sorted (the reference of `surprise`)
        self.view_ref_ = [np.sort(v) for v in self.view_scores(Xj)]
        self.train_scores_ = self.surprise(self.view_scores(Xj))
        # without labels: each view flags its `contamination / views` most surprising share
        self.threshold_ = [
            float(np.quantile(v, 1.0 - self.contamination / len(self.views)))
            for v in self.train_scores_
        ]
        self.baselines_ = {
            fp: (list(st.lat), list(st.rows), list(st.bytes)) for fp, st in replay.fps.items()
        }
        self.calls_ = {fp: st.calls for fp, st in replay.fps.items()}
        self.feature_names_ = list(dict.fromkeys(f for view in self.views for f in view))
        return self

    def _replay(self) -> Detector:
        """A detector with no fitted state but this model's training statistics (leak-free
        features of the training rows, and the rules as they would have fired on them)."""
        det = Detector(None, self.config)
        det.shares, det.expensive_ms = dict(self.shares_), self.expensive_ms_
        det.global_log_ms = self.global_log_ms_
        det.hourly = self.hourly_
        return det

    def view_scores(self, X: np.ndarray) -> np.ndarray:
        """Each view's forest score of `FEATURES` rows (views x rows): the paper's s(x, n) in
        (0, 1], ~0.5 ordinary, near 1 isolated."""
        assert self.forest_ is not None
        X = np.asarray(X, float)
        pairs = zip(self.forests_, self.columns_, strict=True)
        return np.array([-forest.score_samples(X[:, cols]) for forest, cols in pairs])

    def surprise(self, view_scores: np.ndarray) -> np.ndarray:
        """Per view (views x rows), one minus the share of the judged training executions that
        the view scores at least as high: 0.995 is rarer than one in two hundred. The views' raw
        scores are not comparable (a view of more features tops out lower: past the training
        range a forest's path lengths stop shrinking), their ranks are."""
        out = []
        for ref, s in zip(self.view_ref_, view_scores, strict=True):
            n = len(ref)
            out.append(1.0 - (n - np.searchsorted(ref, s, side="left") + 1) / (n + 1))
        return np.asarray(out, float)

    def over_threshold(self, view_scores: np.ndarray) -> np.ndarray:
        """Rows some view finds at least as surprising as its threshold (`threshold_`)."""
        s = self.surprise(view_scores)
        return np.asarray(np.any(s >= np.asarray(self.threshold_, float)[:, None], axis=0), bool)

    def score(self, X: np.ndarray) -> np.ndarray:
        """Anomaly scores of `FEATURES` rows in (0, 1]: the highest of the views' s(x, n)."""
        return np.asarray(self.view_scores(X).max(axis=0), float)

    def detector(self) -> Detector:
        return Detector(self, self.config)

    def flags(self, executions: Sequence[Execution]) -> list[Flag]:
        """Flags over a stream, starting from the fitted state (the model is not changed)."""
        return self.detector().process(executions)

    def calibrate(
        self, executions: Sequence[Execution], positive: np.ndarray, scope: np.ndarray
    ) -> dict[str, Any]:
        """Pick each view's threshold so that the whole detector's F1 on labelled rows is best
        (rows the model was fitted on: the test rows stay unseen). Each view's candidates are
        the top 5% (`GRID_LOW`) of the ordinary judged rows' surprise (a handful of labelled slow
        runs must not teach it to flag a tenth of the traffic; `_slow` gates them further) and
        "off": a view that costs F1 on the training labels
        at every level is not used, but one the training labels say nothing about (no labelled
        anomaly of its kind, no false alarm either) stays on at its strictest level. Other ties
        go to the higher thresholds (the fewer flags)."""
        from itertools import product

        det = self._replay()
        feats: list[list[float]] = []
        workload = det.process(executions, feats)
        rule: np.ndarray = np.zeros(len(executions), bool)
        for f in workload:
            rule[f.seq] = f.kind != "latency"  # (the cold rule's flags are not the forest's)
        idx = np.array([i for i, e in enumerate(executions) if scored(e)], int)
        slow: np.ndarray = np.zeros(len(executions), bool)
        slow[idx] = [_slow(f, self.late_) for f in feats]
        ok = np.array([not e.error for e in executions], bool)
        judged = _warm_mask(executions, self.config.min_calls) & ok
        beyond: np.ndarray = np.zeros(len(executions), bool)
        beyond[idx] = [f[_RES] > self.residual_max_ + math.log(2.0) for f in feats]
        surprise = np.full((len(self.views), len(executions)), -np.inf)
        if len(idx):
            surprise[:, idx] = self.surprise(self.view_scores(np.asarray(feats, float)))
        candidate = slow & judged
        points = 24 if len(self.views) <= 2 else 8
        # (ranks among the ordinary judged rows: the labelled ones would crowd the top ranks)
        ordinary = judged & ~positive if (judged & ~positive).any() else judged
        grids = [
            [*np.unique(np.quantile(s[ordinary], np.linspace(GRID_LOW, 0.9995, points))),
             math.inf] if ordinary.any() else [math.inf]
            for s in surprise
        ]  # fmt: skip
        hits = [[s >= t for t in grid] for s, grid in zip(surprise, grids, strict=True)]
        best: tuple[float, int, int, tuple[int, ...]] = (-1.0, 0, 0, ())
        for combo in product(*(range(len(g)) for g in grids)):
            over = beyond.copy()
            for v, k in enumerate(combo):
                over |= hits[v][k]
            flagged = rule | (over & candidate)
            f1 = confusion(flagged[scope], positive[scope])["f1"]
            on = sum(k < len(g) - 1 for k, g in zip(combo, grids, strict=True))
            key = (f1, on, sum(combo), combo)
            if key[:3] > best[:3]:
                best = key
        if best[3]:
            self.threshold_ = [float(g[k]) for g, k in zip(grids, best[3], strict=True)]
        return {"threshold": list(self.threshold_), "train_f1": best[0]}

    def save(self, path: Any) -> None:
        import joblib

        joblib.dump(self, path)

    @staticmethod
    def load(path: Any) -> AnomalyModel:
        import joblib

        model = joblib.load(path)
        if not isinstance(model, AnomalyModel):
            raise TypeError(f"{path} does not hold an AnomalyModel")
        if not all(hasattr(model, a) for a in ("forests_", "view_ref_", "hourly_", "late_")):
            raise TypeError(f"{path} holds an anomaly model of an older layout: retrain it")
        return model


def _class(command: str) -> str:
    """The class of statement whose recent executions make up a statement's system level."""
    return "write" if command in WRITE_COMMANDS else "read"


class _Rolling:
    """The median of the last `size` values, kept sorted as they come and go (the system's
    level is read at every execution: sorting the window each time was a fifth of the
    detector's work on a busy template)."""

    __slots__ = ("items", "ordered", "size")

    def __init__(self, size: int) -> None:
        self.items: deque[float] = deque()
        self.ordered: list[float] = []
        self.size = size

    def add(self, x: float) -> float:
        """Add `x` (dropping the oldest beyond `size`); the median of the window."""
        if x != x:  # NaN has no place in an order
            x = 0.0
        items, ordered = self.items, self.ordered
        if len(items) == self.size:
            del ordered[bisect_left(ordered, items.popleft())]
        items.append(x)
        insort(ordered, x)
        n = len(ordered)
        return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2.0


def _small_median(values: Iterable[float]) -> float:
    """The median of a few numbers (numpy's costs more than the sort for fifteen of them)."""
    v = sorted(values)
    n = len(v)
    if not n:
        return 0.0
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2.0


def _sorted_median(v: list[float]) -> float:
    """`_small_median` of values already in order."""
    n = len(v)
    if not n:
        return 0.0
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2.0


def _deviation_median(v: list[float], med: float) -> float:
    """`_small_median([abs(x - med) for x in v])` for `v` in order, without the sort: the
    deviations below `med` (med - x, rising as x falls) and above it (x - med, rising) are two
    ordered runs, merged from `med` outward up to the middle rank. The same numbers: in
    IEEE arithmetic med - x is exactly -(x - med)."""
    n = len(v)
    if not n:
        return 0.0
    hi = bisect_left(v, med)  # the first at or above med
    lo = hi - 1
    prev = cur = 0.0
    for _ in range(n // 2 + 1):
        if lo < 0:
            d = v[hi] - med
            hi += 1
        elif hi >= n:
            d = med - v[lo]
            lo -= 1
        else:
            below = med - v[lo]
            above = v[hi] - med
            if below <= above:
                d = below
                lo -= 1
            else:
                d = above
                hi += 1
        prev, cur = cur, d
    return cur if n % 2 else (prev + cur) / 2.0


def _steady_median(values: deque[float]) -> float:
    """`_small_median`, at once when every value is the same (a template's rows and bytes
    often are: counting them is a tenth of sorting them)."""
    if values and values[0] == values[-1] and values.count(values[0]) == len(values):
        return values[0]
    return _small_median(values)


def _hourly_rate(rows: Sequence[Execution]) -> list[float]:
    """Scored arrivals per second at each hour of the day over the (whole hours of the) history:
    the day's shape the rate rule falls back on when the trailing window has no other traffic."""
    if not rows:
        return [0.0] * 24
    first, last = math.ceil(rows[0].ts / 3600.0), math.floor(rows[-1].ts / 3600.0)
    if last <= first:
        return [0.0] * 24
    per_hour = np.zeros(last - first)
    for e in rows:
        k = int(e.ts // 3600.0) - first
        if 0 <= k < len(per_hour):
            per_hour[k] += 1
    out = []
    for h in range(24):
        hours = [k for k in range(len(per_hour)) if (first + k) % 24 == h]
        out.append(float(np.mean(per_hour[hours])) / 3600.0 if hours else 0.0)
    return out


def _slow(feats: Sequence[float], late: float = math.inf) -> bool:
    """Slower than expected (by `MIN_SLOW`), and either by far (x20, or more milliseconds beyond
    the expected than `late`: log1p ms, the model's `late_`) or again (the template's previous
    execution was slow too: a plan or a lock persists, a hiccup of the machine does not) and by
    `MIN_Z` of the template's own spread (a lookup whose time follows its parameters, 1 ms for
    one customer and 8 for another, is not news at 3x its median; a steady one is)."""
    if feats[_RES] <= MIN_SLOW:
        return False
    if feats[_RES] > VERY_SLOW or feats[_EXCESS] > late:
        return True
    return feats[_RUN2] > 0 and feats[_Z] >= MIN_Z


def _warm_mask(executions: Sequence[Execution], min_calls: int) -> np.ndarray:
    """Executions whose fingerprint had run more than `min_calls` times before (in the stream)."""
    seen: dict[str, int] = {}
    out: np.ndarray = np.zeros(len(executions), bool)
    for i, e in enumerate(executions):
        if not scored(e):
            continue
        n = seen.get(e.fingerprint, 0)
        out[i] = n > min_calls
        seen[e.fingerprint] = n + 1
    return out


# ------------------------------------------------------------------------------ the baseline


class ZScoreDetector:
    """Per-fingerprint z-score of latency: flag |x - mean| > k * std (the baseline to beat)."""

    def __init__(self, k: float = 3.0, min_calls: int = 5) -> None:
        self.k = k
        self.min_calls = min_calls

    def fit(self, executions: Sequence[Execution]) -> ZScoreDetector:
        sums: dict[str, list[float]] = {}
        for e in executions:
            if scored(e) and not e.error:
                sums.setdefault(e.fingerprint, []).append(e.duration_ms)
        self.stats_ = {
            fp: (float(np.mean(v)), max(float(np.std(v)), 1e-3))
            for fp, v in sums.items()
            if len(v) >= self.min_calls
        }
        return self

    def z(self, executions: Sequence[Execution]) -> np.ndarray:
        out = np.zeros(len(executions))
        for i, e in enumerate(executions):
            s = self.stats_.get(e.fingerprint)
            if s is not None and scored(e) and not e.error:
                out[i] = abs(e.duration_ms - s[0]) / s[1]
        return out

    def predict(self, executions: Sequence[Execution]) -> np.ndarray:
        return self.z(executions) > self.k

    def calibrate(
        self, executions: Sequence[Execution], positive: np.ndarray, scope: np.ndarray
    ) -> dict[str, Any]:
        """The same courtesy as the forest gets: k chosen for F1 on the training labels."""
        z = self.z(executions)
        best = (-1.0, self.k)
        for k in (2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0):
            m = confusion((z > k)[scope], positive[scope])
            if m["f1"] > best[0]:
                best = (m["f1"], k)
        self.k = best[1]
        return {"k": self.k, "train_f1": best[0]}


# -------------------------------------------------------------------------------- evaluation


def confusion(flagged: np.ndarray, positive: np.ndarray) -> dict[str, float]:
    tp = int(np.sum(flagged & positive))
    fp = int(np.sum(flagged & ~positive))
    fn = int(np.sum(~flagged & positive))
    tn = int(np.sum(~flagged & ~positive))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    fpr = fp / (fp + tn) if fp + tn else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "fpr": fpr,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}  # fmt: skip


def score_report(
    flag_kind: Sequence[str | None],
    label_kind: Sequence[str | None],
    scope: np.ndarray | None = None,
) -> dict[str, Any]:
    """Execution-level metrics overall and per label kind.

    Per kind: recall = share of that kind's labelled executions flagged (by any detector);
    precision = those hits over hits plus the unlabelled executions flagged with the cause that
    kind maps to (`CAUSE_OF_LABEL`): kinds sharing a cause share its false positives in full,
    which makes per-kind precision conservative.
    """
    fk = np.array([k or "" for k in flag_kind], object)
    lk = np.array([k or "" for k in label_kind], object)
    keep = np.ones(len(fk), bool) if scope is None else np.asarray(scope, bool)
    fk, lk = fk[keep], lk[keep]
    flagged, positive = fk != "", lk != ""
    out: dict[str, Any] = confusion(flagged, positive)
    out["executions"] = len(fk)
    out["labelled"] = int(positive.sum())
    per: dict[str, Any] = {}
    for kind in LABEL_KINDS:
        mine = lk == kind
        if not mine.any():
            continue
        hits = int(np.sum(flagged & mine))
        fp_cause = int(np.sum((fk == CAUSE_OF_LABEL[kind]) & ~positive))
        precision = hits / (hits + fp_cause) if hits + fp_cause else 0.0
        recall = hits / int(mine.sum())
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per[kind] = {"executions": int(mine.sum()), "detected": hits, "recall": recall,
                     "precision": precision, "f1": f1}  # fmt: skip
    out["per_kind"] = per
    causes: dict[str, Any] = {}
    for cause in sorted({k for k in fk if k}):
        mine = fk == cause
        causes[cause] = {"flagged": int(mine.sum()), "precision": float(np.mean(positive[mine]))}
    out["per_cause"] = causes
    return out


def flag_kinds(n: int, flags: Iterable[Flag]) -> list[str | None]:
    """The cause each execution was flagged for (the first flag wins), None if not flagged."""
    out: list[str | None] = [None] * n
    for f in flags:
        if 0 <= f.seq < n and out[f.seq] is None:
            out[f.seq] = f.kind
    return out


# -------------------------------------------------------------------------------- incidents


def severity(score: float, impact_ms: float, executions: int, errors: int) -> str:
    """low / medium / high from how anomalous (score) and how costly (impact) an incident is.

    Impact counts time lost beyond the expected latency, a second per failed statement and a
    tenth of a second per execution involved (bursts cost capacity, not latency).
    """
    impact = impact_ms / 1000.0 + errors + 0.1 * executions
    points = (score >= 0.6) + (score >= 0.75) + (impact >= 1.0) + (impact >= 10.0)
    return "high" if points >= 4 else "medium" if points >= 2 else "low"


@dataclass
class Incident:
    kind: str
    key: str
    start: float
    end: float
    fingerprints: list[str] = field(default_factory=list)
    executions: int = 0
    errors: int = 0
    score: float = 0.0
    impact_ms: float = 0.0
    labels: list[str] = field(default_factory=list)
    incident_id: int | None = None
    severity: str = "low"
    open: bool = True
    #: the severity last announced (webhook), to announce escalations only
    announced: str | None = None

    def add(self, f: Flag) -> None:
        self.start = min(self.start, f.ts)
        self.end = max(self.end, f.ts)
        if f.fingerprint not in self.fingerprints and len(self.fingerprints) < 50:
            self.fingerprints.append(f.fingerprint)
        if f.label and f.label not in self.labels and len(self.labels) < 50:
            self.labels.append(f.label)
        self.executions += 1
        self.errors += int(f.error)
        self.score = max(self.score, f.score)
        self.impact_ms += f.excess_ms
        self.severity = severity(self.score, self.impact_ms, self.executions, self.errors)

    def description(self) -> str:
        what = {
            "latency": "executions slower than expected",
            "rate_burst": "arrivals above the expected interval",
            "error_burst": "a burst of failed statements",
            "heavy_unseen": "expensive statements of a never-seen template",
        }[self.kind]
        fps = ", ".join(self.fingerprints[:3]) + (" ..." if len(self.fingerprints) > 3 else "")
        extra = ""
        if self.kind == "latency" and len(self.fingerprints) >= 3:
            extra = "; several templates at once (lock contention or a shared resource?)"
        return (
            f"{what}: {self.executions} executions of {len(self.fingerprints)} template(s)"
            f" ({fps}), {self.impact_ms / 1000:.1f}s beyond the expected{extra}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "incident_id": self.incident_id,
            "kind": self.kind,
            "severity": self.severity,
            "window_start": datetime.fromtimestamp(self.start, UTC).isoformat(),
            "window_end": datetime.fromtimestamp(self.end, UTC).isoformat(),
            "fingerprints": list(self.fingerprints),
            "executions": self.executions,
            "errors": self.errors,
            "score": round(self.score, 4),
            "impact_ms": round(self.impact_ms, 3),
            "labels": list(self.labels),
            "description": self.description(),
            "open": self.open,
        }


class IncidentTracker:
    """Groups flags of one cause that follow each other within `gap_s` into one incident.

    The grouping key is the cause, plus the fingerprint for rate bursts and unseen templates
    (their cause is the template itself); latency and error incidents may span templates.
    """

    def __init__(self, gap_s: float = 900.0) -> None:
        self.gap_s = gap_s
        self.open: dict[str, Incident] = {}

    @staticmethod
    def key(f: Flag) -> str:
        return f"{f.kind}:{f.fingerprint}" if f.kind in ("rate_burst", "heavy_unseen") else f.kind

    def add(self, flags: Iterable[Flag]) -> list[Incident]:
        """Fold flags in; the incidents opened or grown by them (in order of first change)."""
        touched: dict[int, Incident] = {}
        for f in flags:
            k = self.key(f)
            inc = self.open.get(k)
            if inc is not None and f.ts - inc.end > self.gap_s:
                inc.open = False
                touched.setdefault(id(inc), inc)
                inc = None
            if inc is None:
                inc = self.open[k] = Incident(f.kind, k, f.ts, f.ts)
            inc.add(f)
            touched.setdefault(id(inc), inc)
        return list(touched.values())

    def close_stale(self, now: float) -> list[Incident]:
        """Close incidents with no flag for `gap_s` (of the clock the flags carry)."""
        closed = []
        for k, inc in list(self.open.items()):
            if now - inc.end > self.gap_s:
                inc.open = False
                closed.append(inc)
                del self.open[k]
        return closed

    @property
    def open_count(self) -> int:
        return sum(1 for inc in self.open.values() if inc.open)


def group_incidents(flags: Iterable[Flag], gap_s: float = 900.0) -> list[Incident]:
    """All incidents of a finished stream (offline)."""
    tracker = IncidentTracker(gap_s)
    seen: dict[int, Incident] = {}
    for inc in tracker.add(sorted(flags, key=lambda f: (f.ts, f.seq))):
        seen[id(inc)] = inc
    for inc in tracker.open.values():
        seen[id(inc)] = inc
    return sorted(seen.values(), key=lambda i: i.start)


# ---------------------------------------------------------------------------- the log, labels


async def fetch_executions(
    conn: Any,
    since: datetime | None = None,
    until: datetime | None = None,
    max_rows: int = 200_000,
) -> tuple[list[Execution], dict[str, str]]:
    """The latest `max_rows` logged executions in time order, and label -> kind (may be empty)."""
    rows = await conn.fetch(
        """
        SELECT * FROM (
            SELECT query_id, extract(epoch FROM started_at)::float8 AS ts, fingerprint, command,
                   duration_ms, rows_returned, status, bytes_sent, predicted_cost_ms,
                   is_catalog, label, application_name,
                   normalized_text LIKE $4 AS machinery
            FROM metadata.query_logs
            WHERE ($1::timestamptz IS NULL OR started_at >= $1)
              AND ($2::timestamptz IS NULL OR started_at < $2)
            ORDER BY started_at DESC, query_id DESC
            LIMIT $3
        ) latest ORDER BY ts, query_id
        """,
        since,
        until,
        max_rows,
        SIMULATOR_SETTINGS,
    )
    out = [
        Execution(r["ts"], r["fingerprint"], r["command"], float(r["duration_ms"]),
                  r["rows_returned"], r["status"] != "ok", r["bytes_sent"],
                  r["predicted_cost_ms"], r["is_catalog"], r["label"], r["application_name"],
                  bool(r["machinery"]))
        for r in rows
    ]  # fmt: skip
    kinds: dict[str, str] = {}
    if await conn.fetchval("SELECT to_regclass('metadata.workload_labels') IS NOT NULL"):
        kinds = {r["label"]: r["kind"] for r in await conn.fetch(
            "SELECT label, kind FROM metadata.workload_labels")}  # fmt: skip
    return out, kinds


async def fetch_intervals(
    conn: Any, since: datetime | None = None
) -> tuple[dict[str, list[Interval]], dict[str, str], str]:
    """Forecast intervals per cluster (newest forecast of each window) and each template's
    cluster, from `metadata.workload_forecasts` / `metadata.query_clusters` when they exist and
    have rows; else nothing, and the detector keeps its trailing share-of-traffic baseline."""
    have = await conn.fetchval(
        "SELECT to_regclass('metadata.workload_forecasts') IS NOT NULL"
        " AND to_regclass('metadata.query_clusters') IS NOT NULL"
    )
    fallback = "trailing share-of-traffic baseline per fingerprint"
    if not have:
        return {}, {}, f"{fallback} (no forecast tables)"
    rows = await conn.fetch(
        """
        SELECT DISTINCT ON (cluster, window_start) cluster,
               extract(epoch FROM window_start)::float8 AS s, upper
        FROM metadata.workload_forecasts
        WHERE cluster <> 'total' AND ($1::timestamptz IS NULL OR window_start >= $1)
        ORDER BY cluster, window_start, made_at DESC
        """,
        since,
    )
    members = await conn.fetch(
        """
        SELECT fingerprint, cluster::text AS cluster FROM metadata.query_clusters
        WHERE model_version = (SELECT max(model_version) FROM metadata.query_clusters)
        """
    )
    if not rows or not members:
        return {}, {}, f"{fallback} (no forecast rows)"
    intervals: dict[str, list[Interval]] = {}
    for r in rows:
        intervals.setdefault(r["cluster"], []).append(
            Interval(r["s"], r["s"] + FORECAST_WINDOW_S, float(r["upper"]))
        )
    cluster_of = {r["fingerprint"]: r["cluster"] for r in members}
    return intervals, cluster_of, "forecast intervals (metadata.workload_forecasts, per cluster)"


def positives(executions: Sequence[Execution], kinds: dict[str, str]) -> list[str | None]:
    """Each execution's label kind (None: not labelled, or a label with no ground truth row)."""
    return [kinds.get(e.label) if e.label else None for e in executions]


def simulated_users(executions: Sequence[Execution]) -> np.ndarray:
    """Scope of the evaluation: scored statements, not the simulator's own bookkeeping."""
    return np.array(
        [scored(e) and e.app not in SIMULATOR_MACHINERY and not e.machinery for e in executions],
        bool,
    )


# ------------------------------------------------------------------------------ fit, evaluate


@dataclass
class FitResult:
    model: AnomalyModel
    zscore: ZScoreDetector
    info: dict[str, Any]


def fit_and_evaluate(
    executions: Sequence[Execution],
    kinds: dict[str, str],
    *,
    train_share: float = 0.5,
    seed: int = 0,
    progress: Progress | None = None,
    forecasts: tuple[dict[str, list[Interval]], dict[str, str]] | None = None,
) -> FitResult:
    """Time split: fit (and calibrate on labels, if any) on the first part, score the rest."""
    prog = progress or (lambda stage, fraction: None)
    n = len(executions)
    cut = int(n * train_share)
    train, test = list(executions[:cut]), list(executions[cut:])
    label_kind = positives(executions, kinds)
    has_labels = any(k is not None for k in label_kind)
    pos_train = np.array([k is not None for k in label_kind[:cut]], bool)
    scope_train = simulated_users(train)
    model = AnomalyModel(random_state=seed).fit(train, pos_train)
    prog("fit", 0.5)
    zs = ZScoreDetector().fit(train)
    info: dict[str, Any] = {"split": {"train": len(train), "test": len(test)},
                            "labels": has_labels}  # fmt: skip
    if (pos_train & scope_train).any():  # else the contamination quantile stays
        info["calibration"] = {
            "iforest": model.calibrate(train, pos_train, scope_train),
            "zscore": zs.calibrate(train, pos_train, scope_train),
        }
    prog("fit", 1.0)
    # the test rows are scored from the fitted state, as the online detector would
    detector = model.detector()
    if forecasts is not None and forecasts[0]:
        detector.use_forecasts(*forecasts)
    flags = detector.process(test)
    prog("evaluate", 0.5)
    kinds_flagged = flag_kinds(len(test), flags)
    incidents = group_incidents(flags)
    info["incidents"] = len(incidents)
    if has_labels:
        lk = label_kind[cut:]
        scope = simulated_users(test)
        z_flag = zs.predict(test)
        z_kinds: list[str | None] = ["latency" if f else None for f in z_flag]
        latency_only = [k if k == "latency" else None for k in kinds_flagged]
        workload = [k if k != "latency" else None for k in kinds_flagged]
        z_plus = [w or z for w, z in zip(workload, z_kinds, strict=True)]
        info["test"] = score_report(kinds_flagged, lk, scope)
        info["zscore"] = score_report(z_kinds, lk, scope)
        info["zscore_with_workload_rules"] = score_report(z_plus, lk, scope)
        info["iforest_latency_only"] = score_report(latency_only, lk, scope)
        info["events"] = event_report(incidents, test, lk, scope)
    prog("evaluate", 1.0)
    return FitResult(model, zs, info)


def event_report(
    incidents: Sequence[Incident],
    executions: Sequence[Execution],
    label_kind: Sequence[str | None],
    scope: np.ndarray,
) -> dict[str, Any]:
    """Label-level view: labels with any flagged execution, incidents with no label in them."""
    labels = {e.label for e, k, s in zip(executions, label_kind, scope, strict=True) if k and s}
    found = {lab for inc in incidents for lab in inc.labels}
    false_alarms = [inc for inc in incidents if not inc.labels]
    return {
        "labels": len(labels),
        "labels_detected": len(labels & found),
        "label_recall": len(labels & found) / len(labels) if labels else 0.0,
        "incidents": len(incidents),
        "incidents_without_label": len(false_alarms),
    }


# -------------------------------------------------------------------------------- training


def _metrics(info: dict[str, Any]) -> dict[str, Any]:
    t = info.get("test")
    if not t:
        return {}
    out = {k: t[k] for k in ("f1", "fpr", "precision", "recall")}
    out["f1_zscore"] = info["zscore"]["f1"]
    out["fpr_zscore"] = info["zscore"]["fpr"]
    out["per_kind"] = t["per_kind"]
    return out


async def train_anomaly(
    meta_conn: Any,
    warehouse_conn: Any | None,
    registry: Registry,
    config: Any,
    progress: Progress | None = None,
) -> Any:
    """Fit on the logged history, evaluate on the labels when present, gate and register."""
    from .train import new_card, run_registered

    prog = progress or (lambda stage, fraction: None)
    version = await registry.next_version(NAME)
    card = new_card(
        NAME,
        version,
        "Anomalous executions and workload windows: Isolation Forests on the"
        " latency residual (vs the cost model or the running median, net of the system's level):"
        " a spike view (residual, milliseconds beyond the expected) and a level-shift view;"
        " arrival, error-rate and unseen-template rules; z-score baseline.",
        config,
    )

    async def work(art: Any) -> tuple[bool, str]:
        executions, kinds = await fetch_executions(
            meta_conn, config.since, config.until, config.max_rows
        )
        prog("extract", 1.0)
        n_scored = sum(scored(e) for e in executions)
        if executions:
            card["data_window"] = {
                "start": datetime.fromtimestamp(executions[0].ts, UTC).isoformat(),
                "end": datetime.fromtimestamp(executions[-1].ts, UTC).isoformat(),
                "rows": len(executions),
                "fingerprints": len({e.fingerprint for e in executions}),
            }
        if n_scored < config.min_rows:
            raise ValueError(f"{n_scored} scorable logged rows, fewer than {config.min_rows}")
        intervals, cluster_of, source = await fetch_intervals(meta_conn)
        result = fit_and_evaluate(executions, kinds, seed=config.seed, progress=prog,
                                  forecasts=(intervals, cluster_of))  # fmt: skip
        # serve a model fitted on everything (with the calibrated threshold when there are labels)
        labelled = np.array([k is not None for k in positives(executions, kinds)], bool)
        final = AnomalyModel(random_state=config.seed).fit(executions, labelled)
        calibrated = result.info.get("calibration", {}).get("iforest")
        if calibrated:
            final.threshold_ = list(result.model.threshold_)  # (ranks: they carry over)
        card.update(result.info)
        card["metrics"] = _metrics(result.info)
        card["params"] = {
            "n_estimators": final.n_estimators,
            "max_samples": final.max_samples,
            "contamination": final.contamination,
            "views": [list(view) for view in final.views],
            "threshold": list(final.threshold_),  # per view, in training ranks
            "detector": asdict(final.config),
        }
        card["features"] = list(IF_FEATURES)
        card["interval_source"] = source
        active_entry = await registry.active(NAME)
        ok, reason = _gate(card["metrics"], active_entry)
        art.mkdir(parents=True, exist_ok=True)
        final.save(art / "model.joblib")
        prog("register", 1.0)
        return ok, reason

    return await run_registered(NAME, registry, card, work)


def _gate(metrics: dict[str, Any], active: Entry | None) -> tuple[bool, str]:
    if active is None:
        return True, "first version"
    theirs = (active.metrics or {}).get("f1")
    mine = metrics.get("f1")
    if mine is None or theirs is None:
        return True, "no labels to compare on: the newer history wins"
    if mine >= theirs:
        return True, f"F1 {mine:.3f} >= active v{active.version}'s {theirs:.3f}"
    return False, f"F1 {mine:.3f} < active v{active.version}'s {theirs:.3f}"


def card_markdown(card: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = buf.write
    w(f"# {card.get('name')} v{card.get('version')}\n\n{card.get('description', '')}\n\n")
    w(f"- created: {card.get('created_at')}\n- status: {card.get('status')}"
      f" ({card.get('reason')})\n- data window: {card.get('data_window')}\n\n")  # fmt: skip
    rows = [(n, card.get(n)) for n in ("test", "zscore", "zscore_with_workload_rules",
                                        "iforest_latency_only")]  # fmt: skip
    if any(r for _, r in rows):
        w("## On the labelled test rows (time split)\n\n| detector | F1 | precision | recall |"
          " FPR |\n|---|---|---|---|---|\n")  # fmt: skip
        for name, r in rows:
            if r:
                w(f"| {name} | {r['f1']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} |"
                  f" {r['fpr']:.4f} |\n")  # fmt: skip
        w("\n| kind | executions | recall | precision |\n|---|---|---|---|\n")
        for kind, r in card["test"]["per_kind"].items():
            w(f"| {kind} | {r['executions']} | {r['recall']:.3f} | {r['precision']:.3f} |\n")
    else:
        w("No labels in the log: the threshold is the contamination quantile.\n")
    return buf.getvalue()


async def load_active_anomaly_model(registry: Registry) -> tuple[AnomalyModel, Entry] | None:
    """The serving side: the active anomaly model and its registry row (None if none loads)."""
    from pathlib import Path

    entry = await registry.active(NAME)
    if entry is None or not entry.artifact_path:
        return None
    try:
        model = AnomalyModel.load(Path(entry.artifact_path) / "model.joblib")
    except Exception:
        return None
    return model, entry


# ------------------------------------------------------------------------ the admin commands


async def list_anomalies(conn: Any, limit: int = 20) -> list[dict[str, Any]]:
    """The latest incidents, newest first (`SHOW ANOMALIES`)."""
    rows = await conn.fetch(
        "SELECT incident_id, kind, severity, window_start, window_end, fingerprints,"
        " executions, score, description, open, acknowledged, created_at"
        " FROM metadata.anomalies ORDER BY incident_id DESC LIMIT $1",
        int(limit),
    )
    return [dict(r) for r in rows]


async def ack_anomaly(conn: Any, incident_id: int) -> bool:
    """Mark an incident acknowledged (`ACK ANOMALY n`); False if there is no such incident."""
    row = await conn.fetchrow(
        "UPDATE metadata.anomalies SET acknowledged = true, acknowledged_at = now(),"
        " updated_at = now() WHERE incident_id = $1 RETURNING incident_id",
        int(incident_id),
    )
    return row is not None
