"""Retraining inside `pgsage serve`: on a schedule and when the online q-error drifts.

A scheduled run retrains every model of `retrain_models` in turn (by default the cost model,
then the workload clusters, the forecaster that counts arrivals per cluster, and the anomaly
detector that reads both); a drift of the online q-error retrains the cost model alone.

Training runs as a separate process (`pgsage train MODEL --json`), so the event loop never
stalls; the log worker notices a newly active version within `cost_refresh_interval` and swaps
to it. A failed run leaves the previous model serving; the registry row says why.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from prometheus_client import Counter

from .child import PYTHON
from .log import get_logger
from .metadata import dsn_of
from .settings import Settings
from .telemetry.metrics import ProxyMetrics

CHECK_PERIOD = 1.0


class Retrainer:
    def __init__(
        self, settings: Settings, metrics: ProxyMetrics, connect_args: dict[str, Any]
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.dsn = dsn_of(connect_args)
        self.log = get_logger("pgsage.retrain")
        self.runs = Counter(
            "pgsage_model_training_runs",
            "Training runs started by pgsage serve, by model, trigger and outcome",
            ["model", "trigger", "status"],
            registry=metrics.registry,
        )
        self.last_run = time.monotonic()
        self.last_result: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.settings.retrain_interval > 0 or self.settings.retrain_qerror_threshold > 0:
            self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def due(self, now: float) -> str | None:
        """Why a run is due now ('schedule' or 'drift'), or None."""
        s = self.settings
        since = now - self.last_run
        if s.retrain_interval > 0 and since >= s.retrain_interval:
            return "schedule"
        qerror = self.metrics.cost_prediction_qerror._value.get()
        if (
            s.retrain_qerror_threshold > 0
            and qerror > s.retrain_qerror_threshold
            and since >= s.retrain_min_gap
        ):
            return "drift"
        return None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(CHECK_PERIOD)
            trigger = self.due(time.monotonic())
            if trigger == "drift":
                await self.run("cost", trigger)
            elif trigger is not None:
                for model in list(self.settings.retrain_models):
                    await self.run(model, trigger)

    async def run(self, model: str, trigger: str) -> dict[str, Any]:
        self.last_run = time.monotonic()
        self.log.info("training started", model=model, trigger=trigger)
        proc = await asyncio.create_subprocess_exec(
            *PYTHON, "-m", "proxy.cli", "train", model, "--json", "--dsn", self.dsn,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        try:
            results = json.loads(out.decode() or "[]")
        except json.JSONDecodeError:
            results = []
        if not results:
            reason = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            results = [{"name": model, "status": "failed", "reason": reason[0]}]
        for r in results:
            self.runs.labels(r["name"], trigger, r["status"]).inc()
            log = self.log.warning if r["status"] == "failed" else self.log.info
            log("training finished", model=r["name"], trigger=trigger, status=r["status"],
                version=r.get("version"), reason=r.get("reason"))  # fmt: skip
        self.last_result = results[0]
        return results[0]
