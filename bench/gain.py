"""What pgsage's optimisers gain, measured for real. Modes (one per optimiser):

    python -m bench.gain --advisor [--scale 2 --statements 800 --budget-share 0.3]

``--advisor`` (the index advisor, issue 7): on the simulated workload over the synthetic
warehouse (`bench.warehouse`, `bench.workload`), in a database of its own (``pgsage_gain``):

1. init the warehouse at ``--scale`` (kept between runs when the scale and seed match);
2. drop every index an earlier run left (``pgsage_*``), so each run starts from the seed schema;
3. run ``--statements`` statements of the simulator's plan (anomalies off) directly against the
   warehouse with their literals inlined (as psycopg's simple path sends them), and write them
   to ``metadata.query_logs`` the way pgsage logs them (fingerprint, normalized text, literal
   text, duration), so the advisor reads exactly what it would read behind the proxy;
4. ask the advisor (`models.advisor.advise`, HypoPG what-if) for its ranked recommendations;
5. the oracle: each candidate of a pool (the advisor's picks plus the heaviest other candidates)
   is built for real and the SELECT fingerprints it was proposed for are replayed before and
   after; those sped up by >= 20% form the oracle set; ``precision_at_5`` is the share of the
   advisor's top 5 in it;
6. all recommendations built together: ``mean_speedup`` (mean over the affected fingerprints of
   median before / median after; the geometric mean and the calls-weighted total are beside it)
   and ``storage_used_share`` (real size of the built indexes / database size); then dropped.

Writes ``bench/results/advisor.json`` and prints a table. ``tpch_speedup`` comes from the last
TPC-H run (``--advisor --tpch``, bench/tpch.py, which also sets it here); null until one ran.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from rich.console import Console
from rich.table import Table

from bench.warehouse import connect_kwargs, init_warehouse_async
from bench.workload.plan import Plan, PlanConfig
from bench.workload.templates import BY_NAME, Profile
from models.advisor import AdvisorConfig, advise, load_catalog, load_workload, measure
from optimizer.fingerprint import Fingerprinter
from optimizer.whatif import (
    Candidate,
    CandidateConfig,
    WorkloadItem,
    generate_candidates,
    quote_ident,
)

RESULTS = Path(__file__).parent / "results"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
ORACLE_SPEEDUP = 1.2


def _literal_sql(sql: str, params: tuple[Any, ...]) -> str:
    """The template with its $n replaced by literals, as a simple-protocol client sends it."""
    from psycopg import sql as psql

    from bench.workload.runner import _to_psycopg

    text, order = _to_psycopg(sql)
    values = [params[i] for i in order]
    # psycopg's own literal quoting (ClientCursor.mogrify without a connection)
    parts = text.split("%s")
    out = [parts[0]]
    for value, part in zip(values, parts[1:], strict=True):
        out.append(psql.Literal(value).as_string(None))
        out.append(part)
    return "".join(out).replace("%%", "%")


# ------------------------------------------------------------------------------ workload


async def log_workload(
    conn: Any, database: str, n: int, seed: int, console: Console
) -> dict[str, Any]:
    """Run `n` statements of the simulator's plan and log them like pgsage does."""
    profile = await Profile.load(conn)
    cfg = PlanConfig(
        seed=seed,
        start=datetime(2026, 1, 26, 9, tzinfo=UTC),
        speed=2000.0,
        duration=max(n / 40.0, 10.0),
        qps=40.0,
        anomalies=False,
    )
    fpr = Fingerprinter()
    rows: list[tuple[Any, ...]] = []
    errors = 0
    t0 = time.perf_counter()
    await conn.execute("SET statement_timeout = 20000")
    for arrival in Plan(cfg, profile).arrivals():
        for st in arrival.statements:
            if len(rows) + errors >= n:
                break
            if st.template not in BY_NAME:
                continue
            sql = _literal_sql(st.sql, st.params)
            started = datetime.now(UTC)
            t = time.perf_counter()
            status = "ok"
            try:
                await conn.execute(sql)
            except Exception:
                errors += 1
                continue
            ms = (time.perf_counter() - t) * 1000.0
            fp = fpr.fingerprint(sql)
            rows.append(
                (
                    started,
                    started + timedelta(milliseconds=ms),
                    ms,
                    fp.id,
                    sql,
                    fp.normalized,
                    fp.command,
                    list(fp.tables),
                    database,
                    "simple",
                    status,
                    st.template,
                )
            )
        if len(rows) + errors >= n:
            break
    await conn.execute("RESET statement_timeout")
    await conn.copy_records_to_table(
        "query_logs",
        schema_name="metadata",
        records=[r[:11] for r in rows],
        columns=[
            "started_at",
            "finished_at",
            "duration_ms",
            "fingerprint",
            "query_text",
            "normalized_text",
            "command",
            "tables_used",
            "database_name",
            "protocol",
            "status",
        ],
    )
    total = sum(r[2] for r in rows)
    console.print(
        f"workload: {len(rows)} statements ({errors} errors) in {time.perf_counter() - t0:.1f}s,"
        f" {total / 1000:.1f}s of statement time"
    )
    return {"statements": len(rows), "errors": errors, "statement_seconds": total / 1000.0}


