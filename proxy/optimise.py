"""The service's side of the learned parts that live in the metadata database: the index
advisor's recommendations (and its automatic mode), workload clusters and anomaly incidents.

The admin console and the HTTP API call these; each opens its own short-lived connection on
the proxy's metadata role (never a client's connection). The models themselves live in
`models/` (advisor, clusters, anomaly); this module only connects, calls and formats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any, TypeVar

from prometheus_client import Gauge

from . import metadata
from .clock import CLOCK
from .log import get_logger
from .settings import Settings

APPLICATION_NAME = "pgsage-optimise"
T = TypeVar("T")


def forecast_trend(rows: list[dict[str, Any]], now: datetime) -> float:
    """Total arrivals forecast for the window after `now`'s over those of `now`'s window (or
    of the first forecast window, when `now` is before it), clipped to [1, 2]: how much busier
    the next window is expected to be. 1.0 without a forecast covering them."""
    from models.forecast import WINDOW_S, forecast_at

    total = [r for r in rows if r["cluster"] == "total"]
    if not total:
        return 1.0
    here = forecast_at(total, now).get("total") or min(total, key=lambda r: r["lead"])
    ahead = forecast_at(total, here["window_start"] + timedelta(seconds=WINDOW_S)).get("total")
    if ahead is None or float(here["predicted"]) <= 0:
        return 1.0
    return min(max(float(ahead["predicted"]) / float(here["predicted"]), 1.0), 2.0)


async def off_loop(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run `work()` to completion on a worker thread, in an event loop of its own (its own
    connections too): CPU-heavy model work never holds up the proxy's loop. The thread yields
    the GIL every switch interval, so the relay keeps moving meanwhile."""
    return await asyncio.to_thread(asyncio.run, work())


