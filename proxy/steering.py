"""Plan steering in the proxy: which hint set (arm) a statement runs with, and what happened.

The bandit itself is `models/steering.py` (Thompson sampling per template over Bao's arms). This
module keys statements by their literal-masked text, keeps the per-template state, decides per
eligible statement (a SELECT outside a transaction whose stock runs take at least
`steering_min_ms`), and evaluates each template's chosen arm against its holdout (the share of
executions that run the stock plan regardless) with a Mann-Whitney U test: an arm that does
not beat the holdout significantly is withdrawn, and every decision is returned for
`metadata.optimization_history`.

Pins: the index advisor keeps an index that slows a few fingerprints when a hint set restores
each of them, and records the pin (`models.advisor.record_pins`); the service loads the active
pins every `steering_eval_interval` into `pins`, and a pinned fingerprint runs its arm on every
execution (no exploration, no holdout; logged as `pin:ARM`) until the index is reverted.

The session applies an arm by sending `SET enable_... = off` before the statement and `RESET`
after it on the client's own connection, swallowing both replies (see session.py).

Same plans: when a template of the warehouse database first becomes eligible, a background task
EXPLAINs its text under every arm's switches on pgsage's own read-only connection; arms whose
plan is stock's (or an earlier arm's) are retired before they are tried (`Policy.same_plans`).
A text with $n parameters is planned with the values of its first eligible Bind (PREPARE with
the Parse's declared types, EXPLAIN EXECUTE with a custom plan, as steered executions run).

Warm start: with `steering_warm_start` and an active cost model in the registry, the same task
predicts the latency of each arm's plan that differs from stock's (the template's static
features with that plan's features, `models.serve.serving_features`); an arm predicted faster
is tried first (`Policy.warm_start`: why only faster), with the weight the model's held-out
q-error earns its predictions. The model is
read from the registry on pgsage's own connection, looked up again at most every
`cost_refresh_interval` and loaded again (in a thread: LightGBM never blocks the relay) when
another version became active.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import math
import random
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from models.steering import (
    ARMS,
    EARLY_ALPHA,
    STOCK,
    Policy,
    TemplateState,
    mann_whitney,
    mean_ratio,
    plan_shape,
)
from optimizer.fingerprint import compute_fingerprint, literal_key

from .log import get_logger
from .prepared import Prepared, ValueSet, literal_sets
from .settings import Settings

_SELECT = re.compile(r"^\s*(?:/\*.*?\*/\s*|--[^\n]*\n\s*)*(?:select|with)\b", re.I | re.S)
_WRITES = re.compile(r"\b(?:insert|update|delete|merge|into|for\s+update|for\s+share)\b", re.I)
_PARAMETER = re.compile(r"\$\d")
HOLDOUT, STEER, DRY_RUN, PIN = "holdout", "steer", "dry_run", "pin"


class SteeringController:
    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.policy = Policy()
        self.rng = random.Random(settings.steering_seed)
        self.states: OrderedDict[str, TemplateState] = OrderedDict()
        self._keys: OrderedDict[str, str | None] = OrderedDict()
        self.validated: dict[str, str] = {}
        #: fingerprint -> arm pinned by the index advisor (loaded by the service)
        self.pins: dict[str, str] = {}
        self.decisions = 0
        self.applied = 0
        #: pgsage's own connection to the warehouse (set by the service): plans of the arms
        self.connect: Callable[[], Awaitable[Any]] | None = None
        self.plans: asyncio.Queue[tuple[str, str, tuple[int, ...], ValueSet | None]] | None
        self.plans = None
        #: templates with $n parameters waiting for a Bind's values to compare plans with
        self.awaiting: dict[str, str] = {}
        self.same_plan_retired = 0
        #: templates whose arms the cost model warm-started
        self.warm_started = 0
        self._model: Any = None
        self._model_version: tuple[str, int] | None = None
        self._model_checked = -math.inf
        self._model_sd = 0.5
        self._static: Any = None
        self._task: asyncio.Task[None] | None = None
        if registry is not None:
            self.m_decisions = Counter(
                "pgsage_steering_decisions", "Steering decisions by mode", ["mode"],
                registry=registry,
            )  # fmt: skip
            self.m_events = Counter(
                "pgsage_steering_events",
                "Arms retired, converged, validated, withdrawn, retired for a plan seen before,"
                " templates warm-started by the cost model",
                ["event"], registry=registry,
            )  # fmt: skip
            Gauge("pgsage_steering_templates", "Templates with steering state",
                  registry=registry).set_function(lambda: len(self.states))  # fmt: skip
        else:
            self.m_decisions = self.m_events = None  # type: ignore[assignment]

    # ---------------------------------------------------------------- keys

    def key(self, sql: str) -> str | None:
        """The template key of a steerable text (a read-only SELECT), else None."""
        keys = self._keys
        if sql in keys:
            return keys[sql]
        k: str | None = None
        if _SELECT.match(sql) and not _WRITES.search(sql) and "pgsage:off" not in sql:
            k = literal_key(sql)
        keys[sql] = k
        if len(keys) > 20_000:
            keys.popitem(last=False)
        return k

    def _state(self, key: str, sql: str) -> TemplateState:
        st = self.states.get(key)
        if st is None:
            st = self.states[key] = TemplateState()
            st.fingerprint = compute_fingerprint(sql).id
            if len(self.states) > self.settings.steering_max_templates:
                self.states.popitem(last=False)
        return st

    # ---------------------------------------------------------------- decisions

    def decide(self, sql: str, database: str | None = None) -> tuple[str, str, str] | None:
        """(key, arm, mode) for a statement about to run, or None (not steered)."""
        s = self.settings
        if not s.steering_active:
            return None
        key = self.key(sql)
        if key is None:
            return None
        st = self.states.get(key)
        if self.pins:
            st = st or self._state(key, sql)
            pinned = self.pins.get(st.fingerprint)
            if pinned in ARMS and st.fingerprint not in s.steering_exclude:
                self.decisions += 1
                if s.steering_dry_run:
                    return self._count(key, pinned, DRY_RUN)
                if pinned != STOCK:
                    self.applied += 1
                return self._count(key, pinned, PIN)
        if st is None or st.fingerprint in s.steering_exclude:
            return None
        stock = st.arms[STOCK]
        if st.withdrawn or stock.n < self.policy.min_pulls:
            return None
        if stock.n and _ms(stock.mean) < s.steering_min_ms and st.converged is None:
            return None
        if not st.plans_checked:
            st.plans_checked = True
            plans = self.plans
            mine = database == s.warehouse_database  # the database pgsage's connection is in
            if plans is not None and mine:
                if _PARAMETER.search(sql):
                    if len(self.awaiting) < 500:
                        self.awaiting[key] = sql  # the session lends its Bind's values
                else:
                    with contextlib.suppress(asyncio.QueueFull):
                        plans.put_nowait((key, sql, (), None))
        self.decisions += 1
        st.decisions += 1
        holdout = s.steering_holdout
        if st.converged not in (None, STOCK) and key not in self.validated:
            holdout = max(holdout, s.steering_trial_holdout)  # on trial: half stock, half arm
        if self.rng.random() < holdout:
            return self._count(key, STOCK, HOLDOUT)
        arm = self.policy.choose(st, self.rng, s.steering_disabled_arms)
        if s.steering_dry_run:
            return self._count(key, arm, DRY_RUN)
        if arm != STOCK:
            self.applied += 1
        return self._count(key, arm, STEER)

    def _count(self, key: str, arm: str, mode: str) -> tuple[str, str, str]:
        if self.m_decisions is not None:
            self.m_decisions.labels(mode if arm != STOCK or mode != STEER else "stock").inc()
        return key, arm, mode

    def observe(self, sql: str | None, decision: tuple[str, str, str] | None, ms: float) -> None:
        """One finished execution: a steered one updates its arm; an unsteered SELECT, the
        template's stock statistics (that is how templates become eligible)."""
        if sql is None:
            return
        if decision is None:
            key = self.key(sql)
            if key is None:
                return
            st = self._state(key, sql)
            if not st.withdrawn:
                self.policy.update(st, STOCK, ms, self.rng)
            return
        key, arm, mode = decision
        found = self.states.get(key)
        if found is None or mode == PIN or found.fingerprint in self.pins:
            return
        st = found
        if mode == HOLDOUT:
            st.holdout.append(ms)
            if len(st.holdout) > self.policy.max_samples:
                del st.holdout[0]
            return
        event = self.policy.update(st, STOCK if mode == DRY_RUN else arm, ms, self.rng)
        if event is not None and self.m_events is not None:
            self.m_events.labels(event.split(":", 1)[0]).inc()

    # ---------------------------------------------------------------- same plans

    def lend_values(self, key: str, declared: tuple[int, ...], values: ValueSet) -> None:
        """The values of an eligible execution of a template awaiting them (`awaiting`)."""
        sql = self.awaiting.pop(key, None)
        if sql is not None and self.plans is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self.plans.put_nowait((key, sql, declared, values))

    def start(self) -> None:
        if self.connect is not None:
            self.plans = asyncio.Queue(maxsize=500)
            self._task = asyncio.ensure_future(self._compare_plans())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _compare_plans(self) -> None:
        assert self.connect is not None and self.plans is not None
        log = get_logger("pgsage.steering")
        conn = None
        while True:
            key, sql, declared, values = await self.plans.get()
            try:
                if conn is None or conn.is_closed():
                    conn = await self.connect()
                    await conn.execute("SET default_transaction_read_only = on;"
                                       " SET statement_timeout = 5000;"
                                       " SET standard_conforming_strings = on")  # fmt: skip
                if values is None:
                    plans = await explain_arms(conn, sql)
                else:
                    async with Prepared(conn, declared) as stmts:
                        resolved = await stmts.prepare("pgsage_arm", sql)
                        args = literal_sets([values], resolved) if resolved is not None else []
                        if not args:
                            continue  # values it cannot render: explore as before
                        plans = await explain_arms(conn, f"EXECUTE pgsage_arm {args[0]}", True)
            except Exception as exc:  # a text that does not plan here: explore as before
                log.info("arm plans not compared", error=str(exc)[:200])
                if conn is not None and conn.is_closed():
                    conn = None
                continue
            st = self.states.get(key)
            if st is None:
                continue
            dropped = self.policy.same_plans(st, {a: plan_shape(p) for a, p in plans.items()})
            self.same_plan_retired += len(dropped)
            if dropped and self.m_events is not None:
                self.m_events.labels("same_plan").inc(len(dropped))
            if self.settings.steering_warm_start and st.converged is None:
                try:
                    if await self._warm_start(conn, st, sql, plans) and self.m_events is not None:
                        self.m_events.labels("warm_start").inc()
                except Exception as exc:  # no prediction: the arms start from stock's mean
                    log.info("arms not warm-started", error=str(exc)[:200])

    async def _warm_start(self, conn: Any, st: TemplateState, sql: str,
                          plans: dict[str, Any]) -> bool:  # fmt: skip
        """Predict each live arm's plan with the active cost model; True when it set priors."""
        arms = [a for a in plans if a == STOCK or a not in st.retired]
        if len(arms) < 2:
            return False
        model = await self._cost_model(conn)
        if model is None:
            return False
        import pandas as pd

        from models.dataset import FEATURES, StaticFeatures
        from models.serve import serving_features
        from optimizer.features import plan_features

        if self._static is None or len(self._static.computed) > 5_000:
            self._static = StaticFeatures(None, conn)  # (its caches, bounded)
        self._static.catalog_conn = conn
        fp = compute_fingerprint(sql)
        static = await self._static.features(fp.id, sql, fp.normalized)
        now = datetime.now(UTC)
        rows = [serving_features({**static, **plan_features(plans[a])}, None, now) for a in arms]
        names = list(getattr(model, "feature_names_", FEATURES))
        predicted = model.predict(pd.DataFrame(rows).reindex(columns=names).astype(float))
        self.policy.warm_start(st, dict(zip(arms, map(float, predicted), strict=True)),
                               self._model_sd)  # fmt: skip
        if st.predicted:
            self.warm_started += 1
        return bool(st.predicted)

    async def _cost_model(self, conn: Any) -> Any:
        """The active cost model (looked up at most every `cost_refresh_interval`, when a
        template becomes eligible; loaded again when another version became active)."""
        now = time.monotonic()
        if now - self._model_checked < self.settings.cost_refresh_interval:
            return self._model
        self._model_checked = now
        train = await asyncio.to_thread(importlib.import_module, "models.train")
        from models.registry import Registry, model_dir

        entry = await Registry(conn, model_dir()).active(train.COST)
        version = None if entry is None else (entry.name, entry.version)
        if version != self._model_version:
            self._model = await asyncio.to_thread(train.load_cost_model, entry)
            self._model_version = version
            self._model_sd = error_sd(entry.metrics if entry is not None else {})
        return self._model

    # ---------------------------------------------------------------- A/B against holdout

    def evaluate(self) -> list[dict[str, Any]]:
        """Test each template's chosen arm against its holdout executions; withdraw arms that
        do not beat it. Returns the decisions made (for metadata.optimization_history)."""
        s = self.settings
        out = []
        for key, st in list(self.states.items()):
            arm = st.converged
            if arm is None or arm == STOCK or st.withdrawn:
                continue
            treated = st.samples.get(arm, [])
            control = st.holdout
            if min(len(treated), len(control)) < s.steering_ab_min_holdout:
                continue
            p, ratio = mann_whitney(treated, control)
            # the full sample, or a gain so clear that waiting for it would only cost: half
            # the trial's executions run the slow plan (a stricter bar, as sequential tests
            # spend their alpha: 8 runs of each side, every arm run faster than every stock
            # run, give p = 1 / C(16, 8) = 0.00008)
            enough = (
                len(treated) >= s.steering_ab_min_samples or p < s.steering_ab_alpha * EARLY_ALPHA
            )
            # faster in the middle with confidence, and no slower in total
            better = (enough and p < s.steering_ab_alpha and ratio < 1.0 - s.steering_min_gain
                      and mean_ratio(treated, control) < 1.0)  # fmt: skip
            # slower than the stock plan with confidence: withdrawn at once
            worse = mann_whitney(control, treated)[0] < s.steering_ab_alpha
            if better and self.validated.get(key) != arm:
                self.validated[key] = arm
                out.append(self._decision(key, st, arm, "validate", "validated", p, ratio))
            elif worse or (not better and len(treated) >= 2 * s.steering_ab_min_samples):
                st.withdrawn = True
                self.validated.pop(key, None)
                out.append(self._decision(key, st, arm, "revert", "reverted", p, ratio))
        if out and self.m_events is not None:
            for d in out:
                self.m_events.labels(d["action"]).inc()
        return out

    def _decision(
        self, key: str, st: TemplateState, arm: str, action: str, status: str, p: float,
        ratio: float,
    ) -> dict[str, Any]:  # fmt: skip
        treated, control = st.samples.get(arm, []), st.holdout
        return {
            "kind": "steering",
            "target": st.fingerprint,
            "action": action,
            "status": status,
            "detail": {
                "arm": arm,
                "settings_off": list(ARMS[arm]),
                "template": key[:500],
                "p_value": p,
                "median_ratio": ratio,
                "mean_ratio": mean_ratio(treated, control),
                "n_arm": len(treated),
                "n_holdout": len(control),
                "retired": sorted(st.retired),
                "at": time.time(),
            },
            "before_ms": _median(control),
            "after_ms": _median(treated),
        }

    # ---------------------------------------------------------------- SHOW STEERING

    def rows(self, limit: int | None = None) -> list[tuple[Any, ...]]:
        """SHOW STEERING: every template steering has seen enough of (or pinned), the most
        executed first."""
        out: list[tuple[int, tuple[Any, ...]]] = []
        for key, st in self.states.items():
            stock = st.arms[STOCK]
            if stock.n < self.policy.min_pulls and st.fingerprint not in self.pins:
                continue
            status = (
                f"pinned:{self.pins[st.fingerprint]}" if st.fingerprint in self.pins
                else "withdrawn" if st.withdrawn
                else "validated" if key in self.validated
                else f"converged:{st.converged}" if st.converged
                else "exploring" if st.decisions else "watching"
            )  # fmt: skip
            arms = ", ".join(
                (f"{a}={_ms(v.mean):.1f}ms/{v.n}" if v.n else f"{a}=untried")
                + (f" (model x{math.exp(st.predicted[a]):.2f})" if a in st.predicted else "")
                for a, v in st.arms.items() if v.n or a in st.predicted
            )  # fmt: skip
            row = (st.fingerprint, status, arms, ", ".join(sorted(st.retired)),
                   len(st.holdout), key[:120])  # fmt: skip
            out.append((sum(v.n for v in st.arms.values()) + len(st.holdout), row))
        out.sort(key=lambda r: -r[0])
        rows = [row for _, row in out]
        return rows if limit is None else rows[:limit]


