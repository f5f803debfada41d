"""Plan steering gain: steering on vs off, interleaved, on the simulated workload's reads and on
a suite of planner traps.

    python -m bench.gain_steering               # or: python -m bench.gain --steering
    python -m bench.gain_steering --scale 1 --rounds 12 --per-template 4

Two `pgsage serve` processes in front of the same PostgreSQL, one with `steering_enabled`
(holdout 10%), one without. Each round runs the same list of statements (each read template of
the workload simulator with a few parameter sets drawn from the warehouse, plus the traps)
through both, in alternating order, timing each execution and hashing each result; rounds
continue while the bandit explores and converges.

* `time_reduction`: 1 - (time with steering) / (time without), over the eligible statements of
  the second half of the rounds (after convergence); reported for the workload and the traps;
* `wrong_results`: executions whose result (as a multiset) differed between the two sides,
  except where the query is `ORDER BY ... LIMIT` and the two differ only among rows tied on the
  sort key at the cut (both are valid answers; the stock planner may return either): those
  are counted apart as `tie_differences`;
* `worst_p95_regression`: the largest p95(on) / p95(off) - 1 of any template after its
  convergence: SHOW STEERING is read after every round, and a template's p95s are taken over
  the rounds after the first that found it settled (converged, validated or withdrawn), both
  sides, when at least `MIN_AFTER` rounds remain; otherwise (and for templates steering never
  settled) over the second half;
* `success_rate`: of the templates steering moved off the stock plan, the share whose median
  improved by at least 5%;
* `time_reduction_exploring`: the same reduction over the first half of the rounds, while
  the bandit explores: what exploration costs (negative) or already gains; the warm start
  from an active cost model (`--no-warm-start` turns it off) acts here.

Each template's SHOW STEERING row (arms tried, the cost model's predicted ratios) is kept in
the JSON; so is the cost model version active in the database when the run started.

Writes `bench/results/gain.json` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import asyncpg
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.machine import load_average, warn_if_busy
from bench.overhead import Upstream, free_port, start_pgsage
from bench.warehouse import init_warehouse_async
from bench.workload.templates import TEMPLATES, Profile, Sampler

RESULTS = Path(__file__).parent / "results" / "gain.json"
#: SHOW STEERING statuses of a template steering has settled
SETTLED = ("converged:", "validated", "withdrawn", "pinned:")
#: fewer rounds than this after convergence: the p95s are the second half's
MIN_AFTER = 5

TRAP_SETUP = """
CREATE SCHEMA IF NOT EXISTS traps;
DROP TABLE IF EXISTS traps.events;
CREATE TABLE traps.events (id int PRIMARY KEY, kind int NOT NULL, payload text);
INSERT INTO traps.events
    SELECT i, CASE WHEN i > 392000 THEN (i % 4) + 1 ELSE i % 96 + 8 END, md5(i::text)
    FROM generate_series(1, 400000) i;
