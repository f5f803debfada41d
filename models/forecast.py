"""Workload forecasting: arrivals per query cluster and in total, in 5-minute windows.

Series are statement counts per 5-minute window of the logged clock (``query_logs.started_at``,
simulated time when the workload simulator's clock runs), one per cluster of the active
`models.clusters` model plus ``"total"``. Each series gets these forecasters, all scikit-learn
style (``fit`` returns self; ``predict_at(y, start, origins, steps)`` forecasts the `steps`
windows after each origin using only ``y[:origin]``):

- `SeasonalNaive`: the same window one day (``season=288``) or one week (``2016``) earlier — the
  baseline;
- `HoltWinters`: additive daily seasonality on ``log1p(counts)`` (multiplicative in counts, so a
  quiet weekend scales the whole day down); smoothing parameters estimated by statsmodels'
  ``ExponentialSmoothing``, the filter re-run here so every walk-forward origin is cheap;
- `DayProfile`: day level per weekday (times a month-end factor once month ends have been seen)
  times each window's share of the day, pooled over the last four weeks per day type (weekday /
  weekend), scaled by the last 3 h's actual-to-expected ratio (credibility-weighted, fading with
  the hours ahead);
- `LagBoost`: LightGBM (Poisson objective) boosting from the `DayProfile` forecast, on lags,
  smoothed same-window-of-past-days profiles, the recent level against yesterday's and last
  week's, the profile's expectation and ratio, and the target window's calendar (minute of day,
  weekday, weekend, month end); one direct model for leads 1..72;
- `Blend`: the mean of two or three of Holt-Winters, the day profile and LightGBM (`BLENDS`).

Walk-forward validation (`evaluate_series`): models are refitted at every day boundary of the
evaluation span and forecast from every hourly origin (a blend's forecasts are its members'
mean); the first `val_days` choose the model of each series (lowest mean of MAPE and WAPE over
both horizons, `SELECTION_METRICS`), the last `test_days` are what the card reports; the seasonal
naive baseline is whichever of day / week has the lower validation WAPE.
Horizon metrics are on hourly counts: ``mape_1h`` is the MAPE of the arrivals predicted for the
next hour (windows 1-12 after the origin), ``mape_6h`` of the hour 5-6 h ahead (windows 61-72);
``peak_hit_rate`` is the share of test days on which at least 2 of the 3 busiest hours predicted
6 h ahead are among the day's actual 3 busiest (``peak_exact_rate``: all 3). Intervals come from
validation residuals per lead bucket, scaled by ``sqrt(prediction)`` (Poisson-like).

Interfaces for the proxy (the lead wires them to gauges and the anomaly detector)::

    async def latest_forecast(conn) -> list[dict]
        # rows of the newest stored forecast of the active "forecast" model, one per cluster and
        # 5-minute window: {"cluster": "total" | "0" | "1" ..., "horizon": "1h" | "6h",
        #  "lead": 1..72, "window_start": datetime, "predicted", "lower", "upper": float,
        #  "origin": datetime, "model_version": int, "model": str}
        # horizon "1h" = windows in the first hour after the origin, "6h" = the rest up to 6 h.
    def gauge_values(rows) -> dict[tuple[str, str], float]
        # {(cluster, "1h"): arrivals expected in the next hour, (cluster, "6h"): in the next 6 h}
        # -> pgsage_forecast_queries{cluster, horizon}
    def forecast_at(rows, at: datetime) -> dict[str, dict]
        # per cluster, the row whose window contains `at` (rate-vs-interval check)
    async def publish_forecast(conn, registry) -> int
        # re-forecast from the newest logged windows with the active model (no retraining)

The trainer (`train_forecast`, TRAINERS["forecast"]) writes ``metadata.workload_forecasts``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightgbm as lgb
import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from .registry import Registry
    from .train import TrainConfig, TrainResult

FORECAST = "forecast"
WINDOW_S = 300
PER_HOUR = 12
PER_DAY = 288
PER_WEEK = 2016
#: horizon name -> windows after the origin it covers
HORIZONS: dict[str, int] = {"1h": PER_HOUR, "6h": 6 * PER_HOUR}
STEPS = HORIZONS["6h"]
TOTAL = "total"
#: date_bin origin: a midnight, so windows and hours line up with the calendar
BIN_ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)
INTERVAL_QUANTILES = (0.05, 0.95)

Progress = Callable[[str, float], None]


def _no_progress(stage: str, fraction: float) -> None:
    return None


# ---------------------------------------------------------------------------------- calendar


def calendar(start: pd.Timestamp, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Calendar features of windows `positions` of a series whose window 0 starts at `start`."""
    ts = pd.DatetimeIndex(start + pd.to_timedelta(positions * WINDOW_S, unit="s"))
    if ts.tz is None:
        ts = ts.tz_localize(UTC)
    ts = ts.tz_convert(UTC)
    days_in_month = ts.days_in_month.to_numpy()
    day = ts.day.to_numpy()
    weekday = ts.day_of_week.to_numpy()
    return {
        "slot_of_day": (ts.hour.to_numpy() * PER_HOUR + ts.minute.to_numpy() // 5).astype(float),
        "hour": ts.hour.to_numpy().astype(float),
        "weekday": weekday.astype(float),
        "is_weekend": (weekday >= 5).astype(float),
        "is_month_end": ((day >= days_in_month - 1) | (day == 1)).astype(float),
    }


# ------------------------------------------------------------------------------- forecasters


class SeasonalNaive:
    """The same window `season` windows earlier (288: yesterday, 2016: last week)."""

    def __init__(self, season: int = PER_DAY) -> None:
        self.season = season

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SeasonalNaive:
        return cls(int(d["season"])).fit(np.zeros(0), pd.Timestamp(BIN_ORIGIN))

    @property
    def name(self) -> str:
        return "seasonal_naive_week" if self.season == PER_WEEK else "seasonal_naive_day"

    def fit(self, y: np.ndarray, start: pd.Timestamp) -> SeasonalNaive:
        self.fitted_ = True
        return self

    def predict_at(
        self, y: np.ndarray, start: pd.Timestamp, origins: np.ndarray, steps: int = STEPS
    ) -> np.ndarray:
        t = origins[:, None] + np.arange(steps)[None, :]
        src = t - self.season * np.ceil((t - origins[:, None] + 1) / self.season).astype(int)
        out = np.full(src.shape, np.nan)
        ok = src >= 0
        out[ok] = y[src[ok]]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "seasonal_naive", "season": self.season}