class Optimiser:
    def __init__(
        self, settings: Settings, metadata_args: dict[str, Any], registry: Any = None
    ) -> None:
        self.settings = settings
        self.metadata_args = metadata_args
        self.log = get_logger("pgsage.optimise")
        self._task: asyncio.Task[None] | None = None
        self._forecast_task: asyncio.Task[None] | None = None
        self.last_auto: dict[str, Any] | None = None
        #: the proxy's admission controller (the Service sets it): gets the forecast's trend
        self.admission: Any = None
        self.forecast_gauge = (
            Gauge(
                "pgsage_forecast_queries",
                "Statements the active forecaster expects within the horizon, by cluster",
                ["cluster", "horizon"],
                registry=registry,
            )
            if registry is not None
            else None
        )

    async def _connect(self) -> Any:
        return await metadata.connect(self.metadata_args, APPLICATION_NAME, timeout=10.0)

    # ---------------------------------------------------------------- index advisor

    def advisor_config(self) -> Any:
        """The advisor's settings; regressions are pinned only where steering applies pins."""
        from models.advisor import AdvisorConfig

        s = self.settings
        return AdvisorConfig(
            budget_share=s.advisor_budget_share,
            max_pins=s.advisor_max_pins if s.steering_enabled else 0,
            statement_timeout_ms=s.advisor_statement_timeout_ms,
        )

    async def recommendations(self, include_closed: bool = False) -> list[dict[str, Any]]:
        from models.advisor import list_recommendations

        conn = await self._connect()
        try:
            return await list_recommendations(conn, include_closed=include_closed)
        finally:
            await conn.close()

    async def advise(self) -> list[dict[str, Any]]:
        from models.advisor import advise

        conn = await self._connect()
        try:
            report = await advise(conn, None, self.advisor_config())
            return [r if isinstance(r, dict) else vars(r) for r in report.recommendations]
        finally:
            await conn.close()

    async def apply(self, rec_id: int, validate: bool = True) -> dict[str, Any]:
        from models.advisor import apply_recommendation

        conn = await self._connect()
        try:
            return await apply_recommendation(
                conn, rec_id, validate=validate, config=self.advisor_config()
            )
        finally:
            await conn.close()

    async def reject(self, rec_id: int, reason: str = "rejected by an operator") -> dict[str, Any]:
        from models.advisor import reject_recommendation

        conn = await self._connect()
        try:
            return await reject_recommendation(conn, rec_id, reason)
        finally:
            await conn.close()

    async def history(self, kind: str | None, limit: int) -> list[dict[str, Any]]:
        conn = await self._connect()
        try:
            rows = await conn.fetch(
                "SELECT id, created_at, kind, target, action, status, detail, "
                "measured_before_ms, measured_after_ms FROM metadata.optimization_history "
                "WHERE ($1::text IS NULL OR kind = $1) ORDER BY id DESC LIMIT $2",
                kind,
                limit,
            )
            return [dict(r) for r in rows]
        finally:
            await conn.close()

    # ---------------------------------------------------------------- anomalies

    async def anomalies(self, limit: int = 20) -> list[dict[str, Any]]:
        from models.anomaly import list_anomalies

        conn = await self._connect()
        try:
            return await list_anomalies(conn, limit)
        finally:
            await conn.close()

    async def ack_anomaly(self, incident_id: int) -> bool:
        from models.anomaly import ack_anomaly

        conn = await self._connect()
        try:
            return await ack_anomaly(conn, incident_id)
        finally:
            await conn.close()

    # ---------------------------------------------------------------- clusters and forecast

    async def clusters(self) -> list[dict[str, Any]]:
        from models.clusters import cluster_profiles

        conn = await self._connect()
        try:
            return await cluster_profiles(conn)
        finally:
            await conn.close()

    async def forecast(self) -> list[dict[str, Any]]:
        from models.forecast import latest_forecast

        conn = await self._connect()
        try:
            return await latest_forecast(conn)
        finally:
            await conn.close()

    async def refresh_forecast(self) -> int:
        """Re-forecast from the newest logged windows with the active model (no refit), assign
        new templates to clusters, and publish the totals per horizon as gauges.

        The models' imports (LightGBM, scikit-learn, SciPy: seconds) and the forecast itself
        are CPU work, so they run on a worker thread with its own event loop: the proxy's
        loop only sets the gauges (it once stalled every session for seconds at startup)."""
        if not await self._forecaster_active():
            return 0  # nothing to forecast with: no need to load the models at all
        stored, rows, values = await off_loop(self._publish_forecast)
        if self.forecast_gauge is not None:
            self.forecast_gauge.clear()
            for (cluster, horizon), value in values.items():
                self.forecast_gauge.labels(cluster, horizon).set(value)
        if self.admission is not None:
            self.admission.forecast_trend = forecast_trend(rows, CLOCK.now())
        return stored

    async def _forecaster_active(self) -> bool:
        from models.registry import Registry, model_dir

        conn = await self._connect()
        try:
            return await Registry(conn, model_dir()).active("forecast") is not None
        finally:
            await conn.close()

    async def _publish_forecast(self) -> tuple[int, list[dict[str, Any]], dict[Any, float]]:
        from models.forecast import gauge_values, latest_forecast, publish_forecast
        from models.registry import Registry, model_dir

        conn = await self._connect()
        try:
            stored = await publish_forecast(conn, Registry(conn, model_dir()))
            rows = await latest_forecast(conn)
        finally:
            await conn.close()
        return stored, rows, gauge_values(rows)

    async def _forecast_loop(self) -> None:
        while True:
            try:
                await self.refresh_forecast()
            except Exception as exc:  # no metadata database, no model yet: try again later
                self.log.debug("forecast refresh skipped", error=str(exc))
            await asyncio.sleep(self.settings.forecast_refresh_interval)

    # ---------------------------------------------------------------- plan steering

    async def record(self, decisions: list[dict[str, Any]]) -> None:
        """Decisions of the proxy's own optimisers (steering A/B) into optimization_history."""
        if not decisions:
            return
        conn = await self._connect()
        try:
            await conn.executemany(
                "INSERT INTO metadata.optimization_history (kind, target, action, status,"
                " detail, measured_before_ms, measured_after_ms)"
                " VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7)",
                [
                    (d["kind"], d["target"], d["action"], d["status"],
                     json.dumps(d["detail"], default=str), d.get("before_ms"), d.get("after_ms"))
                    for d in decisions
                ],
            )  # fmt: skip
        finally:
            await conn.close()

    async def pins(self) -> dict[str, str]:
        """{fingerprint: arm} the index advisor pinned (plans its indexes would slow)."""
        from models.advisor import active_pins

        conn = await self._connect()
        try:
            return await active_pins(conn)
        finally:
            await conn.close()

    async def steering_loop(self, *learners: Any) -> None:
        """Every steering_eval_interval: A/B-test steering arms and rewrites against their
        holdouts, and record the decisions (and rewrites found not equivalent)."""
        while True:
            await asyncio.sleep(self.settings.steering_eval_interval)
            steering = learners[0] if learners else None
            if steering is not None:
                try:
                    steering.pins = await self.pins()
                except Exception as exc:
                    self.log.debug("steering pins not loaded", error=str(exc))
            for learner in learners:
                if learner is None:
                    continue
                try:
                    decisions = learner.evaluate()
                    for d in decisions:
                        self.log.info(f"{d['kind']} decision", action=d["action"],
                                      fingerprint=d["target"],
                                      detail={k: v for k, v in d["detail"].items()
                                              if k in ("arm", "rule", "p_value")})  # fmt: skip
                    await self.record(decisions)
                except Exception as exc:
                    self.log.warning("optimisation evaluation failed", error=str(exc))

    # ---------------------------------------------------------------- automatic mode

    def start(self, steering: Any = None, rewriter: Any = None, auto: bool = True) -> None:
        """`auto`: the automatic advisor and the forecast too (in multi-worker mode only the
        primary runs them; every worker A/B-tests its own steering and rewrites)."""
        if auto:
            self._task = asyncio.ensure_future(self._auto_loop())
            self._forecast_task = asyncio.ensure_future(self._forecast_loop())
        if steering is not None or rewriter is not None:
            self._steering_task = asyncio.ensure_future(self.steering_loop(steering, rewriter))

    _steering_task: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        for task in (self._task, self._forecast_task, self._steering_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def auto_pass(self) -> dict[str, Any]:
        """One pass of automatic mode: advise, then apply validated proposals and re-check
        applied ones (dropping those whose benefit is gone). Parsing the workload and costing
        candidates is CPU work: it runs on a worker thread, off the proxy's event loop."""
        result = await off_loop(self._auto_pass)
        self.last_auto = result
        return result

    async def _auto_pass(self) -> dict[str, Any]:
        from models.advisor import advise, recheck

        conn = await self._connect()
        try:
            config = self.advisor_config()
            await advise(conn, None, config)
            result: dict[str, Any] = await recheck(conn, config=config, auto_apply=True)
        finally:
            await conn.close()
        return result

    async def _auto_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.advisor_interval)
            if not self.settings.advisor_auto:
                continue
            try:
                result = await self.auto_pass()
                self.log.info("index advisor automatic pass", result=_brief(result))
            except Exception as exc:
                self.log.warning("index advisor automatic pass failed", error=str(exc))


def _brief(result: Any) -> Any:
    if isinstance(result, dict):
        return {k: (len(v) if isinstance(v, list) else v) for k, v in result.items()}
    return result