CREATE INDEX ON traps.events (kind);
ANALYZE traps.events;
"""
#: the stock planner walks the primary key expecting early matches that only come at the end
TRAPS = (
    ("trap_latest_kind", "SELECT id, payload FROM traps.events WHERE kind = $1 ORDER BY id"
     " LIMIT 20", [(1,), (2,), (3,), (4,)]),
    ("trap_first_kind", "SELECT id FROM traps.events WHERE kind = $1 ORDER BY id LIMIT 5",
     [(1,), (3,)]),
)  # fmt: skip


def _digest(rows: list[Any]) -> str:
    h = sorted(
        hashlib.blake2b(repr(tuple(r.values())).encode(), digest_size=8).hexdigest() for r in rows
    )
    return hashlib.blake2b("".join(h).encode(), digest_size=8).hexdigest()


async def _statements(args: argparse.Namespace) -> list[tuple[str, str, tuple]]:
    await init_warehouse_async(args.dsn, args.scale, args.seed, args.database, progress=True)
    conn = await asyncpg.connect(args.dsn, database=args.database)
    try:
        await conn.execute(TRAP_SETUP)
        profile = await Profile.load(conn)
    finally:
        await conn.close()
    sampler = Sampler(profile, np.random.default_rng(args.seed))
    out: list[tuple[str, str, tuple]] = []
    for t in TEMPLATES:
        if t.writes or t.anomaly_only or t.kind == "error":
            continue
        for _ in range(args.per_template):
            out.append((t.name, t.sql, t.params(sampler)))
    for name, sql, params in TRAPS:
        out.extend((name, sql, p) for p in params)
    return out


async def _round(
    target: str, stmts: list[tuple[str, str, tuple]], protocol: str = "extended"
) -> list[tuple[float, Any]]:
    if protocol == "literal":
        return await _round_literal(target, stmts)
    conn = await asyncpg.connect(target, command_timeout=120)
    try:
        out = []
        for _, sql, params in stmts:
            t0 = time.perf_counter()
            rows = await conn.fetch(sql, *params)
            out.append((time.perf_counter() - t0, rows))
        return out
    finally:
        await conn.close()


def client_side(sql: str) -> str:
    """$n placeholders -> psycopg's %(pn)s (a literal % doubled), for client-side binding."""
    import re

    return re.sub(r"\$(\d+)", r"%(p\1)s", sql.replace("%", "%%"))


async def _round_literal(
    target: str, stmts: list[tuple[str, str, tuple]]
) -> list[tuple[float, Any]]:
    """As psql, psycopg2 and most BI tools send statements: literals bound on the client, one
    simple-protocol Query each (psycopg's client-side-binding cursor)."""
    import psycopg
    from psycopg.rows import dict_row

    conn = await psycopg.AsyncConnection.connect(
        target, autocommit=True, row_factory=dict_row, cursor_factory=psycopg.AsyncClientCursor
    )
    try:
        out = []
        for _, sql, params in stmts:
            text = client_side(sql)
            values = {f"p{i + 1}": v for i, v in enumerate(params)}
            t0 = time.perf_counter()
            cur = await conn.execute(text, values)
            rows = await cur.fetchall()
            out.append((time.perf_counter() - t0, [_Row(r) for r in rows]))
        return out
    finally:
        await conn.close()


class _Row(dict):  # type: ignore[type-arg]
    """A psycopg dict row that answers `values()` and `keys()` like an asyncpg Record."""


def sort_keys(sql: str) -> list[str] | None:
    """Output column names of a LIMIT query's ORDER BY (None: no LIMIT, or not plain columns)."""
    import sqlglot
    from sqlglot import exp

    tree = sqlglot.parse_one(sql, read="postgres")
    if not isinstance(tree, exp.Select) or tree.args.get("limit") is None:
        return None
    order = tree.args.get("order")
    if order is None:
        return []
    keys = []
    for o in order.expressions:
        col = o.this
        if not isinstance(col, exp.Column):
            return None
        keys.append(col.name)
    return keys


def same_result(sql: str, a: list[Any], b: list[Any]) -> bool:
    """Equal as multisets, or (ORDER BY ... LIMIT) different only within the last tie group:
    both are valid answers, the planner may return either."""
    if _digest(a) == _digest(b):
        return True
    keys = sort_keys(sql)
    if not keys or len(a) != len(b) or not a:
        return False
    if not all(k in a[0].keys() for k in keys):  # noqa: SIM118 (asyncpg Record: in tests values)
        return False

    def key(r: Any) -> tuple[Any, ...]:
        return tuple(r[k] for k in keys)

    boundary = key(a[-1])
    if key(b[-1]) != boundary:
        return False
    if [key(r) for r in a] != [key(r) for r in b]:
        return False  # the sort keys, in order, must agree exactly
    outside_a = [r for r in a if key(r) != boundary]
    outside_b = [r for r in b if key(r) != boundary]
    return _digest(outside_a) == _digest(outside_b)


