"""Child-process work of /api/v1/admin jobs: `python -m proxy.api.worker generate-data DSN`.

Data generation is CPU-bound (vectorised numpy), so it runs here, not on the proxy's loop; the
result is printed as one JSON line on stdout, problems as the last line of stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.api.worker")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate-data", help="land the next increment of sales in bronze")
    gen.add_argument("dsn", help="libpq URI of the warehouse database")
    gen.add_argument("--batch", type=int, default=None)
    args = parser.parse_args(argv)

    from bench.warehouse import load_increment_async

    try:
        result = asyncio.run(load_increment_async(args.dsn, args.batch, None))
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if result is None:
        out = {"loaded": False, "batch": args.batch, "reason": "batch already loaded"}
    else:
        out = {"loaded": True, **result.as_dict()}
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