class HoltWinters:
    """Additive level + daily season on log1p(counts), no trend.

    ``alpha`` / ``gamma`` None: estimated by statsmodels on the training series; the filter
    (heuristic start: the first two seasons) is run here for every origin in one pass.
    """

    def __init__(
        self, season: int = PER_DAY, alpha: float | None = None, gamma: float | None = None
    ) -> None:
        self.season = season
        self.alpha = alpha
        self.gamma = gamma

    name = "holt_winters"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HoltWinters:
        model = cls(int(d["season"]), float(d["alpha"]), float(d["gamma"]))
        return model.fit(np.zeros(0), pd.Timestamp(BIN_ORIGIN))

    def fit(self, y: np.ndarray, start: pd.Timestamp) -> HoltWinters:
        self.alpha_, self.gamma_ = 0.2, 0.1
        if self.alpha is not None and self.gamma is not None:
            self.alpha_, self.gamma_ = self.alpha, self.gamma
        elif len(y) >= 2 * self.season + 2:
            from statsmodels.tsa.holtwinters import ExponentialSmoothing

            z = np.log1p(np.asarray(y, dtype=float)[-min(len(y), 14 * self.season) :])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fitted = ExponentialSmoothing(
                    z,
                    trend=None,
                    seasonal="add",
                    seasonal_periods=self.season,
                    initialization_method="heuristic",
                ).fit()
            a = float(fitted.params["smoothing_level"])
            g = float(fitted.params["smoothing_seasonal"])
            if np.isfinite(a) and np.isfinite(g):
                self.alpha_, self.gamma_ = a, g
        return self

    def predict_at(
        self, y: np.ndarray, start: pd.Timestamp, origins: np.ndarray, steps: int = STEPS
    ) -> np.ndarray:
        m = self.season
        z = np.log1p(np.asarray(y, dtype=float))
        out = np.full((len(origins), steps), np.nan)
        if len(z) < 2 * m:
            return out
        cycles = z[: 2 * m].reshape(2, m)
        level = float(cycles[1].mean())
        season = (cycles - cycles.mean(axis=1, keepdims=True)).mean(axis=0)
        a, g = self.alpha_, self.gamma_
        wanted = {int(o): i for i, o in enumerate(origins)}
        last = max(wanted) if wanted else 0
        phase = np.arange(steps)
        for t in range(2 * m, min(last, len(z)) + 1):
            if t in wanted:
                out[wanted[t]] = np.expm1(level + season[(t + phase) % m])
            if t == len(z):
                break
            s = season[t % m]
            new_level = a * (z[t] - s) + (1 - a) * level
            season[t % m] = g * (z[t] - level) + (1 - g) * s
            level = new_level
        clipped: np.ndarray = np.maximum(out, 0.0)
        return clipped

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "holt_winters",
            "season": self.season,
            "alpha": self.alpha_,
            "gamma": self.gamma_,
        }