def benchmark(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    stmts = asyncio.run(_statements(args))
    cost_model = asyncio.run(_active_cost_model(args))
    u = urlparse(args.dsn)
    upstream = Upstream(u.hostname or "127.0.0.1", u.port or 5432, u.username or "postgres")
    workdir = Path(tempfile.mkdtemp(prefix="pgsage-gain-steering-"))
    children, ports = {}, {}
    try:
        for mode, env in (
            ("off", {"PGSAGE_STEERING_ENABLED": "false"}),
            ("on", {"PGSAGE_STEERING_ENABLED": "true",
                    "PGSAGE_STEERING_MIN_MS": str(args.min_ms),
                    "PGSAGE_STEERING_SEED": str(args.seed),
                    "PGSAGE_STEERING_EVAL_INTERVAL": str(args.eval_interval),
                    "PGSAGE_STEERING_WARM_START": str(args.warm_start).lower(),
                    "PGSAGE_REWRITE_ENABLED": str(args.rewrites).lower()}),
        ):  # fmt: skip
            p, h = free_port(), free_port()
            children[mode] = start_pgsage(upstream, workdir, p, h, args.pgsage, args.database,
                                          None, env, name=f"pgsage-steer-{mode}")  # fmt: skip
            ports[mode] = p
        for mode, child in children.items():
            child.wait_ready("127.0.0.1", ports[mode], lambda: None, timeout=60)
        decided: dict[str, str] = {}
        targets = {
            m: f"postgresql://postgres@127.0.0.1:{p}/{args.database}" for m, p in ports.items()
        }
        times: dict[str, list[list[float]]] = {"on": [], "off": []}
        statuses: list[dict[str, str]] = []
        mismatched: dict[str, int] = {}
        tie_only: dict[str, int] = {}
        with Progress(console=console, transient=True) as bars:
            task = bars.add_task("rounds", total=args.rounds)
            for r in range(args.rounds):
                order = ("on", "off") if r % 2 == 0 else ("off", "on")
                res = {m: asyncio.run(_round(targets[m], stmts, args.protocol)) for m in order}
                for (name, sql, _), a, b in zip(stmts, res["on"], res["off"], strict=True):
                    if _digest(a[1]) != _digest(b[1]):
                        tied = same_result(sql, a[1], b[1])
                        bucket = tie_only if tied else mismatched
                        bucket[name] = bucket.get(name, 0) + 1
                for m in ("on", "off"):
                    times[m].append([t for t, _ in res[m]])
                statuses.append(
                    {n: row[1] for n, row in _steering_rows(ports["on"], stmts).items()}
                )
                bars.advance(task)
        shown = _steering_rows(ports["on"], stmts)
        decided = {name: row[1] for name, row in shown.items()}
    finally:
        for child in children.values():
            child.stop()
    doc = summarise(stmts, times, mismatched, tie_only, args, decided, statuses)
    doc["config"]["cost_model"] = cost_model
    for row in doc["templates"]:
        if row["template"] in shown:
            row["arms"], row["retired"] = shown[row["template"]][2:4]
    return doc


async def _active_cost_model(args: argparse.Namespace) -> str | None:
    """The cost model version active in the bench database (what the warm start reads)."""
    conn = await asyncpg.connect(args.dsn, database=args.database)
    try:
        return await conn.fetchval(
            "SELECT model_name || ':v' || version FROM ml.model_registry"
            " WHERE model_name = 'cost' AND is_active"
        )
    except asyncpg.PostgresError:
        return None
    finally:
        await conn.close()


async def _steering_status(port: int, stmts: list[tuple[str, str, tuple]]) -> dict[str, str]:
    """Template name -> status in the steering pgsage's SHOW STEERING."""
    return {name: row[1] for name, row in _steering_rows(port, stmts).items()}


def _steering_rows(port: int, stmts: list[tuple[str, str, tuple]]) -> dict[str, list[str]]:
    """Template name -> its row of the steering pgsage's SHOW STEERING (admin console, which
    speaks the simple protocol only: psql)."""
    import subprocess

    out = subprocess.run(
        ["psql", "-X", "-A", "-t", "-F", "\t", "-h", "127.0.0.1", "-p", str(port), "-U",
         "postgres", "-d", "pgsage", "-c", "SHOW STEERING LIMIT 10000"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    from optimizer.fingerprint import compute_fingerprint

    by_fp = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 6:
            by_fp[parts[0]] = parts
    # by fingerprint: the same for the $n text and for the text with literals bound on the
    # client (whose normalised form has a $n for every literal, a LIMIT's count included)
    return {
        name: by_fp[fp] for name, sql, _ in stmts if (fp := compute_fingerprint(sql).id) in by_fp
    }


def settled_from(statuses: list[dict[str, str]], name: str, rounds: int) -> int | None:
    """The first round after the one whose SHOW STEERING found `name` settled, if at least
    MIN_AFTER rounds remain from there."""
    for i, seen in enumerate(statuses):
        if seen.get(name, "").startswith(SETTLED):
            return i + 1 if rounds - (i + 1) >= MIN_AFTER else None
    return None


def summarise(stmts: list[tuple[str, str, tuple]], times: dict[str, list[list[float]]],
              mismatched: dict[str, int], tie_only: dict[str, int], args: Any,
              decided: dict[str, str],
              statuses: list[dict[str, str]] | None = None) -> dict[str, Any]:  # fmt: skip
    half = len(times["on"]) // 2
    per: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"on": [], "off": []})
    early: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"on": [], "off": []})
    for m in ("on", "off"):
        for i, rnd in enumerate(times[m]):
            for (name, _, _), t in zip(stmts, rnd, strict=True):
                (per if i >= half else early)[name][m].append(t)
    # eligible: templates whose stock (off) median reaches the steering threshold
    eligible = {n for n, d in per.items() if statistics.median(d["off"]) * 1000 >= args.min_ms}
    rows = []
    rounds = len(times["on"])
    for name, d in sorted(per.items()):
        off_med, on_med = statistics.median(d["off"]), statistics.median(d["on"])
        p95 = lambda v: sorted(v)[min(len(v) - 1, int(len(v) * 0.95))]  # noqa: E731
        start = settled_from(statuses or [], name, rounds)
        tail = d
        if start is not None:  # after convergence: every execution of those rounds
            positions = [i for i, (n, _, _) in enumerate(stmts) if n == name]
            tail = {m: [times[m][r][i] for r in range(start, rounds) for i in positions]
                    for m in ("on", "off")}  # fmt: skip
        rows.append({
            "template": name,
            "eligible": name in eligible,
            "trap": name.startswith("trap_"),
            "off_median_ms": 1000 * off_med,
            "on_median_ms": 1000 * on_med,
            "p95_ratio": p95(tail["on"]) / p95(tail["off"]),
            "p95_from_round": start if start is not None else half,
            "speedup": off_med / on_med,
            "steering": decided.get(name),
        })  # fmt: skip

    def reduction(select: Any, part: dict[str, dict[str, list[float]]] = per) -> float | None:
        sel = [r for r in rows if r["eligible"] and select(r)]
        off = sum(sum(part[r["template"]]["off"]) for r in sel)
        on = sum(sum(part[r["template"]]["on"]) for r in sel)
        return 1 - on / off if off else None

    eligible_rows = [r for r in rows if r["eligible"]]
    # applied optimisations: templates the bandit settled on a non-stock arm for
    moved = [r for r in rows if (r["steering"] or "").startswith(("converged:", "validated"))
             and r["steering"] != "converged:stock"]  # fmt: skip
    improved = [r for r in moved if r["speedup"] >= 1.05]
    return {
        "benchmark": "steering",
        "time_reduction": reduction(lambda r: True),
        "time_reduction_workload": reduction(lambda r: not r["trap"]),
        "time_reduction_traps": reduction(lambda r: r["trap"]),
        "time_reduction_exploring": reduction(lambda r: True, early),
        "time_reduction_exploring_workload": reduction(lambda r: not r["trap"], early),
        "wrong_results": sum(mismatched.values()),
        "wrong_results_by_template": mismatched,
        "tie_differences": tie_only,
        "worst_p95_regression": max((r["p95_ratio"] - 1 for r in eligible_rows), default=None),
        "success_rate": len(improved) / len(moved) if moved else None,
        "templates_eligible": len(eligible_rows),
        "templates_changed": len(moved),
        "average_gain_of_improved": statistics.mean(1 - 1 / r["speedup"] for r in improved)
        if improved else None,
        "config": {"scale": args.scale, "rounds": args.rounds, "per_template": args.per_template,
                   "min_ms": args.min_ms, "statements_per_round": len(stmts),
                   "protocol": args.protocol, "rewrites": args.rewrites,
                   "eval_interval": args.eval_interval, "warm_start": args.warm_start},
        "templates": rows,
    }  # fmt: skip


