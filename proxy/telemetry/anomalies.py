"""The online anomaly detector, inside the query log worker: batches in, incidents and alerts out.

The worker hands every batch of query_logs rows to `AnomalyMonitor.observe` (a bounded append,
nothing else); a task of its own scores them every `SCORE_PERIOD` with the active anomaly model
from the registry (models/anomaly.py; a cold rule set until one is trained), groups flags into
incidents and, for each new or grown incident, upserts `metadata.anomalies`, writes a structured
log line, counts `pgsage_anomalies_total{kind,severity}` (sent to the proxy with the worker's
metric deltas) and queues a JSON webhook POST that is retried with backoff by another task. So
an anomalous execution is an incident about one flush interval plus `SCORE_PERIOD` after it
completed, and logging never waits for any of it: a failure here is logged and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import time
import urllib.request
from collections import deque
from typing import Any

from ..clock import CLOCK
from ..log import get_logger
from ..settings import Settings
from . import logrows

SCORE_PERIOD = 0.25  # real seconds between scoring rounds
SCORE_SLICE = 2_000  # executions scored between yields to the event loop
MAX_PENDING = 200_000  # rows waiting to be scored; beyond, the oldest are dropped (and counted)
WEBHOOK_QUEUE = 1_000
SEVERITY_RANK = {"low": 0, "medium": 1, "high": 2}


_INSERT = """
INSERT INTO metadata.anomalies (kind, severity, window_start, window_end, fingerprints,
    description, executions, score, impact_ms, errors, model_version, labels, detail, open,
    proxy_instance)
VALUES ($1, $2, to_timestamp($3), to_timestamp($4), $5::text[], $6, $7, $8, $9, $10, $11,
        $12::text[], $13::jsonb, $14, $15)
RETURNING incident_id
"""
_UPDATE = """
UPDATE metadata.anomalies SET severity = $2, window_start = to_timestamp($3),
    window_end = to_timestamp($4), fingerprints = $5::text[], description = $6, executions = $7,
    score = $8, impact_ms = $9, errors = $10, labels = $11::text[], open = $12,
    model_version = coalesce($13, model_version), updated_at = now()
