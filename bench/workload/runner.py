"""Drives a plan through pgsage over the wire: clients per user, the clock, labels, progress.

One asyncio task dispatches the plan's arrivals at the real moment their simulated time comes
(`SimClock.real_at`), into one queue per user; one task per user owns that user's connection and
runs its arrivals in order. Client paths, as the roles ask:

- ``simple``: psycopg with client-side binding (`AsyncClientCursor`): the simple query protocol.
- ``extended``: asyncpg: Parse/Bind/Execute with its cache of named prepared statements.
- ``named``: psycopg with ``prepare_threshold=5``: unnamed extended statements until a text has
  run five times, then a named prepared statement (``_pg3_N``), like pgjdbc's S_N statements.

At start the runner sets pgsage's simulated clock through the admin console (dbname ``pgsage``),
anchors its own clock at the same moment, and writes the run and its anomaly labels to
`metadata.workload_runs` / `metadata.workload_labels`; at the end it fills in what was sent.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bench.warehouse import connect_kwargs
from warehouse_sql import apply_migrations

from .anomalies import Anomaly
from .clock import SimClock
from .plan import Plan, PlanConfig
from .roles import ROLE_BY_NAME, Arrival, Statement
from .templates import Profile

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:6432/warehouse"
ADMIN_DATABASE = "pgsage"
CONTROL_APP = "pgsage-workload-control"
ANOMALY_APP = "pgsage-workload-anomaly"
SETTINGS_TEMPLATE = "(planner settings)"
_PLACEHOLDER = re.compile(r"\$(\d+)")


@dataclass
class RunConfig:
    dsn: str = DEFAULT_DSN
    plan: PlanConfig = field(
        default_factory=lambda: PlanConfig(
            seed=7, start=datetime(2026, 1, 26, tzinfo=UTC), speed=2000.0, duration=300.0, qps=80
        )
    )
    set_proxy_clock: bool = True
    progress: bool = True
    statement_timeout_ms: int = 30_000
    drain_seconds: float = 5.0  # after the duration, to finish what is queued


@dataclass
class RunResult:
    run_id: str
    planned: int
    executed: int
    errors: int
    dropped: int
    elapsed: float
    sim_start: datetime
    sim_end: datetime
    proxy_clock: bool
    max_lag: float  # real seconds an arrival was sent after its due moment, at worst
    #: (role, template, path, status) -> [count, total seconds]
    stats: dict[tuple[str, str, str, str], list[float]]
    labels: dict[str, tuple[int, int]]  # label -> (expected, executed)
    schedule: list[Anomaly]


# --------------------------------------------------------------------------- client paths


def _to_psycopg(sql: str) -> tuple[str, list[int]]:
    """`$n` placeholders to psycopg's `%s` (and the parameter index each one takes)."""
    order = [int(m.group(1)) - 1 for m in _PLACEHOLDER.finditer(sql)]
    return _PLACEHOLDER.sub("%s", sql.replace("%", "%%")), order