def render(doc: dict[str, Any]) -> Table:
    t = Table(title="plan steering: on vs off (second half of the rounds, interleaved)")
    for col in ("template", "off median ms", "on median ms", "speedup", "p95 on/off",
                "steering"):  # fmt: skip
        t.add_column(col, justify="right")
    for r in doc["templates"]:
        if r["eligible"]:
            t.add_row(r["template"], f"{r['off_median_ms']:.2f}", f"{r['on_median_ms']:.2f}",
                      f"{r['speedup']:.2f}", f"{r['p95_ratio']:.2f}",
                      r["steering"] or "-")  # fmt: skip

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    t.caption = (
        f"time reduction {pct(doc['time_reduction'])} (workload "
        f"{pct(doc['time_reduction_workload'])}, traps {pct(doc['time_reduction_traps'])}); "
        f"wrong results {doc['wrong_results']}; worst p95 regression "
        f"{pct(doc['worst_p95_regression'])}; success rate {pct(doc['success_rate'])}; "
        f"first half (exploring) {pct(doc['time_reduction_exploring'])}"
    )
    return t


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gain_steering", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--database", default="pgsage_bench_steering")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--per-template", type=int, default=3)
    ap.add_argument("--min-ms", type=float, default=20.0)
    ap.add_argument(
        "--eval-interval",
        type=float,
        default=30.0,
        help="pgsage's steering_eval_interval (its default, 30 s, lets a 30-round run see about"
        " five evaluations; 2 s keeps the A/B tests at the pace of the run: one run each gave"
        " -38.1%% and -31.1%% overall, -20.3%% and -12.7%% on the workload: noise dominates)",
    )
    ap.add_argument(
        "--protocol",
        choices=("extended", "literal"),
        default="extended",
        help="extended: asyncpg, server-side parameters; literal: client-side"
        " binding, simple-protocol Query (psql, psycopg2, most BI tools)",
    )
    ap.add_argument("--rewrites", action="store_true",
                    help="equivalence-checked rewrites on too (simple-protocol Query texts,"
                    " and extended-protocol Parse texts, proven with bound values)")  # fmt: skip
    ap.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=True,
                    help="steering_warm_start of the steering pgsage (acts only where a cost"
                    " model is active in the database: train one on its log first)")  # fmt: skip
    ap.add_argument("--pgsage", default=str(Path(sys.executable).with_name("pgsage")))
    ap.add_argument("--out", type=Path, default=RESULTS)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = warn_if_busy("every template's timings, on both sides")
    doc = benchmark(args, Console(stderr=True))
    doc["loadavg_at_start"], doc["loadavg_at_end"] = load_start, load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "templates"}, indent=2))
    Console().print(render(doc))
    return 0 if doc["wrong_results"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