# ------------------------------------------------------------------------------ measuring


async def _drop_ours(conn: Any) -> None:
    """Indexes an earlier run built (advisor names end in an 8-hex key; no constraint)."""
    rows = await conn.fetch(
        r"""
        SELECT n.nspname, c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relname ~ '^pgsage_.*_[0-9a-f]{8}$' AND NOT i.indisunique
          AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
        """
    )
    for r in rows:
        await conn.execute(f"DROP INDEX IF EXISTS {quote_ident(r[0])}.{quote_ident(r[1])}")


async def _build(conn: Any, cands: list[Candidate]) -> int:
    size = 0
    for c in cands:
        name = c.index_name()
        await conn.execute(c.statement(name, if_not_exists=True))
        schema = c.table.partition(".")[0]
        size += int(
            await conn.fetchval(
                "SELECT pg_relation_size(to_regclass($1))",
                f"{quote_ident(schema)}.{quote_ident(name)}",
            )
            or 0
        )
    await conn.execute("ANALYZE")
    return size


async def _drop(conn: Any, cands: list[Candidate]) -> None:
    for c in cands:
        schema = c.table.partition(".")[0]
        await conn.execute(
            f"DROP INDEX IF EXISTS {quote_ident(schema)}.{quote_ident(c.index_name())}"
        )


def _speedups(
    before: dict[str, list[float]], after: dict[str, list[float]]
) -> dict[str, tuple[float, float]]:
    out = {}
    for fp, b in before.items():
        a = after.get(fp)
        if b and a:
            out[fp] = (statistics.median(b), statistics.median(a))
    return out


async def _replay(
    conn: Any, fps: list[str], workload: Any, samples: int, repeats: int
) -> dict[str, list[float]]:
    sqls = {
        f: workload.fingerprints[f].samples[:samples]
        for f in fps
        if f in workload.fingerprints
        and workload.fingerprints[f].command == "SELECT"
        and workload.fingerprints[f].samples
    }
    return await measure(conn, sqls, repeats, 30_000)


def _weighted(pairs: dict[str, tuple[float, float]], calls: dict[str, float]) -> float:
    b = sum(calls.get(f, 1.0) * p[0] for f, p in pairs.items())
    a = sum(calls.get(f, 1.0) * p[1] for f, p in pairs.items())
    return b / a if a > 0 else math.nan


# ------------------------------------------------------------------------------ the mode