WHERE incident_id = $1
"""


class AnomalyMonitor:
    def __init__(self, settings: Settings, connect_args: dict[str, Any], metrics: Any) -> None:
        self.settings = settings
        self.connect_args = connect_args
        self.metrics = metrics
        self.log = get_logger("pgsage.anomaly")
        self.pending: deque[tuple[Any, ...]] = deque()
        self.dropped = 0
        self.scored = 0
        self.detector: Any = None
        self.tracker: Any = None
        self.version: str | None = None
        self._mod: Any = None
        self._conn: Any = None
        self._dirty: dict[int, Any] = {}  # id(incident) -> incident to persist
        self._webhooks: asyncio.Queue[dict[str, Any]] = asyncio.Queue(WEBHOOK_QUEUE)
        self._refreshed_at = -1e9
        self._persist_at = 0.0
        self._backoff = 0.5
        self._stopping = False
        self._task = asyncio.ensure_future(self._run())
        self._hook_task = (
            asyncio.ensure_future(self._send_webhooks()) if settings.anomaly_webhook_url else None
        )

    # ------------------------------------------------------------------ the worker's side

    def observe(self, rows: list[tuple[Any, ...]]) -> None:
        """Queue a batch of query_logs rows for scoring (called for every written batch)."""
        self.pending.extend(rows)
        over = len(self.pending) - MAX_PENDING
        for _ in range(max(over, 0)):
            self.pending.popleft()
            self.dropped += 1

    async def stop(self, timeout: float = 3.0) -> None:
        """Score what is queued, persist, and stop (webhooks still queued get `timeout`)."""
        self._stopping = True
        try:
            await asyncio.wait_for(self._task, timeout)
        except (TimeoutError, asyncio.CancelledError, Exception):
            self._task.cancel()
        if self._hook_task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._webhooks.join(), timeout)
            self._hook_task.cancel()
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    # ------------------------------------------------------------------ scoring loop

    async def _run(self) -> None:
        # scikit-learn takes a second to import: off the event loop, so logging goes on
        try:
            self._mod = await asyncio.to_thread(importlib.import_module, "models.anomaly")
            # the burst rule's Poisson bound imports SciPy's statistics on first use: a second
            # and more of CPU that would otherwise stall this loop under the first traffic
            await asyncio.to_thread(importlib.import_module, "scipy.stats")
        except Exception as exc:
            self.log.error("anomaly detection unavailable", error=repr(exc))
            self.pending.clear()
            self.observe = lambda rows: None  # type: ignore[method-assign]
            return
        self.tracker = self._mod.IncidentTracker(self.settings.anomaly_incident_gap)
        self.detector = self._mod.Detector(None)
        while True:
            try:
                await self._refresh_model()
            except Exception as exc:  # no registry: keep the model (or the cold rules) we have
                self.log.warning("anomaly model refresh failed", error=repr(exc))
                self._drop_connection()
            try:
                await self.score_pending()
            except Exception as exc:  # never let the detector take logging down
                self.log.warning("anomaly scoring failed", error=repr(exc))
            if time.monotonic() >= self._persist_at:
                try:
                    await self._persist()
                    self._backoff = 0.5
                except Exception as exc:
                    self.log.warning("anomalies not written; retrying", error=repr(exc),
                                     retry_in=self._backoff)  # fmt: skip
                    self._drop_connection()
                    self._persist_at = time.monotonic() + self._backoff
                    self._backoff = min(self._backoff * 2, 30.0)
            if self._stopping and not self.pending:
                return
            await asyncio.sleep(SCORE_PERIOD)

    async def _connection(self) -> Any:
        if self._conn is None or self._conn.is_closed():
            from .. import metadata

            self._conn = await metadata.connect(self.connect_args, "pgsage-anomaly")
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def _refresh_model(self) -> None:
        now = time.monotonic()
        if now - self._refreshed_at < self.settings.anomaly_refresh_interval:
            return
        self._refreshed_at = now
        from models.registry import Registry, model_dir

        conn = await self._connection()
        forecasts = await self._mod.fetch_intervals(conn)
        loaded = await self._mod.load_active_anomaly_model(Registry(conn, model_dir()))
        version = None if loaded is None else f"{loaded[1].name}:v{loaded[1].version}"
        if version != self.version:
            self.version = version
            self.detector = self._mod.Detector(None if loaded is None else loaded[0])
            self.log.info("anomaly model loaded", version=version or "cold rules",
                          intervals=forecasts[2])  # fmt: skip
        if forecasts[0]:
            self.detector.use_forecasts(forecasts[0], forecasts[1])

    async def score_pending(self) -> list[Any]:
        """Score what is queued; the incidents opened or grown (also marked to persist)."""
        if not self.pending:
            self._close_stale()
            return []
        rows = list(self.pending)
        self.pending.clear()
        executions = logrows.executions(rows, self._mod.Execution)
        flags = []
        for i in range(0, len(executions), SCORE_SLICE):
            flags.extend(self.detector.process(executions[i : i + SCORE_SLICE]))
            await asyncio.sleep(0)  # the worker's next batch is not held up by a big one
        self.scored += len(executions)
        touched: list[Any] = self.tracker.add(flags)
        for f in flags:
            inc = self.tracker.open.get(self.tracker.key(f))
            self.metrics.anomalies.labels(f.kind, inc.severity if inc else "low").inc()
        for inc in touched:
            self._dirty[id(inc)] = inc
        self._close_stale()
        return touched

    def _close_stale(self) -> None:
        if self.tracker is None:
            return
        for inc in self.tracker.close_stale(CLOCK.epoch(time.monotonic())):
            self._dirty[id(inc)] = inc
        self.metrics.anomaly_incidents_open.set(float(self.tracker.open_count))

    # ------------------------------------------------------------------ alerts

    async def _persist(self) -> None:
        if not self._dirty:
            return
        conn = await self._connection()
        for key, inc in list(self._dirty.items()):
            d = inc.as_dict()
            args = (
                inc.severity, inc.start, inc.end, d["fingerprints"], d["description"],
                inc.executions, inc.score, inc.impact_ms, inc.errors,
            )  # fmt: skip
            if inc.incident_id is None:
                inc.incident_id = await conn.fetchval(
                    _INSERT, inc.kind, *args, self.version, d["labels"],
                    json.dumps({"key": inc.key}), inc.open, self.settings.instance_name,
                )  # fmt: skip
            else:
                await conn.execute(_UPDATE, inc.incident_id, *args, d["labels"], inc.open,
                                   self.version)  # fmt: skip
            del self._dirty[key]
            try:
                self._announce(inc)
            except Exception as exc:  # the row is written; a failed alert must not undo that
                self.log.warning("anomaly alert failed", error=repr(exc))

    def _announce(self, inc: Any) -> None:
        """Log and post an incident when it is new or its severity rose."""
        if (
            inc.announced is not None
            and SEVERITY_RANK[inc.severity] <= SEVERITY_RANK[inc.announced]
        ):
            return
        event = "incident_opened" if inc.announced is None else "incident_escalated"
        inc.announced = inc.severity
        d = inc.as_dict()
        self.log.warning(
            "anomaly",
            alert=event,
            incident_id=inc.incident_id,
            kind=inc.kind,
            severity=inc.severity,
            fingerprints=d["fingerprints"][:5],
            executions=inc.executions,
            window_start=d["window_start"],
            window_end=d["window_end"],
            description=d["description"],
        )
        s = self.settings
        if (
            s.anomaly_webhook_url
            and SEVERITY_RANK[inc.severity] >= SEVERITY_RANK[s.anomaly_webhook_min_severity]
        ):
            payload = {"event": event, "source": "pgsage", "instance": s.instance_name,
                       "model_version": self.version, **d}  # fmt: skip
            try:
                self._webhooks.put_nowait(payload)
            except asyncio.QueueFull:
                self.log.warning("anomaly webhook queue full; alert dropped",
                                 incident_id=inc.incident_id)  # fmt: skip

    async def _send_webhooks(self) -> None:
        s = self.settings
        url = s.anomaly_webhook_url or ""
        while True:
            payload = await self._webhooks.get()
            try:
                body = json.dumps(payload, default=str).encode()
                for attempt in range(s.anomaly_webhook_retries + 1):
                    try:
                        await asyncio.to_thread(_post, url, body, s.anomaly_webhook_timeout)
                        break
                    except Exception as exc:
                        if attempt == s.anomaly_webhook_retries:
                            self.log.warning("anomaly webhook failed; alert dropped",
                                             error=repr(exc), attempts=attempt + 1,
                                             incident_id=payload.get("incident_id"))  # fmt: skip
                        else:
                            await asyncio.sleep(0.5 * 2**attempt)
            finally:
                self._webhooks.task_done()


def _post(url: str, body: bytes, timeout: float) -> None:
    req = urllib.request.Request(
        url, data=body, method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "pgsage-anomaly"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        if resp.status >= 300:
            raise OSError(f"webhook answered HTTP {resp.status}")