class DayProfile:
    """A window's expected count is its day's level times its share of the day, scaled by how
    busy the last hours were against that expectation.

    - level: per weekday, the recency-weighted (half-life `half_life` days) mean log day total
      of the last `days` whole days, month-end days left out (a weekday not seen yet takes its
      day type's mean); month-end days (`calendar`'s ``is_month_end``) scale it by the mean
      excess of the month-end days seen, shrunk by one pseudo-day (none seen: no factor);
    - shares: per day type (weekday / weekend), each 5-minute window's share of the day,
      pooled over those days with the same weights, the weekend's shrunk towards the weekday's
      by `weekend_prior` pseudo-days, smoothed over +-`smooth` windows. Pooling many days is
      what makes the busiest hours come out in a stable order;
    - from each origin, ``log((actual + prior) / (expected + prior))`` over the last
      `window` windows (a Poisson-gamma credibility ratio: a quiet night hardly moves it, a
      busy morning's shift is followed) is added in log space, fading by `persistence` per hour
      ahead.

    All of it is fitted on ``y[:fold start]``; `predict_at` reads only ``y[:origin]``.
    """

    def __init__(
        self,
        days: int = 28,
        half_life: float = 14.0,
        weekend_prior: float = 1.0,
        smooth: int = 2,
        window: int = 3 * PER_HOUR,
        prior: float = 100.0,
        persistence: float = 0.8,
    ) -> None:
        self.days = days
        self.half_life = half_life
        self.weekend_prior = weekend_prior
        self.smooth = smooth
        self.window = window
        self.prior = prior
        self.persistence = persistence

    name = "day_profile"

    def fit(self, y: np.ndarray, start: pd.Timestamp) -> DayProfile:
        y = np.asarray(y, dtype=float)
        first = (-_slot(start)) % PER_DAY  # the first midnight
        whole = max((len(y) - first) // PER_DAY, 0)
        n = min(whole, self.days)
        self.month_end_ = 0.0
        if n < 1:  # not one whole day yet: a flat day at the mean rate
            mean = max(float(np.mean(y)), 0.0) if len(y) else 0.0
            self.level_ = np.full(7, math.log1p(mean * PER_DAY))
            self.shape_ = np.full((2, PER_DAY), 1.0 / PER_DAY)
            return self
        d0 = first + (whole - n) * PER_DAY
        days = y[d0 : d0 + n * PER_DAY].reshape(n, PER_DAY)
        cal = calendar(pd.Timestamp(start), d0 + np.arange(n) * PER_DAY)
        weekday = cal["weekday"].astype(int)
        weekend = cal["is_weekend"].astype(int)
        month_end = cal["is_month_end"].astype(bool)
        weight = 0.5 ** ((n - 1 - np.arange(n)) / self.half_life)
        totals = days.sum(axis=1)
        log_totals = np.log1p(totals)

        ordinary = ~month_end if (~month_end).any() else np.ones(n, dtype=bool)

        def wmean(sel: np.ndarray, default: float) -> float:
            return float(np.average(log_totals[sel], weights=weight[sel])) if sel.any() else default

        overall = wmean(ordinary, 0.0)
        by_type = [wmean(ordinary & (weekend == g), overall) for g in (0, 1)]
        self.level_ = np.array(
            [wmean(ordinary & (weekday == k), by_type[int(k >= 5)]) for k in range(7)]
        )
        if month_end.any() and (~month_end).any():
            excess = log_totals[month_end] - self.level_[weekday[month_end]]
            self.month_end_ = float(excess.sum() / (len(excess) + 1.0))

        # per day type: weighted arrivals per window, weighted arrivals per day
        num = [(weight[weekend == g, None] * days[weekend == g]).sum(axis=0) for g in (0, 1)]
        den = [float((weight[weekend == g] * totals[weekend == g]).sum()) for g in (0, 1)]
        shape = np.full((2, PER_DAY), 1.0 / PER_DAY)
        if den[0] > 0:
            shape[0] = num[0] / den[0]
        elif den[1] > 0:
            shape[0] = num[1] / den[1]
        # weekend shares from few, quiet days: shrunk towards the weekday's
        seen = float(weight[weekend == 1].sum())
        prior = self.weekend_prior * den[1] / seen if seen > 0 else 0.0
        shape[1] = (num[1] + prior * shape[0]) / (den[1] + prior) if den[1] > 0 else shape[0]
        if self.smooth > 0:
            k = self.smooth
            kernel = np.concatenate([np.arange(1, k + 2), np.arange(k, 0, -1)]).astype(float)
            kernel /= kernel.sum()
            for g in (0, 1):
                wrapped = np.concatenate([shape[g][-k:], shape[g], shape[g][:k]])
                shape[g] = np.convolve(wrapped, kernel, mode="valid")
        self.shape_ = shape
        return self

    def expected(self, start: pd.Timestamp, positions: np.ndarray) -> np.ndarray:
        """Expected count of windows `positions` (any shape) from the profile alone."""
        t = np.asarray(positions, dtype=np.int64)
        cal = calendar(pd.Timestamp(start), t.ravel())
        level = self.level_[cal["weekday"].astype(int)] + self.month_end_ * cal["is_month_end"]
        share = self.shape_[cal["is_weekend"].astype(int), cal["slot_of_day"].astype(int)]
        out: np.ndarray = (np.expm1(level) * share).reshape(t.shape)
        return out

    def components(
        self, y: np.ndarray, start: pd.Timestamp, origins: np.ndarray, leads: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(expected count of window ``origin + lead - 1``, the log ratio of the last `window`
        windows before the origin, the forecast) for rows of origins and leads."""
        y = np.asarray(y, dtype=float)
        o = np.asarray(origins, dtype=np.int64)
        h = np.asarray(leads, dtype=np.int64)
        if len(o) == 0:
            empty = np.zeros(0)
            return empty, empty, empty
        upto = int(max(o.max(), (o + h - 1).max())) + 1
        exp_all = self.expected(start, np.arange(upto))
        cs_exp = np.concatenate([[0.0], np.cumsum(exp_all)])
        cs_y = np.concatenate([[0.0], np.cumsum(y[: int(o.max())])])
        lo = np.clip(o - self.window, 0, None)
        ratio = np.log((cs_y[o] - cs_y[lo] + self.prior) / (cs_exp[o] - cs_exp[lo] + self.prior))
        expected = exp_all[o + h - 1]
        fade = self.persistence ** ((h - 1) // PER_HOUR)
        return expected, ratio, expected * np.exp(ratio * fade)

    def predict_at(
        self, y: np.ndarray, start: pd.Timestamp, origins: np.ndarray, steps: int = STEPS
    ) -> np.ndarray:
        o = np.repeat(np.asarray(origins, dtype=np.int64), steps)
        h = np.tile(np.arange(1, steps + 1), len(origins))
        return self.components(y, start, o, h)[2].reshape(len(origins), steps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "day_profile",
            "days": self.days,
            "half_life": self.half_life,
            "weekend_prior": self.weekend_prior,
            "smooth": self.smooth,
            "window": self.window,
            "prior": self.prior,
            "persistence": self.persistence,
            "level": [float(v) for v in self.level_],
            "month_end": self.month_end_,
            "shape": [[float(v) for v in row] for row in self.shape_],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DayProfile:
        params = ("days", "half_life", "weekend_prior", "smooth", "window", "prior", "persistence")
        model = cls(**{k: d[k] for k in params})
        model.level_ = np.asarray(d["level"], dtype=float)
        model.month_end_ = float(d["month_end"])
        model.shape_ = np.asarray(d["shape"], dtype=float)
        return model


LAG_FEATURES: tuple[str, ...] = (
    "lead",
    "last",
    "mean_1h",
    "mean_3h",
    "lag_day",
    "lag_week",
    "smooth_day",
    "smooth_week",
    "profile_7d",
    "profile_4w",
    "profile_daytype",
    "level_vs_day",
    "level_vs_week",
    "slot_of_day",
    "hour",
    "weekday",
    "is_weekend",
    "is_month_end",
    "lag_day_month_end",
    "lag_week_month_end",
)


def lag_features(
    y: np.ndarray, start: pd.Timestamp, origins: np.ndarray, leads: np.ndarray
) -> np.ndarray:
    """Features of target window ``origin + lead - 1`` from ``y[:origin]`` only (leads <= 72)."""
    y = np.asarray(y, dtype=float)
    o = np.asarray(origins, dtype=np.int64)
    h = np.asarray(leads, dtype=np.int64)
    t = o + h - 1
    cs = np.concatenate([[0.0], np.cumsum(y)])

    def mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a = np.clip(a, 0, None)
        b = np.minimum(b, o)  # never past the origin
        n = b - a
        out = np.full(len(a), np.nan)
        ok = n > 0
        out[ok] = (cs[b[ok]] - cs[a[ok]]) / n[ok]
        return out

    def at(idx: np.ndarray) -> np.ndarray:
        out = np.full(len(idx), np.nan)
        ok = (idx >= 0) & (idx < o)
        out[ok] = y[idx[ok]]
        return out

    def smooth(centre: np.ndarray) -> np.ndarray:
        res = mean(centre - 2, centre + 3)
        res[centre < 0] = np.nan
        return res

    mean_1h = mean(o - PER_HOUR, o)
    day_ago = mean(o - PER_HOUR - PER_DAY, o - PER_DAY)
    week_ago = mean(o - PER_HOUR - PER_WEEK, o - PER_WEEK)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no past week yet: NaN, as meant
        profile_7d = np.nanmean(np.stack([smooth(t - k * PER_DAY) for k in range(1, 8)]), axis=0)
        profile_4w = np.nanmean(np.stack([smooth(t - k * PER_WEEK) for k in range(1, 5)]), axis=0)
        profile_daytype = _daytype_profile(start, t, smooth)
        cols = {
            "profile_daytype": profile_daytype,
            "lead": h.astype(float),
            "last": at(o - 1),
            "mean_1h": mean_1h,
            "mean_3h": mean(o - 3 * PER_HOUR, o),
            "lag_day": at(t - PER_DAY),
            "lag_week": at(t - PER_WEEK),
            "smooth_day": smooth(t - PER_DAY),
            "smooth_week": smooth(t - PER_WEEK),
            "profile_7d": profile_7d,
            "profile_4w": profile_4w,
            "level_vs_day": (mean_1h + 1) / (day_ago + 1),
            "level_vs_week": (mean_1h + 1) / (week_ago + 1),
            **calendar(start, t),
            # whether yesterday's / last week's window was a month-end spike to discount
            "lag_day_month_end": calendar(start, t - PER_DAY)["is_month_end"],
            "lag_week_month_end": calendar(start, t - PER_WEEK)["is_month_end"],
        }
    return np.column_stack([cols[name] for name in LAG_FEATURES])


_COL = {name: i for i, name in enumerate(LAG_FEATURES)}


def baseline(X: np.ndarray) -> np.ndarray:
    """The offset LightGBM boosts from (its init score, in log space): the same window over past
    weeks, else over past days, else the recent level. Boosting from a seasonal offset, not
    from one global mean, lets a few trees reach the quiet nights of a weekend."""
    base = X[:, _COL["profile_daytype"]].copy()
    for col in ("profile_4w", "profile_7d", "mean_3h"):
        gap = ~np.isfinite(base)
        base[gap] = X[gap, _COL[col]]
    base[~np.isfinite(base)] = 1.0
    floored: np.ndarray = np.maximum(base, 0.05)
    return floored


def _daytype_profile(
    start: pd.Timestamp, t: np.ndarray, smooth: Callable[[np.ndarray], np.ndarray], days: int = 3
) -> np.ndarray:
    """Mean of the same window on the last `days` days of the same type (weekday / weekend)."""
    weekend = calendar(start, t)["is_weekend"]
    total = np.zeros(len(t))
    count = np.zeros(len(t))
    for k in range(1, 15):
        past = t - k * PER_DAY
        same = (calendar(start, past)["is_weekend"] == weekend) & (count < days)
        value = smooth(past)
        use = same & np.isfinite(value)
        total[use] += value[use]
        count[use] += 1
    out = np.full(len(t), np.nan)
    out[count > 0] = total[count > 0] / count[count > 0]
    return out


#: features LightGBM adds when it boosts from the day profile (`LagBoost(profile=True)`)
PROFILE_FEATURES: tuple[str, ...] = ("profile_expected", "profile_ratio", "profile_forecast")


class LagBoost:
    """LightGBM (Poisson) on `LAG_FEATURES`, one direct model for every lead 1..`steps`.

    With ``profile`` (the default) a `DayProfile` is fitted on the same history; its forecast
    is the offset LightGBM boosts from and, with its expected count and recent ratio, three more
    features (`PROFILE_FEATURES`), so the trees learn corrections to a calendar-aware profile
    rather than the profile itself. ``profile=False`` is the earlier model (offset: `baseline`,
    `LAG_FEATURES` only); artifacts saved before the profile existed load as that.
    """

    def __init__(
        self,
        n_estimators: int = 300,
        learning_rate: float = 0.05,
        num_leaves: int = 15,
        min_child_samples: int = 50,
        leads_per_origin: int = 6,
        steps: int = STEPS,
        random_state: int = 0,
        n_jobs: int = 1,
        profile: bool = True,
    ) -> None:
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.leads_per_origin = leads_per_origin
        self.steps = steps
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.profile = profile

    name = "lightgbm"

    @property
    def feature_names(self) -> list[str]:
        return list(LAG_FEATURES) + (list(PROFILE_FEATURES) if self.profile else [])

    def _params(self) -> dict[str, Any]:
        return {
            "objective": "poisson",
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_child_samples,
            "feature_fraction": 0.9,
            "bagging_fraction": 0.8,
            "bagging_freq": 1,
            "seed": self.random_state,
            "num_threads": self.n_jobs,
            "deterministic": True,
            "verbosity": -1,
        }

    def _design(
        self, y: np.ndarray, start: pd.Timestamp, o: np.ndarray, h: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(features, offset in counts) of rows (origin, lead)."""
        X = lag_features(y, start, o, h)
        if not self.profile:
            return X, baseline(X)
        expected, ratio, forecast = self.profile_.components(y, start, o, h)
        X = np.column_stack([X, expected, ratio, forecast])
        return X, np.maximum(forecast, 0.05)

    def fit(self, y: np.ndarray, start: pd.Timestamp) -> LagBoost:
        """Rows: every origin with a day of history before it, `leads_per_origin` random leads
        whose target lies inside `y`."""
        y = np.asarray(y, dtype=float)
        if self.profile:
            self.profile_ = DayProfile().fit(y, start)
        rng = np.random.default_rng(self.random_state)
        first = min(PER_DAY, max(len(y) // 3, 1))
        origins = np.arange(first, len(y))
        if len(origins) == 0:
            raise ValueError(f"series of {len(y)} windows is too short to fit {self.name}")
        o = np.repeat(origins, self.leads_per_origin)
        h = rng.integers(1, self.steps + 1, size=len(o))
        keep = o + h - 1 < len(y)
        o, h = o[keep], h[keep]
        X, offset = self._design(y, start, o, h)
        data = lgb.Dataset(
            X,
            label=y[o + h - 1],
            init_score=np.log(offset),
            feature_name=self.feature_names,
        )
        self.booster_ = lgb.train(self._params(), data, num_boost_round=self.n_estimators)
        return self

    def predict_at(
        self, y: np.ndarray, start: pd.Timestamp, origins: np.ndarray, steps: int = STEPS
    ) -> np.ndarray:
        o = np.repeat(np.asarray(origins, dtype=np.int64), steps)
        h = np.tile(np.arange(1, steps + 1), len(origins))
        X, offset = self._design(np.asarray(y, dtype=float), start, o, h)
        raw = np.asarray(self.booster_.predict(X, raw_score=True), dtype=float)
        pred: np.ndarray = np.exp(raw + np.log(offset)).reshape(len(origins), steps)
        return pred

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": "lightgbm",
            "n_estimators": self.n_estimators,
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_child_samples": self.min_child_samples,
        }
        if self.profile:
            d["profile"] = self.profile_.to_dict()
        return d

    def save(self, path: Path) -> None:
        self.booster_.save_model(str(path))

    @classmethod
    def load(cls, path: Path, params: dict[str, Any]) -> LagBoost:
        profile = params.get("profile")
        kwargs = {k: v for k, v in params.items() if k not in ("kind", "profile", "file")}
        model = cls(**kwargs, profile=profile is not None)
        if profile is not None:
            model.profile_ = DayProfile.from_dict(profile)
        model.booster_ = lgb.Booster(model_file=str(path))
        return model


class Blend:
    """The mean of its members' forecasts, each fitted on the same history (an average of
    differently wrong models is often better than either)."""

    def __init__(self, members: Sequence[Forecaster]) -> None:
        self.members = list(members)

    @property
    def name(self) -> str:
        return "+".join(m.name for m in self.members)

    def fit(self, y: np.ndarray, start: pd.Timestamp) -> Blend:
        for m in self.members:
            m.fit(y, start)
        return self

    def predict_at(
        self, y: np.ndarray, start: pd.Timestamp, origins: np.ndarray, steps: int = STEPS
    ) -> np.ndarray:
        preds = [m.predict_at(y, start, origins, steps) for m in self.members]
        mean: np.ndarray = np.mean(np.stack(preds), axis=0)
        return mean

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "blend", "members": [m.to_dict() for m in self.members]}


Forecaster = SeasonalNaive | HoltWinters | DayProfile | LagBoost | Blend


#: blend candidates: name -> the candidates averaged
BLENDS: dict[str, tuple[str, ...]] = {
    "holt_winters+day_profile": ("holt_winters", "day_profile"),
    "holt_winters+lightgbm": ("holt_winters", "lightgbm"),
    "day_profile+lightgbm": ("day_profile", "lightgbm"),
    "holt_winters+day_profile+lightgbm": ("holt_winters", "day_profile", "lightgbm"),
}


def candidates(config: ForecastConfig) -> dict[str, Callable[[], Forecaster]]:
    """The forecasters compared on every series, by name."""
    single: dict[str, Callable[[], Forecaster]] = {
        "seasonal_naive_day": lambda: SeasonalNaive(PER_DAY),
        "seasonal_naive_week": lambda: SeasonalNaive(PER_WEEK),
        "holt_winters": lambda: HoltWinters(PER_DAY),
        "day_profile": lambda: DayProfile(),
        "lightgbm": lambda: LagBoost(
            n_estimators=config.n_estimators, random_state=config.seed, n_jobs=config.n_jobs
        ),
    }

    def blend(members: tuple[str, ...]) -> Callable[[], Forecaster]:
        return lambda: Blend([single[m]() for m in members])

    return {**single, **{name: blend(members) for name, members in BLENDS.items()}}


NAIVE = ("seasonal_naive_day", "seasonal_naive_week")


# --------------------------------------------------------------------------------- metrics


def mape(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Mean absolute percentage error over the points with a non-zero actual (a share, not %)."""
    a, p = np.asarray(actual, float), np.asarray(predicted, float)
    ok = (a > 0) & np.isfinite(p)
    return float(np.mean(np.abs(a[ok] - p[ok]) / a[ok])) if ok.any() else math.nan


def wape(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Sum of absolute errors over the sum of actuals (robust to near-zero windows)."""
    a, p = np.asarray(actual, float), np.asarray(predicted, float)
    ok = np.isfinite(p)
    total = a[ok].sum()
    return float(np.abs(a[ok] - p[ok]).sum() / total) if ok.any() and total > 0 else math.nan


def peak_hits(hourly_actual: np.ndarray, hourly_pred: np.ndarray, top: int = 3) -> np.ndarray:
    """Per day (rows of 24 hours): how many of the predicted `top` busiest hours are actual."""
    a = np.argsort(-hourly_actual, axis=1, kind="stable")[:, :top]
    p = np.argsort(-hourly_pred, axis=1, kind="stable")[:, :top]
    return np.array([len(set(x) & set(q)) for x, q in zip(a, p, strict=True)])


# ---------------------------------------------------------------------------- walk-forward


@dataclass
class ForecastConfig:
    #: days of the evaluation span that choose the model per series, then the days reported
    val_days: float = 2.0
    test_days: float = 2.0
    #: fewest days of history before the evaluation span
    min_train_days: float = 2.0
    #: refit every forecaster at each day boundary of the evaluation span
    refit_days: float = 1.0
    n_estimators: int = 300
    seed: int = 0
    n_jobs: int = 1
    models: tuple[str, ...] = (
        "seasonal_naive_day",
        "seasonal_naive_week",
        "holt_winters",
        "day_profile",
        "lightgbm",
        *BLENDS,
    )


@dataclass
class Evaluation:
    """Out-of-sample forecasts of one series from hourly origins, and their scores."""

    origins: np.ndarray
    predictions: dict[str, np.ndarray]  # model -> (origins, STEPS)
    val_start: int
    test_start: int
    metrics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    chosen: str = ""


def spans(n: int, start: pd.Timestamp, config: ForecastConfig) -> tuple[int, int, int]:
    """(evaluation start, test start, end) positions, aligned to midnights where possible."""
    eval_windows = round((config.val_days + config.test_days) * PER_DAY)
    first_eval = max(n - eval_windows, round(config.min_train_days * PER_DAY))
    if first_eval >= n - PER_HOUR:
        raise ValueError(
            f"{n / PER_DAY:.1f} days of history: need at least"
            f" {config.min_train_days + config.val_days + config.test_days:g}"
        )
    offset = _slot(start)  # windows since the last midnight at position 0

    def midnight(p: int) -> int:
        return p + (-(p + offset)) % PER_DAY

    e = midnight(first_eval)
    if e >= n - PER_HOUR * 2:
        e = first_eval
    share = config.val_days / (config.val_days + config.test_days)
    s = e + round((n - e) * share)
    if midnight(s) < n - PER_HOUR and (midnight(s) - e) >= PER_HOUR:
        s = midnight(s)
    return e, s, n


def _slot(start: pd.Timestamp) -> int:
    ts = pd.Timestamp(start).tz_convert(UTC) if pd.Timestamp(start).tzinfo else pd.Timestamp(start)
    return int(ts.hour * PER_HOUR + ts.minute // 5)


def hourly_origins(start: pd.Timestamp, first: int, last: int) -> np.ndarray:
    """Positions in [first, last] at the top of an hour."""
    offset = _slot(start)
    pos = np.arange(max(first, 0), last + 1)
    top: np.ndarray = pos[(pos + offset) % PER_HOUR == 0]
    return top


def walk_forward(
    y: np.ndarray,
    start: pd.Timestamp,
    make: Callable[[], Forecaster],
    origins: np.ndarray,
    refit_every: int,
) -> np.ndarray:
    """Forecasts from each origin by a model refitted on ``y[:fold start]`` at every fold."""
    out = np.full((len(origins), STEPS), np.nan)
    if len(origins) == 0:
        return out
    fold_start = int(origins[0])
    while fold_start <= origins[-1]:
        fold_end = fold_start + refit_every
        sel = np.flatnonzero((origins >= fold_start) & (origins < fold_end))
        if len(sel):
            model = make().fit(y[:fold_start], start)
            out[sel] = model.predict_at(y, start, origins[sel], STEPS)
        fold_start = fold_end
    return out


def horizon_pairs(
    y: np.ndarray, origins: np.ndarray, preds: np.ndarray, horizon: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(target hour start, actual, predicted) hourly counts at `horizon` for complete targets."""
    steps = HORIZONS[horizon]
    first = steps - PER_HOUR
    target = origins + first
    ok = target + PER_HOUR <= len(y)
    cs = np.concatenate([[0.0], np.cumsum(y)])
    actual = cs[target[ok] + PER_HOUR] - cs[target[ok]]
    pred = preds[ok, first:steps].sum(axis=1)
    return target[ok], actual, pred


def score(
    y: np.ndarray,
    start: pd.Timestamp,
    origins: np.ndarray,
    preds: np.ndarray,
    lo: int,
    hi: int,
) -> dict[str, float]:
    """Metrics of forecasts whose target hour starts in [lo, hi)."""
    out: dict[str, float] = {}
    for name in HORIZONS:
        target, actual, pred = horizon_pairs(y, origins, preds, name)
        sel = (target >= lo) & (target < hi)
        out[f"mape_{name}"] = mape(actual[sel], pred[sel])
        out[f"wape_{name}"] = wape(actual[sel], pred[sel])
        out[f"hours_{name}"] = float(sel.sum())
    # the 5-minute windows of the next hour, for reference
    win = (origins >= lo) & (origins + PER_HOUR <= min(hi, len(y)))
    if win.any():
        idx = origins[win][:, None] + np.arange(PER_HOUR)[None, :]
        out["mape_1h_5min"] = mape(y[idx].ravel(), preds[win, :PER_HOUR].ravel())
    out.update(peak_metrics(y, start, origins, preds, lo, hi))
    return out


def peak_metrics(
    y: np.ndarray, start: pd.Timestamp, origins: np.ndarray, preds: np.ndarray, lo: int, hi: int
) -> dict[str, float]:
    """Peak-hour hits on whole days in [lo, hi), hours predicted 6 h ahead."""
    target, actual, pred = horizon_pairs(y, origins, preds, "6h")
    offset = _slot(start)
    day = (target + offset) // PER_DAY
    hour = ((target + offset) % PER_DAY) // PER_HOUR
    rows_a, rows_p = [], []
    for d in np.unique(day):
        sel = day == d
        first = d * PER_DAY - offset
        if sel.sum() != 24 or first < lo or first + PER_DAY > hi:
            continue
        a = np.zeros(24)
        p = np.zeros(24)
        a[hour[sel]] = actual[sel]
        p[hour[sel]] = pred[sel]
        rows_a.append(a)
        rows_p.append(p)
    if not rows_a:
        return {
            "peak_days": 0.0,
            "peak_hit_rate": math.nan,
            "peak_exact_rate": math.nan,
            "peak_overlap": math.nan,
        }
    hits = peak_hits(np.array(rows_a), np.array(rows_p))
    return {
        "peak_days": float(len(hits)),
        "peak_hit_rate": float(np.mean(hits >= 2)),
        "peak_exact_rate": float(np.mean(hits == 3)),
        "peak_overlap": float(np.mean(hits) / 3),
    }


def evaluate_series(
    y: np.ndarray,
    start: pd.Timestamp,
    config: ForecastConfig,
    progress: Callable[[float], None] | None = None,
) -> Evaluation:
    """Walk-forward forecasts of every candidate model; the one with the lowest validation
    `_selection_score` (MAPE and WAPE, both horizons) is chosen; metrics per model on validation
    and test."""
    y = np.asarray(y, dtype=float)
    e, s, n = spans(len(y), start, config)
    # origins from 5 h before the evaluation span, so its first hours have 6 h-ahead forecasts
    origins = hourly_origins(start, max(e - (STEPS - PER_HOUR), PER_DAY), n - PER_HOUR)
    makers = candidates(config)
    names = [m for m in config.models if m in makers]
    # a blend whose members are evaluated too is their mean (the same fits); the rest run
    derived = [m for m in names if m in BLENDS and all(p in names for p in BLENDS[m])]
    run = [m for m in names if m not in derived]
    refit = max(round(config.refit_days * PER_DAY), PER_HOUR)
    ev = Evaluation(origins, {}, e, s)
    for i, name in enumerate(run):
        try:
            ev.predictions[name] = walk_forward(y, start, makers[name], origins, refit)
        except Exception:  # e.g. LightGBM's Poisson objective on a fold of all-zero counts:
            # that candidate has no forecasts (it cannot be chosen), the others still compete
            ev.predictions[name] = np.full((len(origins), STEPS), np.nan)
        if progress is not None:
            progress((i + 1) / len(run))
    for name in derived:
        members = np.stack([ev.predictions[m] for m in BLENDS[name]])
        ev.predictions[name] = np.mean(members, axis=0)
    ev.predictions = {name: ev.predictions[name] for name in names}
    for name, preds in ev.predictions.items():
        ev.metrics[name] = {
            "validation": score(y, start, origins, preds, e, s),
            "test": score(y, start, origins, preds, s, n),
        }
    ev.chosen = choose(ev)
    return ev


#: what a model is chosen by: the card's MAPE of hourly counts and, so a model cannot win by
#: under-forecasting the busy hours MAPE weighs least, WAPE, at both horizons
SELECTION_METRICS = ("mape_1h", "mape_6h", "wape_1h", "wape_6h")


def _selection_score(m: dict[str, float]) -> float:
    """Mean of `SELECTION_METRICS` on the validation span (inf without finite WAPEs; a MAPE
    with no non-zero hour to score is left out)."""
    if not all(np.isfinite(m.get(k, math.nan)) for k in ("wape_1h", "wape_6h")):
        return math.inf
    vals = [m[k] for k in SELECTION_METRICS if np.isfinite(m.get(k, math.nan))]
    return float(np.mean(vals))


def _naive_score(m: dict[str, float]) -> float:
    vals = [m.get("wape_1h", math.nan), m.get("wape_6h", math.nan)]
    return float(np.mean(vals)) if all(np.isfinite(vals)) else math.inf


def choose(ev: Evaluation) -> str:
    scores = {name: _selection_score(m["validation"]) for name, m in ev.metrics.items()}
    # a model with gaps in its forecasts (a week lag on a short history) cannot be chosen
    for name, preds in ev.predictions.items():
        if np.isnan(preds[ev.origins >= ev.val_start]).any():
            scores[name] = math.inf
    best = min(scores, key=lambda k: (scores[k], k))
    return best if np.isfinite(scores[best]) else "seasonal_naive_day"


def best_naive(ev: Evaluation) -> str | None:
    """The seasonal naive baseline: whichever of day / week has the lower validation WAPE (both
    horizons); None when neither was evaluated."""
    present = [n for n in NAIVE if n in ev.metrics]
    if not present:
        return None
    return min(present, key=lambda n: (_naive_score(ev.metrics[n]["validation"]), n))


def interval_quantiles(y: np.ndarray, ev: Evaluation, name: str) -> dict[str, list[float]]:
    """Quantiles of (actual - predicted) / sqrt(max(predicted, 1)) per horizon bucket, from the
    validation origins (all origins when there are too few)."""
    preds = ev.predictions[name]
    sel = (ev.origins >= ev.val_start) & (ev.origins < ev.test_start)
    if sel.sum() < 6:
        sel = np.ones(len(ev.origins), bool)
    out: dict[str, list[float]] = {}
    lo_lead = 0
    for horizon, steps in HORIZONS.items():
        o = ev.origins[sel]
        idx = o[:, None] + np.arange(lo_lead, steps)[None, :]
        ok = idx < len(y)
        p = preds[sel][:, lo_lead:steps][ok]
        a = y[np.where(ok, idx, 0)][ok]
        r = (a - p) / np.sqrt(np.maximum(p, 1.0))
        r = r[np.isfinite(r)]
        out[horizon] = (
            [float(np.quantile(r, q)) for q in INTERVAL_QUANTILES] if len(r) else [-2.0, 2.0]
        )
        lo_lead = steps
    return out


def bounds(pred: np.ndarray, quantiles: dict[str, list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Lower / upper bounds of per-window forecasts for leads 1..len(pred)."""
    leads = np.arange(1, len(pred) + 1)
    q_lo = np.where(leads <= HORIZONS["1h"], quantiles["1h"][0], quantiles["6h"][0])
    q_hi = np.where(leads <= HORIZONS["1h"], quantiles["1h"][1], quantiles["6h"][1])
    scale = np.sqrt(np.maximum(pred, 1.0))
    return np.maximum(pred + q_lo * scale, 0.0), np.maximum(pred + q_hi * scale, pred)


def coverage(y: np.ndarray, ev: Evaluation, name: str, quantiles: dict[str, list[float]]) -> float:
    """Share of test windows (leads 1..72) whose actual count is inside the interval."""
    sel = ev.origins >= ev.test_start
    inside = total = 0
    for o, p in zip(ev.origins[sel], ev.predictions[name][sel], strict=True):
        m = min(STEPS, len(y) - o)
        if m <= 0:
            continue
        lo, hi = bounds(p[:m], quantiles)
        a = y[o : o + m]
        inside += int(((a >= lo) & (a <= hi)).sum())
        total += m
    return inside / total if total else math.nan


# --------------------------------------------------------------------------- many series


def config_for(days: float, base: ForecastConfig | None = None) -> ForecastConfig:
    """Evaluation spans that fit `days` of history: up to 3 + 3 days, a week of training first
    when there is that much, and never less than 2 days of training."""
    c = ForecastConfig(**vars(base)) if base is not None else ForecastConfig()
    train = 7.0 if days >= 13 else 2.0
    each = min(3.0, max((days - train) / 2, 0.25))
    c.val_days = c.test_days = each
    c.min_train_days = min(train, max(days - 2 * each, 1.0))
    return c


class ForecastModel:
    """The chosen forecaster of every series, with its interval quantiles."""

    def __init__(self, config: ForecastConfig | None = None) -> None:
        self.config = config

    def fit(
        self,
        series: dict[str, np.ndarray],
        start: pd.Timestamp,
        progress: Progress = _no_progress,
    ) -> ForecastModel:
        """Walk-forward evaluation per series, then the chosen model refitted on all of it."""
        config = self.config or config_for(len(next(iter(series.values()))) / PER_DAY)
        self.config_ = config
        makers = candidates(config)
        self.models_: dict[str, Forecaster] = {}
        self.quantiles_: dict[str, dict[str, list[float]]] = {}
        self.report_: dict[str, dict[str, Any]] = {}
        self.start_ = pd.Timestamp(start)
        names = list(series)
        for i, name in enumerate(names):
            y = np.asarray(series[name], dtype=float)

            def step(f: float, i: int = i) -> None:
                progress("walk-forward", (i + f) / len(names))

            ev = evaluate_series(y, self.start_, config, step)
            naive = best_naive(ev)
            self.models_[name] = makers[ev.chosen]().fit(y, self.start_)
            self.quantiles_[name] = interval_quantiles(y, ev, ev.chosen)
            self.report_[name] = {
                "model": ev.chosen,
                "naive": naive,
                "validation": ev.metrics[ev.chosen]["validation"],
                "test": ev.metrics[ev.chosen]["test"],
                "naive_test": ev.metrics[naive]["test"] if naive else {},
                "models": {m: v["test"] for m, v in ev.metrics.items()},
                "models_validation": {m: v["validation"] for m, v in ev.metrics.items()},
                "interval": self.quantiles_[name],
                "interval_coverage_test": coverage(y, ev, ev.chosen, self.quantiles_[name]),
                "spans": {
                    "evaluation_start": _iso(self.start_, ev.val_start),
                    "test_start": _iso(self.start_, ev.test_start),
                    "end": _iso(self.start_, len(y)),
                },
                "mean_per_hour": float(np.mean(y) * PER_HOUR),
            }
        progress("walk-forward", 1.0)
        return self

    def forecast(
        self, series: dict[str, np.ndarray], start: pd.Timestamp, steps: int = STEPS
    ) -> pd.DataFrame:
        """Per series, the `steps` windows after the last one of `series` (rows of the table)."""
        out = []
        start = pd.Timestamp(start)
        for name, model in self.models_.items():
            if name not in series:
                continue
            y = np.asarray(series[name], dtype=float)
            pred = model.predict_at(y, start, np.array([len(y)]), steps)[0]
            if np.isnan(pred).any():  # a lag beyond the history: fall back to yesterday
                naive = SeasonalNaive(PER_DAY).predict_at(y, start, np.array([len(y)]), steps)[0]
                pred = np.where(np.isnan(pred), naive, pred)
            pred = np.maximum(np.nan_to_num(pred), 0.0)
            lower, upper = bounds(pred, self.quantiles_[name])
            leads = np.arange(1, steps + 1)
            out.append(
                pd.DataFrame(
                    {
                        "cluster": name,
                        "horizon": np.where(leads <= HORIZONS["1h"], "1h", "6h"),
                        "lead": leads,
                        "window_start": start
                        + pd.to_timedelta((len(y) + leads - 1) * WINDOW_S, unit="s"),
                        "predicted": pred,
                        "lower": lower,
                        "upper": upper,
                        "model": getattr(model, "name", type(model).__name__),
                    }
                )
            )
        return pd.concat(out, ignore_index=True) if out else pd.DataFrame()

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        spec: dict[str, Any] = {"series": {}}
        for i, (name, model) in enumerate(self.models_.items()):
            entry: dict[str, Any] = {
                "model": _save_forecaster(model, folder, f"lightgbm_{i}"),
                "interval": self.quantiles_[name],
            }
            if "file" in entry["model"]:  # where a lone LightGBM model's file was always named
                entry["file"] = entry["model"].pop("file")
            spec["series"][name] = entry
        (folder / "forecast.json").write_text(json.dumps(spec, indent=2))

    @classmethod
    def load(cls, folder: Path) -> ForecastModel:
        spec = json.loads((folder / "forecast.json").read_text())
        model = cls()
        model.models_, model.quantiles_, model.report_ = {}, {}, {}
        for name, entry in spec["series"].items():
            model.models_[name] = _load_forecaster(entry["model"], folder, entry.get("file"))
            model.quantiles_[name] = entry["interval"]
        return model


def _save_forecaster(model: Forecaster, folder: Path, stem: str) -> dict[str, Any]:
    """The model's dict; LightGBM boosters (also inside blends) go to ``stem*.txt`` files."""
    d = model.to_dict()
    if isinstance(model, LagBoost):
        d["file"] = f"{stem}.txt"
        model.save(folder / d["file"])
    elif isinstance(model, Blend):
        d["members"] = [
            _save_forecaster(m, folder, f"{stem}_{j}") for j, m in enumerate(model.members)
        ]
    return d


def _load_forecaster(d: dict[str, Any], folder: Path, file: str | None = None) -> Forecaster:
    kind = d["kind"]
    if kind == "seasonal_naive":
        return SeasonalNaive.from_dict(d)
    if kind == "holt_winters":
        return HoltWinters.from_dict(d)
    if kind == "day_profile":
        return DayProfile.from_dict(d)
    if kind == "blend":
        return Blend([_load_forecaster(m, folder) for m in d["members"]])
    if kind == "lightgbm":
        return LagBoost.load(folder / (d.get("file") or file or ""), d)
    raise ValueError(f"unknown forecaster kind {kind!r}")


def _iso(start: pd.Timestamp, pos: int) -> str:
    return str((start + pd.Timedelta(seconds=int(pos) * WINDOW_S)).isoformat())


def card_metrics(report: dict[str, dict[str, Any]], silhouette: float | None) -> dict[str, Any]:
    """The card's headline metrics, on the total series' test span."""
    t = report.get(TOTAL, {})
    test, naive = t.get("test", {}), t.get("naive_test", {})
    m1, n1 = test.get("mape_1h", math.nan), naive.get("mape_1h", math.nan)
    return {
        "mape_1h": m1,
        "mape_6h": test.get("mape_6h", math.nan),
        "mape_1h_seasonal_naive": n1,
        "mape_6h_seasonal_naive": naive.get("mape_6h", math.nan),
        "improvement_vs_seasonal_naive": 1 - m1 / n1 if n1 and np.isfinite(n1) else math.nan,
        "mape_1h_5min": test.get("mape_1h_5min", math.nan),
        "wape_1h": test.get("wape_1h", math.nan),
        "peak_hit_rate": test.get("peak_hit_rate", math.nan),
        "peak_exact_rate": test.get("peak_exact_rate", math.nan),
        "peak_days": test.get("peak_days", 0.0),
        "interval_coverage": t.get("interval_coverage_test", math.nan),
        "silhouette": silhouette,
        "model_total": t.get("model"),
        "seasonal_naive_total": t.get("naive"),
        "series": len(report),
    }


# ----------------------------------------------------------------------------- the log


async def fetch_counts(
    conn: Any,
    clusters_version: int | None,
    since: datetime | None = None,
    until: datetime | None = None,
    database: str | None = None,
    max_days: float = 35.0,
) -> tuple[pd.Timestamp, dict[str, np.ndarray]]:
    """Arrivals per 5-minute window per cluster and in total, from the first window of the
    last `max_days` to the last *complete* one (the newest window is still filling)."""
    from .clusters import ARRIVAL_COMMANDS

    bounds_row = await conn.fetchrow(
        """
        SELECT min(started_at) AS lo, max(started_at) AS hi FROM metadata.query_logs
        WHERE NOT is_catalog AND command = ANY($1::text[])
          AND ($2::timestamptz IS NULL OR started_at >= $2)
          AND ($3::timestamptz IS NULL OR started_at < $3)
          AND ($4::text IS NULL OR database_name = $4)
        """,
        list(ARRIVAL_COMMANDS),
        since,
        until,
        database,
    )
    if bounds_row is None or bounds_row["hi"] is None:
        raise ValueError("no logged statements in the window")
    hi = _floor(bounds_row["hi"])
    lo = max(_floor(bounds_row["lo"]), hi - timedelta(days=max_days))
    rows = await conn.fetch(
        """
        SELECT date_bin('5 minutes', l.started_at, TIMESTAMPTZ '2000-01-01 00:00+00') AS w,
               q.cluster, count(*) AS n
        FROM metadata.query_logs l
        LEFT JOIN metadata.query_clusters q
               ON q.fingerprint = l.fingerprint AND q.model_version = $5
        WHERE NOT l.is_catalog AND l.command = ANY($1::text[])
          AND l.started_at >= $2 AND l.started_at < $3
          AND ($4::text IS NULL OR l.database_name = $4)
        GROUP BY 1, 2
        """,
        list(ARRIVAL_COMMANDS),
        lo,
        hi,
        database,
        clusters_version,
    )
    n = int((hi - lo).total_seconds() // WINDOW_S)
    series: dict[str, np.ndarray] = {TOTAL: np.zeros(n)}
    for r in rows:
        i = int((r["w"] - lo).total_seconds() // WINDOW_S)
        if not 0 <= i < n:
            continue
        series[TOTAL][i] += r["n"]
        if r["cluster"] is not None:
            key = str(r["cluster"])
            series.setdefault(key, np.zeros(n))[i] += r["n"]
    ordered = {TOTAL: series.pop(TOTAL)}
    ordered.update(sorted(series.items(), key=lambda kv: int(kv[0])))
    return pd.Timestamp(lo), ordered


def _floor(ts: datetime) -> datetime:
    epoch = (ts - BIN_ORIGIN).total_seconds()
    return BIN_ORIGIN + timedelta(seconds=(epoch // WINDOW_S) * WINDOW_S)


async def store_forecast(
    conn: Any, version: int, origin: datetime, frame: pd.DataFrame, keep_days: int = 7
) -> int:
    """Insert one forecast run; runs made more than `keep_days` ago are dropped."""
    made_at = datetime.now(UTC)
    rows = [
        (
            made_at,
            version,
            origin,
            r.cluster,
            r.horizon,
            int(r.lead),
            r.window_start.to_pydatetime(),
            float(r.predicted),
            float(r.lower),
            float(r.upper),
            str(r.model),
        )
        for r in frame.itertuples(index=False)
    ]
    async with conn.transaction():
        await conn.executemany(
            """
            INSERT INTO metadata.workload_forecasts (made_at, model_version, origin, cluster,
                horizon, lead, window_start, predicted, lower, upper, model)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
            """,
            rows,
        )
        await conn.execute(
            "DELETE FROM metadata.workload_forecasts WHERE made_at < now() - make_interval("
            "days => $1)",
            keep_days,
        )
    return len(rows)


async def latest_forecast(conn: Any) -> list[dict[str, Any]]:
    """The newest forecast run of the active forecast model (see the module docstring)."""
    rows = await conn.fetch(
        """
        WITH active AS (
            SELECT version FROM ml.model_registry WHERE model_name = $1 AND is_active
        ), latest AS (
            SELECT f.made_at, f.model_version FROM metadata.workload_forecasts f
            JOIN active a ON a.version = f.model_version
            ORDER BY f.made_at DESC LIMIT 1
        )
        SELECT f.cluster, f.horizon, f.lead, f.window_start, f.predicted, f.lower, f.upper,
               f.origin, f.model_version, f.model, f.made_at
        FROM metadata.workload_forecasts f JOIN latest l USING (made_at, model_version)
        ORDER BY f.cluster = 'total' DESC, f.cluster, f.lead
        """,
        FORECAST,
    )
    return [dict(r) for r in rows]


def gauge_values(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """{(cluster, horizon): arrivals expected within the horizon} for the Prometheus gauge."""
    out: dict[tuple[str, str], float] = {}
    for r in rows:
        for horizon, steps in HORIZONS.items():
            if r["lead"] <= steps:
                key = (r["cluster"], horizon)
                out[key] = out.get(key, 0.0) + float(r["predicted"])
    return out


def forecast_at(rows: Sequence[dict[str, Any]], at: datetime) -> dict[str, dict[str, Any]]:
    """Per cluster, the forecast row of the 5-minute window containing `at` (if forecast)."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        start = r["window_start"]
        if start <= at < start + timedelta(seconds=WINDOW_S):
            out[r["cluster"]] = r
    return out


# --------------------------------------------------------------------------------- trainer


async def _active_silhouette(conn: Any) -> tuple[int | None, float | None]:
    from .clusters import active_entry

    found = await active_entry(conn)
    if found is None:
        return None, None
    version, card, _ = found
    return version, card.get("metrics", {}).get("silhouette")


def gate(metrics: dict[str, Any], min_improvement: float = 1.0) -> tuple[bool, str]:
    """Activate when the total's 1 h forecast is finite and no worse than seasonal naive."""
    m, n = metrics.get("mape_1h"), metrics.get("mape_1h_seasonal_naive")
    if m is None or not np.isfinite(m):
        return False, "mape_1h is not finite"
    if n is None or not np.isfinite(n):
        return True, f"mape_1h {m:.3f} (no seasonal naive score on this history)"
    if m <= n * min_improvement:
        return True, f"mape_1h {m:.3f} <= seasonal naive {n:.3f} on the test span"
    return False, f"mape_1h {m:.3f} is worse than seasonal naive {n:.3f}"


async def train_forecast(
    meta_conn: Any,
    warehouse_conn: Any | None,
    registry: Registry,
    config: TrainConfig,
    progress: Progress = _no_progress,
) -> TrainResult:
    """Fit per-cluster and total forecasters, store the forecast, gate and register."""
    from .clusters import assign_unassigned, card_markdown_for
    from .registry import card_markdown
    from .train import new_card, run_registered

    version = await registry.next_version(FORECAST)
    card = new_card(
        FORECAST,
        version,
        "Arrivals per 5-minute window per query cluster and in total, 1 h and"
        " 6 h ahead; per series the best of seasonal naive, Holt-Winters, a day profile,"
        " LightGBM and averages of the last three by walk-forward validation.",
        config,
        _versions("statsmodels"),
    )

    async def work(art: Path) -> tuple[bool, str]:
        progress("extract", 0.0)
        clusters_version, silhouette = await _active_silhouette(meta_conn)
        if clusters_version is not None:
            await assign_unassigned(meta_conn)
        start, series = await fetch_counts(
            meta_conn, clusters_version, config.since, config.until, config.database
        )
        progress("extract", 1.0)
        total = float(series[TOTAL].sum())
        n = len(series[TOTAL])
        if total < config.min_rows:
            raise ValueError(f"{int(total)} logged statements, fewer than {config.min_rows}")
        fc = config_for(n / PER_DAY, ForecastConfig(seed=config.seed, n_jobs=config.n_jobs))
        model = ForecastModel(fc).fit(series, start, progress)
        metrics = card_metrics(model.report_, silhouette)
        card.update(
            metrics=metrics,
            series=model.report_,
            clusters_version=clusters_version,
            params={
                "evaluation": {k: v for k, v in vars(fc).items()},
                "chosen": {k: r["model"] for k, r in model.report_.items()},
            },
            features=list(LAG_FEATURES) + list(PROFILE_FEATURES),
            data_window={
                "start": start.isoformat(),
                "end": _iso(start, n),
                "rows": int(total),
                "windows": n,
                "fingerprints": None,
            },
        )
        model.save(art)
        frame = model.forecast(series, start)
        await store_forecast(meta_conn, version, start + pd.Timedelta(seconds=n * WINDOW_S), frame)
        progress("register", 1.0)
        return gate(metrics, config.min_improvement)

    async def cleanup() -> None:
        await meta_conn.execute(
            "DELETE FROM metadata.workload_forecasts WHERE model_version = $1", version
        )

    return await run_registered(
        FORECAST, registry, card, work, cleanup, lambda c: card_markdown_for(c, card_markdown)
    )


def _versions(*libs: str) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for lib in libs:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "unknown"
    return out


async def publish_forecast(conn: Any, registry: Registry) -> int:
    """Re-forecast from the newest logged windows with the active model (no refit); returns the
    rows stored (0 without an active model)."""
    entry = await registry.active(FORECAST)
    if entry is None or not entry.artifact_path:
        return 0
    model = ForecastModel.load(Path(entry.artifact_path))
    clusters_version = entry.card.get("clusters_version")
    if clusters_version is not None:
        from .clusters import assign_unassigned

        await assign_unassigned(conn)
    start, series = await fetch_counts(conn, clusters_version, max_days=29)
    frame = model.forecast(series, start)
    origin = start + pd.Timedelta(seconds=len(series[TOTAL]) * WINDOW_S)
    return await store_forecast(conn, entry.version, origin, frame)