async def explain_arms(conn: Any, sql: str, custom: bool = False) -> dict[str, Any]:
    """EXPLAIN (FORMAT JSON) of `sql` under each arm's switches (SET LOCAL in a transaction
    of its own, rolled back), parsed; `custom`: an EXECUTE, planned for its values as steered
    runs are."""
    plans = {}
    for arm, switches in ARMS.items():
        async with conn.transaction():
            for name in switches:  # names of ARMS, never client input
                await conn.execute(f"SET LOCAL {name} = off")
            if custom:
                await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            doc = await conn.fetchval("EXPLAIN (FORMAT JSON) " + sql)
            plans[arm] = json.loads(doc) if isinstance(doc, str | bytes) else doc
    return plans


def error_sd(metrics: dict[str, Any]) -> float:
    """The sd of a cost model's log-latency error from its held-out q-error p90 (q-error is
    exp|log error|; for a normal error its p90 is 1.645 sd); 0.5 when the card has none."""
    test = metrics.get("test", metrics)
    q90 = test.get("qerror_p90") if isinstance(test, dict) else None
    if not isinstance(q90, int | float) or not q90 > 1 or not math.isfinite(q90):
        return 0.5
    return math.log(q90) / 1.645


def _ms(log_ms: float) -> float:
    return math.exp(log_ms)


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[len(s) // 2]