async def run_advisor(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from bench.tpch import tpch_summary

    t0 = time.perf_counter()
    await init_warehouse_async(args.dsn, args.scale, args.seed, args.database, progress=False)
    conn = await asyncpg.connect(**connect_kwargs(args.dsn, args.database))
    try:
        await _drop_ours(conn)
        await conn.execute("TRUNCATE metadata.query_logs")
        await conn.execute("DELETE FROM metadata.optimization_history WHERE kind = 'index'")
        await conn.execute("ANALYZE")
        info = await log_workload(conn, args.database, args.statements, args.seed, console)
        config = AdvisorConfig(
            budget_share=args.budget_share,
            max_candidates=args.max_candidates,
            use_ranker=False,
            min_rows=args.min_rows,
        )
        report = await advise(conn, config=config)
        recs = report.recommendations
        top = [Candidate.from_json(r["detail"]["candidate"]) for r in recs]
        console.print(f"advisor: {len(recs)} recommendations ({report.method})")
        workload = await load_workload(conn, AdvisorConfig(max_fingerprints=10_000))
        calls = {f.id: float(f.calls) for f in workload.fingerprints.values()}
        catalog = await load_catalog(conn)
        items = [
            WorkloadItem(f.id, s, f.weight) for f in workload.fingerprints.values() for s in f.texts
        ]
        pool_infos = generate_candidates(items, catalog, CandidateConfig(min_rows=args.min_rows))
        fps_of = {i.candidate: sorted(i.fingerprints) for i in pool_infos}
        for r, c in zip(recs, top, strict=True):
            fps_of[c] = sorted(set(fps_of.get(c, [])) | set(r["fingerprints"]))
        pool = list(top[:5])
        for i in pool_infos:
            if len(pool) >= args.pool:
                break
            if i.candidate not in pool:
                pool.append(i.candidate)
        oracle: dict[str, Any] = {}
        for k, cand in enumerate(pool):
            fps = fps_of.get(cand, [])
            before = await _replay(conn, fps, workload, args.samples, args.repeats)
            if not before:
                oracle[cand.label] = {"speedup": None, "reason": "no replayable SELECT"}
                continue
            size = await _build(conn, [cand])
            after = await _replay(conn, list(before), workload, args.samples, args.repeats)
            await _drop(conn, [cand])
            pairs = _speedups(before, after)
            sp = _weighted(pairs, calls)
            oracle[cand.label] = {"speedup": sp, "size_bytes": size, "fingerprints": len(pairs)}
            console.print(f"oracle {k + 1}/{len(pool)}: {cand.label}: {sp:.2f}x")
        in_oracle = {
            label
            for label, o in oracle.items()
            if o.get("speedup") is not None and o["speedup"] >= ORACLE_SPEEDUP
        }
        top5 = [c.label for c in top[:5]]
        precision = sum(1 for x in top5 if x in in_oracle) / len(top5) if top5 else 0.0
        # all recommendations together
        affected = sorted({fp for r in recs for fp in r["fingerprints"]})
        db_bytes = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
        before = await _replay(conn, affected, workload, args.samples, args.repeats)
        used = await _build(conn, top)
        after = await _replay(conn, list(before), workload, args.samples, args.repeats)
        if not args.keep:
            await _drop(conn, top)
        pairs = _speedups(before, after)
        ratios = [b / a for b, a in pairs.values() if a > 0]
        result = {
            "mode": "advisor",
            "created_at": datetime.now(UTC).isoformat(),
            "scale": args.scale,
            "seed": args.seed,
            "workload": info,
            "method": report.method,
            "fingerprints": report.fingerprints,
            "candidates": report.candidates,
            "budget_share": args.budget_share,
            "recommendations": [
                {
                    "rank": r["rank"],
                    "index": r["label"],
                    "size_bytes": r["size_bytes"],
                    "est_gain_share": r["est_gain_share"],
                    "fingerprints": len(r["fingerprints"]),
                    "oracle_speedup": oracle.get(r["label"], {}).get("speedup"),
                }
                for r in recs
            ],
            "oracle": oracle,
            "oracle_set": sorted(in_oracle),
            "precision_at_5": precision,
            "mean_speedup": statistics.mean(ratios) if ratios else None,
            "geomean_speedup": math.exp(statistics.mean(math.log(x) for x in ratios))
            if ratios
            else None,
            "weighted_speedup": _weighted(pairs, calls) if pairs else None,
            "affected_fingerprints": len(pairs),
            "storage_used_bytes": used,
            "database_bytes": db_bytes,
            "storage_used_share": used / db_bytes if db_bytes else None,
            **tpch_summary(),  # the last `python -m bench.gain --advisor --tpch` (tpch.json)
            "seconds": time.perf_counter() - t0,
        }
        return result
    finally:
        await conn.close()


def render(result: dict[str, Any]) -> Table:
    table = Table(title=f"bench.gain --advisor (scale {result['scale']}, {result['method']})")
    for col in ("rank", "index", "size", "est. gain", "fps", "real speedup", "oracle"):
        table.add_column(col)
    oracle = set(result["oracle_set"])
    for r in result["recommendations"]:
        sp = r["oracle_speedup"]
        table.add_row(
            str(r["rank"]),
            r["index"],
            f"{r['size_bytes'] / 2**20:.1f} MB",
            f"{(r['est_gain_share'] or 0) * 100:.0f}%",
            str(r["fingerprints"]),
            f"{sp:.2f}x" if sp else "",
            "yes" if r["index"] in oracle else "no",
        )

    def fmt(v: Any, suffix: str = "") -> str:
        return f"{v:.2f}{suffix}" if isinstance(v, float) else str(v)

    table.caption = (
        f"precision@5 {fmt(result['precision_at_5'])}  mean speedup"
        f" {fmt(result['mean_speedup'], 'x')} (geomean {fmt(result['geomean_speedup'], 'x')},"
        f" weighted {fmt(result['weighted_speedup'], 'x')})  storage used"
        f" {fmt((result['storage_used_share'] or 0) * 100, '%')}  tpch"
        f" {fmt(result['tpch_speedup'], 'x') if result['tpch_speedup'] else 'not run'}"
    )
    return table


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--tpch" in argv:  # TPC-H through pgsage before/after the advisor (bench/tpch.py)
        from bench import tpch

        return tpch.main([a for a in argv if a not in ("--tpch", "--advisor")])
    if "--cache" in argv:  # the result cache's bench has its own options
        from bench import gain_cache

        return gain_cache.main([a for a in argv if a != "--cache"])
    if "--steering" in argv:
        from bench import gain_steering

        return gain_steering.main([a for a in argv if a != "--steering"])
    if "--admission" in argv:
        from bench import gain_admission

        return gain_admission.main([a for a in argv if a != "--admission"])
    parser = argparse.ArgumentParser(
        prog="python -m bench.gain", description=__doc__.split("\n")[0]
    )
    modes = parser.add_argument_group("modes (one or more)")
    modes.add_argument("--advisor", action="store_true", help="the index advisor")
    modes.add_argument(
        "--cache", action="store_true",
        help="the result cache (python -m bench.gain --cache --help for its options)",
    )  # fmt: skip
    modes.add_argument(
        "--steering", action="store_true",
        help="plan steering (python -m bench.gain --steering --help for its options)",
    )  # fmt: skip
    modes.add_argument(
        "--admission", action="store_true",
        help="admission control (python -m bench.gain --admission --help for its options)",
    )  # fmt: skip
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="PostgreSQL (any database)")
    parser.add_argument("--database", default="pgsage_gain", help="the bench's own warehouse")
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--statements", type=int, default=800)
    parser.add_argument("--budget-share", type=float, default=0.3)
    parser.add_argument("--max-candidates", type=int, default=40)
    parser.add_argument("--min-rows", type=float, default=10_000)
    parser.add_argument("--pool", type=int, default=12, help="candidates built for the oracle")
    parser.add_argument("--samples", type=int, default=3, help="literal samples per fingerprint")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="leave the recommended indexes")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if not args.advisor:
        parser.error("choose a mode: --advisor")
    console = Console(stderr=True)
    result = asyncio.run(run_advisor(args, console))
    Console().print(render(result))
    print(json.dumps(result, default=str, indent=2))
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "advisor.json").write_text(json.dumps(result, default=str, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
