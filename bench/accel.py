"""The compiled anomaly detector against its source, side by side in one run.

`python -m bench.accel [--executions N] [--rounds R]` feeds the same pgbench-like stream
(one hot template and 19 others, 20,000 arrivals per simulated second, 1 in 2,000 fifty times
slower) to `models.anomaly.Detector` twice per round: the build `make accel` compiled with mypyc
and the source module loaded beside it. Each side is warmed on the first quarter of the stream,
then timed on the rest in the detector's online batch size. Prints a table and the JSON,
writes `bench/results/accel.json`: µs per execution for each side (best round), the ratio, and
whether both flagged exactly the same executions.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.machine import warn_if_busy
from models import accel

RESULTS = Path(__file__).parent / "results" / "accel.json"
MODULE = "models.anomaly"
BATCH = 2_000  # executions per Detector.process call (the online monitor's SCORE_SLICE)


def stream(n: int, seed: int) -> list[tuple[Any, ...]]:
    rng = random.Random(seed)
    fps = [f"fp{k}" for k in range(20)]
    t = 1.767e9
    out = []
    for _ in range(n):
        t += 1 / 20_000
        fp = fps[0] if rng.random() < 0.8 else rng.choice(fps)
        slow = 50.0 if rng.random() < 0.0005 else 1.0
        out.append((t, fp, "SELECT", 0.1 * (1 + rng.random()) * slow, 1, False, 80, None, False,
                    None, "app"))  # fmt: skip
    return out


def run_side(mod: ModuleType, rows: list[tuple[Any, ...]]) -> tuple[float, list[tuple[Any, ...]]]:
    executions = [mod.Execution(*r) for r in rows]
    warm = len(executions) // 4
    detector = mod.Detector(None)
    detector.process(executions[:warm])
    flags: list[tuple[Any, ...]] = []
    start = time.perf_counter()
    for i in range(warm, len(executions), BATCH):
        flags.extend(tuple(f) for f in detector.process(executions[i : i + BATCH]))
    return (time.perf_counter() - start) / (len(executions) - warm) * 1e6, flags


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--executions", type=int, default=400_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/accel.json")
    args = ap.parse_args(argv)
    load = warn_if_busy("bench.accel")
    try:
        pure, fast = accel.load_source(MODULE), accel.load_compiled(MODULE)
    except RuntimeError as exc:
        raise SystemExit(f"{exc} (see the warning above)") from None
    rows = stream(args.executions, args.seed)
    times: dict[str, list[float]] = {"source": [], "compiled": []}
    same = True
    for _ in range(args.rounds):  # the two sides alternate, so drift hits both
        us_src, flags_src = run_side(pure, rows)
        us_c, flags_c = run_side(fast, rows)
        times["source"].append(us_src)
        times["compiled"].append(us_c)
        same = same and flags_src == flags_c
    best = {k: min(v) for k, v in times.items()}
    doc = {
        "benchmark": "accel",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_at_start": load,
        "executions": args.executions,
        "rounds": args.rounds,
        "us_per_execution": best,
        "rounds_us": times,
        "speedup": best["source"] / best["compiled"],
        "same_flags": same,
        "flags": len(flags_c),
    }
    table = Table(title="anomaly detector: source vs mypyc build (µs per execution, best round)")
    for col in ("source", "compiled", "speedup", "same flags"):
        table.add_column(col, justify="right")
    table.add_row(f"{best['source']:.2f}", f"{best['compiled']:.2f}", f"{doc['speedup']:.2f}x",
                  str(same))  # fmt: skip
    Console(stderr=True).print(table)
    if not args.no_save:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    if not same:
        raise SystemExit("the compiled detector flagged other executions than the source")
    return doc


if __name__ == "__main__":
    main()