class Client:
    path = ""

    def __init__(self, dsn: str, app: str, timeout_ms: int) -> None:
        self.dsn, self.app, self.timeout_ms = dsn, app, timeout_ms

    async def connect(self) -> None:
        raise NotImplementedError

    async def run(self, sql: str, params: tuple[Any, ...]) -> None:
        raise NotImplementedError

    async def control(self, sql: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class PsycopgClient(Client):
    path = "simple"

    def __init__(self, dsn: str, app: str, timeout_ms: int) -> None:
        super().__init__(dsn, app, timeout_ms)
        self.conn: Any = None
        self._sql: dict[str, tuple[str, list[int]]] = {}

    def _options(self) -> dict[str, Any]:
        return {"cursor_factory": psycopg.AsyncClientCursor, "prepare_threshold": None}

    async def connect(self) -> None:
        self.conn = await psycopg.AsyncConnection.connect(
            self.dsn,
            autocommit=True,
            application_name=self.app,
            options=f"-c statement_timeout={self.timeout_ms}",
            **self._options(),
        )

    async def run(self, sql: str, params: tuple[Any, ...]) -> None:
        conv = self._sql.get(sql)
        if conv is None:
            conv = self._sql[sql] = _to_psycopg(sql)
        text, order = conv
        async with self.conn.cursor() as cur:
            await cur.execute(text, [params[i] for i in order])
            if cur.description is not None:
                await cur.fetchall()

    async def control(self, sql: str) -> None:
        await self.conn.execute(sql)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


class NamedClient(PsycopgClient):
    path = "named"

    def _options(self) -> dict[str, Any]:
        return {"prepare_threshold": 5}


class AsyncpgClient(Client):
    path = "extended"

    def __init__(self, dsn: str, app: str, timeout_ms: int) -> None:
        super().__init__(dsn, app, timeout_ms)
        self.conn: Any = None

    async def connect(self) -> None:
        kwargs = connect_kwargs(self.dsn)
        settings = kwargs.setdefault("server_settings", {})
        settings.update(application_name=self.app, statement_timeout=str(self.timeout_ms))
        self.conn = await asyncpg.connect(**kwargs)

    async def run(self, sql: str, params: tuple[Any, ...]) -> None:
        await self.conn.fetch(sql, *params)

    async def control(self, sql: str) -> None:
        await self.conn.execute(sql)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


CLIENTS: dict[str, type[Client]] = {
    "simple": PsycopgClient,
    "extended": AsyncpgClient,
    "named": NamedClient,
}


def _planner_sql(names: tuple[str, ...], value: str) -> str:
    return "SELECT " + ", ".join(f"set_config('{n}', '{value}', false)" for n in names)


# --------------------------------------------------------------------------- the run


class Runner:
    def __init__(self, config: RunConfig, console: Console | None = None) -> None:
        self.config = config
        self.console = console or Console(stderr=True)
        self.run_id = ""
        self.stats: dict[tuple[str, str, str, str], list[float]] = defaultdict(lambda: [0, 0.0])
        self.label_sent: Counter[str] = Counter()
        self.executed = self.errors = self.dropped = self.planned = 0
        self.max_lag = 0.0
        self.queues: dict[tuple[str, int], asyncio.Queue[Arrival | None]] = {}
        self.workers: list[asyncio.Task[None]] = []
        self.holders: list[asyncio.Task[None]] = []
        self.clock: SimClock | None = None
        self.sim_now = config.plan.start

    # ---- setup

    async def _control(self) -> Any:
        kwargs = connect_kwargs(self.config.dsn)
        kwargs.setdefault("server_settings", {})["application_name"] = CONTROL_APP
        return await asyncpg.connect(**kwargs)

    async def _set_proxy_clock(self) -> bool:
        """Set pgsage's simulated clock through its admin console; False if there is none."""
        pc = self.config.plan
        params = conninfo_to_dict(self.config.dsn)
        params["dbname"] = ADMIN_DATABASE
        try:
            conn = await psycopg.AsyncConnection.connect(make_conninfo(**params), autocommit=True)
        except psycopg.Error as exc:
            self.console.print(f"[yellow]no pgsage admin console ({exc}); clock not set[/]")
            return False
        try:
            await conn.execute(f"SET clock_start = '{pc.start.isoformat()}'")
            await conn.execute(f"SET clock_speed = {pc.speed:g}")
        finally:
            await conn.close()
        return True

    async def _write_labels(self, conn: Any, plan: Plan, expected: Counter[str]) -> None:
        pc = plan.config
        await conn.execute(
            "INSERT INTO metadata.workload_runs (run_id, seed, clock_start, clock_speed,"
            " duration_s, qps, users, planned) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8)",
            self.run_id, pc.seed, pc.start, pc.speed, pc.duration, pc.qps,
            _json(pc.users), self.planned,
        )  # fmt: skip
        await conn.executemany(
            "INSERT INTO metadata.workload_labels (label, run_id, kind, window_start, window_end,"
            " affected_templates, expected_executions, description, detail)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb)",
            [
                (a.label, self.run_id, a.kind, *a.window, list(a.templates),
                 expected.get(a.label, 0), a.description, _json(a.detail))
                for a in plan.schedule
            ],
        )  # fmt: skip

    async def _finish_labels(self, conn: Any, plan: Plan) -> None:
        await conn.executemany(
            "UPDATE metadata.workload_labels SET executed = $2 WHERE label = $1",
            [(a.label, self.label_sent.get(a.label, 0)) for a in plan.schedule],
        )
        await conn.execute(
            "UPDATE metadata.workload_runs SET executed = $2, errors = $3, finished_at = now()"
            " WHERE run_id = $1",
            self.run_id,
            self.executed,
            self.errors,
        )

    # ---- workers

    async def _worker(self, role: str, user: int, queue: asyncio.Queue[Arrival | None]) -> None:
        path = ROLE_BY_NAME[role].path
        client = CLIENTS[path](
            self.config.dsn, ROLE_BY_NAME[role].application_name, self.config.statement_timeout_ms
        )
        connected = False
        try:
            while True:
                arrival = await queue.get()
                if arrival is None:
                    return
                if not connected:
                    try:
                        await client.connect()
                        connected = True
                    except (OSError, psycopg.Error, asyncpg.PostgresError) as exc:
                        self._record(role, "(connect)", path, "error", 0.0)
                        self.console.print(f"[red]{role} user {user}: cannot connect: {exc}[/]")
                        continue
                for st in arrival.statements:
                    await self._execute(client, role, path, st)
        finally:
            if connected:
                await client.close()

    async def _execute(self, client: Client, role: str, path: str, st: Statement) -> None:
        if st.disable:
            await self._timed(
                client, role, path, SETTINGS_TEMPLATE, _planner_sql(st.disable, "off")
            )
        await self._timed(client, role, path, st.template, st.sql, st.params, st.label)
        if st.disable:
            await self._timed(client, role, path, SETTINGS_TEMPLATE, _planner_sql(st.disable, "on"))

    async def _timed(
        self,
        client: Client,
        role: str,
        path: str,
        template: str,
        sql: str,
        params: tuple[Any, ...] = (),
        label: str | None = None,
    ) -> None:
        if label:
            # counted when sent: a statement cut off at the end is still in the query log
            self.label_sent[label] += 1
        t0 = time.perf_counter()
        status = "ok"
        try:
            if template == SETTINGS_TEMPLATE:
                await client.control(sql)
            else:
                await client.run(sql, params)
        except (psycopg.Error, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            status = _status(exc)
        self._record(role, template, path, status, time.perf_counter() - t0)

    def _record(self, role: str, template: str, path: str, status: str, seconds: float) -> None:
        s = self.stats[(role, template, path, status)]
        s[0] += 1
        s[1] += seconds
        self.executed += 1
        if status != "ok":
            self.errors += 1

    async def _hold_lock(self, table: str, until: float, label: str | None) -> None:
        """The lock anomaly: a background transaction holding `table` until simulated `until`."""
        assert self.clock is not None
        conn = await self._anomaly_connection()
        try:
            async with conn.transaction():
                await conn.execute("SET LOCAL lock_timeout = '5s'")
                await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                await asyncio.sleep(max(0.0, self.clock.real_at(until) - time.monotonic()))
        except asyncpg.PostgresError as exc:
            self.console.print(f"[yellow]lock anomaly {label} on {table} failed: {exc}[/]")
        finally:
            await conn.close()

    async def _anomaly_connection(self) -> Any:
        kwargs = connect_kwargs(self.config.dsn)
        kwargs.setdefault("server_settings", {})["application_name"] = ANOMALY_APP
        return await asyncpg.connect(**kwargs)

    # ---- dispatch

    async def _dispatch(self, plan: Plan, deadline: float) -> None:
        assert self.clock is not None
        sent = 0
        for n, arrival in enumerate(plan.arrivals()):
            due = self.clock.real_at(arrival.sim)
            now = time.monotonic()
            if due - now > 0.002:
                await asyncio.sleep(due - now)
                now = time.monotonic()
            if now >= deadline:
                break
            self.max_lag = max(self.max_lag, now - due)
            self.sim_now = datetime.fromtimestamp(arrival.sim, UTC)
            sent += len(arrival.statements)
            if arrival.hold is not None:
                table, until = arrival.hold
                self.holders.append(
                    asyncio.create_task(self._hold_lock(table, until, arrival.label))
                )
                continue
            key = (arrival.role, arrival.user)
            queue = self.queues.get(key)
            if queue is None:
                queue = self.queues[key] = asyncio.Queue()
                self.workers.append(asyncio.create_task(self._worker(*key, queue)))
            queue.put_nowait(arrival)
            if n % 100 == 99:
                await asyncio.sleep(0)  # let workers run even when we are behind
        self.dropped = self.planned - sent

    def backlog(self) -> int:
        return sum(q.qsize() for q in self.queues.values())

    async def run(self) -> RunResult:
        cfg = self.config
        pc = cfg.plan
        pc.run_tag = secrets.token_hex(3)
        self.run_id = f"wl-{datetime.now(UTC):%Y%m%dT%H%M%S}-{pc.run_tag}"
        control = await self._control()
        try:
            if cfg.set_proxy_clock:
                # the set-up below goes through pgsage too: stamp it on the simulated clock
                # (set again, exactly, right before the run), not the real one, or a handful of
                # rows months away from the rest would stretch every time window of the log
                await self._set_proxy_clock()
            await apply_migrations(control)
            profile = await Profile.load(control)
            plan = Plan(pc, profile)
            expected = Counter[str]()
            for a in plan.arrivals():
                self.planned += len(a.statements)
                for st in a.statements:
                    if st.label:
                        expected[st.label] += 1
            await self._write_labels(control, plan, expected)
            proxy_clock = await self._set_proxy_clock() if cfg.set_proxy_clock else False
            self.clock = SimClock(pc.start, pc.speed)
            t0 = time.monotonic()
            await self._drive(plan, t0 + pc.duration)
            elapsed = time.monotonic() - t0
            await self._finish_labels(control, plan)
        finally:
            await control.close()
        return RunResult(
            run_id=self.run_id, planned=self.planned, executed=self.executed, errors=self.errors,
            dropped=self.dropped, elapsed=elapsed, sim_start=pc.start,
            sim_end=datetime.fromtimestamp(pc.sim_end, UTC), proxy_clock=proxy_clock,
            max_lag=self.max_lag, stats=dict(self.stats),
            labels={a.label: (expected.get(a.label, 0), self.label_sent.get(a.label, 0))
                    for a in plan.schedule},
            schedule=plan.schedule,
        )  # fmt: skip

    async def _drive(self, plan: Plan, deadline: float) -> None:
        progress = _progress(self.console) if self.config.progress else None
        ticker = None
        if progress is not None:
            progress.start()
            task = progress.add_task(
                "workload",
                total=plan.config.duration,
                executed=0,
                errors=0,
                backlog=0,
                sim=f"{plan.config.start:%a %Y-%m-%d %H:%M}",
            )
            ticker = asyncio.create_task(self._tick(progress, task, deadline))
        try:
            await self._dispatch(plan, deadline)
            for q in self.queues.values():
                q.put_nowait(None)
            drained = asyncio.gather(*self.workers, *self.holders)
            try:
                await asyncio.wait_for(asyncio.shield(drained), self.config.drain_seconds)
            except TimeoutError:
                self.dropped += sum(
                    len(a.statements) for q in self.queues.values() for a in _pending(q)
                )
                for w in self.workers:
                    w.cancel()
                await asyncio.gather(*self.workers, *self.holders, return_exceptions=True)
        finally:
            if ticker is not None:
                ticker.cancel()
            if progress is not None:
                progress.stop()

    async def _tick(self, progress: Progress, task: Any, deadline: float) -> None:
        start = deadline - self.config.plan.duration
        while True:
            progress.update(
                task,
                completed=min(time.monotonic() - start, self.config.plan.duration),
                executed=self.executed,
                errors=self.errors,
                backlog=self.backlog(),
                sim=f"{self.sim_now:%a %Y-%m-%d %H:%M}",
            )
            await asyncio.sleep(0.25)


def _pending(queue: asyncio.Queue[Arrival | None]) -> list[Arrival]:
    out = []
    while not queue.empty():
        item = queue.get_nowait()
        if item is not None:
            out.append(item)
    return out


def _status(exc: BaseException) -> str:
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate == "57014":
        return "cancelled"
    return "error"


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]workload"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("executed [green]{task.fields[executed]:,}[/]"),
        TextColumn("errors [red]{task.fields[errors]:,}[/]"),
        TextColumn("backlog {task.fields[backlog]:,}"),
        TextColumn("[cyan]{task.fields[sim]}"),
        console=console,
        transient=False,
    )


def run_workload(config: RunConfig, console: Console | None = None) -> RunResult:
    return asyncio.run(Runner(config, console).run())
