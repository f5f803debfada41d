"""Real client programs through the proxy: psql, pgbench, pgjdbc (java) and node-postgres.

Each test runs an unmodified client program against the in-process proxy, checks what the program
reports, and where useful compares it with the same program run directly against PostgreSQL. It
then checks the proxy's per-statement records for what the client sent.

The tools are required, not optional: CI installs them, so a missing one fails the test with a
message naming the package. The client programs live in tests/integration/clients/ (see its
README); node-postgres is installed there with `npm ci` once per session if node_modules is
missing or stale.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fix_proxy import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    RunningProxy,
    create_database,
    direct_dsn,
    drop_database,
)

pytestmark = pytest.mark.clients

CLIENTS_DIR = Path(__file__).parent / "clients"
JDBC_JAR = Path(os.environ.get("PGSAGE_TEST_JDBC_JAR", "/usr/share/java/postgresql.jar"))

#: how to get each tool (the failure message when it is missing)
INSTALL_HINTS = {
    "psql": "apt-get install postgresql-client-15",
    "pgbench": "apt-get install postgresql-client-15",
    "java": "apt-get install openjdk-17-jdk-headless",
    "javac": "apt-get install openjdk-17-jdk-headless",
    "node": "install Node.js >= 18 (e.g. apt-get install nodejs)",
    "npm": "install npm (e.g. apt-get install npm)",
}

#: environment variables that would redirect or reconfigure libpq-based tools
_PG_ENV_DROP = re.compile(r"^PG(?!SAGE_)")


# ---------------------------------------------------------------------------------- helpers


def require_tool(name: str) -> str:
    """The tool's path; fail (not skip) the test when it is missing: CI installs it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name!r} is not installed or not on PATH; the external-client tests need it "
            f"({INSTALL_HINTS.get(name, 'install it')})",
            pytrace=False,
        )
    return path


def client_env() -> dict[str, str]:
    """The environment without PG* variables (they would redirect libpq and node-postgres)."""
    env = {k: v for k, v in os.environ.items() if not _PG_ENV_DROP.match(k)}
    env.update(LC_ALL="C.UTF-8", LANG="C.UTF-8", PGCONNECT_TIMEOUT="10")
    return env


def run(
    cmd: list[str],
    *,
    cwd: Path | None = None,
    timeout: float = 60,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            env=client_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{cmd[0]} did not finish in {timeout} s: {' '.join(cmd)}\n{exc.stderr}")
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited with {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


@dataclass(frozen=True)
class Target:
    """Where a client connects: the proxy or PostgreSQL itself."""

    host: str
    port: int

    @classmethod
    def direct(cls) -> Target:
        return cls(PG_HOST, PG_PORT)

    @classmethod
    def of(cls, proxy: RunningProxy) -> Target:
        return cls(proxy.host, proxy.port)

    def conn_args(self) -> list[str]:
        """libpq tools' connection options (the database name is passed separately)."""
        return ["-h", self.host, "-p", str(self.port), "-U", PG_USER]


def psql(
    target: Target, dbname: str, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    exe = require_tool("psql")
    return run([exe, "--no-psqlrc", *target.conn_args(), "-d", dbname, *args], check=check)


def records_for(proxy: RunningProxy, needle: str) -> list[Any]:
    return [r for r in proxy.records if r.sql and needle in r.sql]


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def describe(recs: list[Any]) -> str:
    """Records as text for assertion messages."""
    return "\n".join(
        f"  {r.protocol:8} {r.status:9} rows={r.rows} susp={r.execution.suspensions} "
        f"stmt={r.execution.statement!r} sql={(r.sql or '')[:100]!r}"
        for r in recs[-40:]
    )


# ---------------------------------------------------------------------------------- psql


def test_psql_c_multi_statement(proxy, test_db):
    sql = "select 1 as a; select 'two' as b; select g from generate_series(1, 3) g"
    direct = psql(Target.direct(), test_db, "-At", "-c", sql)
    through = psql(Target.of(proxy), test_db, "-At", "-c", sql)
    assert through.stdout == direct.stdout == "1\ntwo\n1\n2\n3\n"

    recs = [r for r in proxy.records if r.protocol == "simple" and r.sql]
    by_sql = {r.sql.strip(): r for r in recs}
    assert by_sql["select 1 as a"].rows == 1, describe(recs)
    assert by_sql["select 'two' as b"].rows == 1, describe(recs)
    assert by_sql["select g from generate_series(1, 3) g"].rows == 3, describe(recs)
    assert all(by_sql[s].status == "ok" for s in by_sql)

    # an error in the middle of one Query message ends the whole string
    bad = "select 10; select 1/0; select 30"
    direct = psql(Target.direct(), test_db, "-At", "-c", bad, check=False)
    through = psql(Target.of(proxy), test_db, "-At", "-c", bad, check=False)
    assert (through.returncode, through.stdout) == (direct.returncode, direct.stdout)
    assert through.returncode == 1 and through.stdout == "10\n"
    assert "division by zero" in through.stderr
    err = [r for r in proxy.records if r.sqlstate == "22012"]
    assert len(err) == 1 and err[0].status == "error" and err[0].protocol == "simple"
    assert "1/0" in (err[0].sql or "")
    assert not records_for(proxy, "select 30")


def _copy_line(row: tuple[int, str, str | None]) -> str:
    """A row in COPY's text format (the notes used here need no escaping beyond NULL)."""
    note = "\\N" if row[2] is None else row[2]
    return f"{row[0]}\t{row[1]}\t{note}"


def _copy_script(table: str, rows: list[tuple[int, str, str | None]]) -> str:
    data = "\n".join(_copy_line(r) for r in rows)
    return (
        f"create table {table} (id int primary key, name text not null, note text);\n"
        f"\\copy {table} from stdin\n{data}\n\\.\n"
        f"select count(*), sum(id), count(note) from {table};\n"
        f"\\copy {table} to stdout\n"
        f"\\copy (select id, upper(name) as name from {table} where id <= 3 order by id) "
        "to stdout with (format csv, header)\n"
        f"drop table {table};\n"
    )


def test_psql_copy_script(proxy, test_db, tmp_path):
    table = unique("psql_copy")
    rows = [(1, "alpha", None), (2, "beta", "tab\\there"), (3, "gamma", "üñí©ødé")]
    rows += [(i, f"name-{i}", None if i % 7 == 0 else f"note {i}") for i in range(4, 3001)]
    script = tmp_path / "copy.sql"
    script.write_text(_copy_script(table, rows), encoding="utf-8")

    args = ("-At", "-v", "ON_ERROR_STOP=1", "-f", str(script))
    direct = psql(Target.direct(), test_db, *args)
    through = psql(Target.of(proxy), test_db, *args)
    assert through.stdout == direct.stdout
    assert through.stderr == direct.stderr == ""

    out = through.stdout.splitlines()
    notes = sum(1 for r in rows if r[2] is not None)
    assert out[:3] == ["CREATE TABLE", f"COPY {len(rows)}", f"{len(rows)}|{4501500}|{notes}"]
    copied = out[3 : 3 + len(rows)]
    expected = [_copy_line(r) for r in rows]
    assert sorted(copied) == sorted(expected)
    assert out[3 + len(rows) :] == ["id,name", "1,ALPHA", "2,BETA", "3,GAMMA", "DROP TABLE"]

    # COPY FROM STDIN and both COPY TO STDOUT are one record each, with their row counts
    copies = [r for r in proxy.records if r.sql and r.sql.lower().startswith("copy")]
    assert [(r.rows, r.status) for r in copies] == [(3000, "ok"), (3000, "ok"), (3, "ok")], (
        describe(proxy.records)
    )
    assert "from stdin" in copies[0].sql.lower()
    assert all(r.protocol == "simple" for r in copies)


def test_psql_describe_identical(proxy, fresh_db):
    with psycopg.connect(direct_dsn(fresh_db), autocommit=True) as conn:
        conn.execute(
            """
            create table orders (
                id bigint generated always as identity primary key,
                customer text not null,
                amount numeric(12, 2) check (amount >= 0),
                placed_at timestamptz default now(),
                tags text[]
            );
            create index orders_customer_idx on orders (customer, placed_at desc);
            comment on table orders is 'orders for the describe test';
            comment on column orders.amount is 'in euros';
            create view big_orders as select * from orders where amount > 100;
            create sequence plain_seq;
            """
        )
    outputs: dict[str, str] = {}
    for command in ("\\d", "\\d+ orders", "\\d+ big_orders"):
        direct = psql(Target.direct(), fresh_db, "-c", command)
        through = psql(Target.of(proxy), fresh_db, "-c", command)
        assert through.stdout == direct.stdout, command
        assert through.stderr == direct.stderr == ""
        outputs[command] = through.stdout
    listing = outputs["\\d"]
    for name in ("orders", "orders_id_seq", "big_orders", "plain_seq"):
        assert re.search(rf"\\| {name} +\\|", listing), listing
    table = outputs["\\d+ orders"]
    for text in ('Table "public.orders"', "orders_customer_idx", "in euros", "Access method: heap"):
        assert text in table, table
    assert "View definition:" in outputs["\\d+ big_orders"]
    # psql's describe queries read the catalog, all through the simple protocol
    catalog = records_for(proxy, "pg_catalog")
    assert catalog and all(r.protocol == "simple" and r.status == "ok" for r in catalog)


def test_psql_on_error_stop(proxy, test_db, tmp_path):
    table = unique("psql_err")
    script = tmp_path / "stop.sql"
    script.write_text(
        f"create table {table} (id int);\n"
        f"insert into {table} values (1), (2);\n"
        "select 'before';\n"
        f"select id / (id - id) from {table};\n"
        "select 'after';\n"
        f"drop table {table};\n"
    )
    args = ("-At", "-v", "ON_ERROR_STOP=1", "-f", str(script))
    try:
        direct = psql(Target.direct(), test_db, *args, check=False)
        psql(Target.direct(), test_db, "-c", f"drop table {table}")
        through = psql(Target.of(proxy), test_db, *args, check=False)
    finally:
        psql(Target.direct(), test_db, "-c", f"drop table if exists {table}")
    assert through.returncode == direct.returncode == 3
    assert through.stdout == direct.stdout == "CREATE TABLE\nINSERT 0 2\nbefore\n"
    assert through.stderr == direct.stderr
    assert "division by zero" in through.stderr

    err = [r for r in proxy.records if r.status == "error"]
    assert len(err) == 1, describe(proxy.records)
    assert err[0].sqlstate == "22012" and "id / (id - id)" in (err[0].sql or "")
    assert not records_for(proxy, "'after'")
    assert [r.rows for r in records_for(proxy, "insert into")] == [2]


# ---------------------------------------------------------------------------------- pgbench


@dataclass
class PgbenchInit:
    dbname: str
    result: subprocess.CompletedProcess[str]
    records: list[Any] = field(default_factory=list)


@pytest.fixture(scope="module")
def pgbench_init() -> Iterator[Callable[[], PgbenchInit]]:
    """`pgbench -i -s 1` through a proxy of its own, run once on first use (by a test, so a
    missing pgbench fails that test)."""
    state: dict[str, Any] = {}

    def init() -> PgbenchInit:
        if "init" not in state:
            exe = require_tool("pgbench")
            state["db"] = db = create_database("pgsage_pgbench")
            p = RunningProxy()
            try:
                proc = run(
                    [exe, "-i", "-s", "1", *Target.of(p).conn_args(), db],
                    timeout=120,
                    check=False,
                )
                state["init"] = PgbenchInit(db, proc, p.records)
            finally:
                p.stop()
        return state["init"]

    yield init
    if "db" in state:
        drop_database(state["db"])


def test_pgbench_init_through_proxy(pgbench_init):
    init = pgbench_init()
    assert init.result.returncode == 0, init.result.stderr
    assert "done in" in init.result.stderr
    with psycopg.connect(direct_dsn(init.dbname)) as conn:
        counts = conn.execute(
            "select (select count(*) from pgbench_accounts),"
            " (select count(*) from pgbench_branches), (select count(*) from pgbench_tellers)"
        ).fetchone()
    assert counts == (100_000, 1, 10)
    copies = [
        r for r in init.records if r.sql and r.sql.lower().startswith("copy pgbench_accounts")
    ]
    assert [(r.rows, r.status) for r in copies] == [(100_000, "ok")], describe(init.records)
    assert all(r.status == "ok" for r in init.records), describe(init.records)


_PGBENCH_PROCESSED = re.compile(r"number of transactions actually processed: (\d+)")
_PGBENCH_FAILED = re.compile(r"number of failed transactions: (\d+)")


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_select_only(proxy, pgbench_init, mode):
    init = pgbench_init()
    if init.result.returncode != 0:
        pytest.fail(
            f"pgbench -i failed, see test_pgbench_init_through_proxy:\n{init.result.stderr}"
        )
    exe = require_tool("pgbench")
    target = Target.of(proxy)
    cmd = [exe, "-S", "-T", "2", "-c", "2", "-M", mode, *target.conn_args(), init.dbname]
    proc = run(cmd, timeout=60)
    assert f"query mode: {mode}" in proc.stdout
    processed = _PGBENCH_PROCESSED.search(proc.stdout)
    failed = _PGBENCH_FAILED.search(proc.stdout)
    assert processed and failed, proc.stdout
    assert int(failed.group(1)) == 0, proc.stdout
    n = int(processed.group(1))
    assert n > 0

    recs = records_for(proxy, "FROM pgbench_accounts WHERE aid = ")
    # one record per transaction (a client may have one more in flight when -T runs out); the
    # proxy keeps its last 100k records, more than 2 s of pgbench through it produces
    assert n <= len(recs) <= n + 2, f"{len(recs)} records for {n} transactions"
    assert all(r.status == "ok" and r.rows == 1 for r in recs), describe(recs)
    protocols = {r.protocol for r in recs}
    statements = {r.execution.statement for r in recs}
    if mode == "simple":
        assert protocols == {"simple"}
        assert all(re.search(r"aid = \d+", r.sql) for r in recs), describe(recs)
    else:
        assert protocols == {"extended"}
        assert all("aid = $1" in r.sql for r in recs), describe(recs)
        if mode == "extended":
            assert statements == {""}, statements
        else:
            # named statements (one per connection), resolved to their text on every Execute
            assert statements and all(s for s in statements), statements
            assert len(recs) > len(statements)


# ---------------------------------------------------------------------------------- JDBC


@pytest.fixture(scope="session")
def jdbc_classes(tmp_path_factory) -> Callable[[], Path]:
    """Compiles JdbcCheck.java once per session, on first use (inside a test)."""
    cache: dict[str, Path] = {}

    def build() -> Path:
        if "dir" not in cache:
            javac = require_tool("javac")
            if not JDBC_JAR.is_file():
                pytest.fail(
                    f"pgjdbc jar {JDBC_JAR} is missing (apt-get install libpostgresql-jdbc-java, "
                    "or set PGSAGE_TEST_JDBC_JAR)",
                    pytrace=False,
                )
            out = tmp_path_factory.mktemp("jdbc")
            run([javac, "-d", str(out), "-cp", str(JDBC_JAR), str(CLIENTS_DIR / "JdbcCheck.java")])
            cache["dir"] = out
        return cache["dir"]

    return build


def run_jdbc(classes: Path, target: Target, dbname: str, table: str) -> dict[str, Any]:
    java = require_tool("java")
    cp = os.pathsep.join([str(JDBC_JAR), str(classes)])
    proc = run([java, "-cp", cp, "JdbcCheck", target.host, str(target.port), dbname, table])
    return json.loads(proc.stdout)


def test_jdbc(proxy, test_db, jdbc_classes):
    classes = jdbc_classes()
    table = unique("jdbc_check")
    direct = run_jdbc(classes, Target.direct(), test_db, table)
    through = run_jdbc(classes, Target.of(proxy), test_db, table)
    assert through == direct

    assert through["database"] == test_db and through["user"] == PG_USER
    assert through["application_name"] == "pgsage-jdbc-check"
    assert len(through["prepared"]) == 10
    for i, row in enumerate(through["prepared"], start=1):
        assert row == [
            i + 1,
            2 * (10_000_000_000 + i),
            i * 1.5 / 4,
            f"{i}.125",
            f"row n{i}",
            f"2024-01-{1 + i:02d}",
            i % 2 == 0,
        ]
    assert through["server_prepared"][-1] is True
    assert (through["batch_counts"], through["batch_total"]) == (1000, 1000)
    assert (through["table_count"], through["table_sum"]) == (1000, 500500)
    assert (through["fetch_rows"], through["fetch_sum"], through["fetch_ordered"]) == (
        1000,
        500500,
        True,
    )
    assert through["error_sqlstate"] == "22012" and through["after_error"] == 42
    assert through["tables"] == [f"public.{table}:TABLE"]
    assert through["columns"] == ["id:int4", "name:text"]

    recs = proxy.records
    # the PreparedStatement: every execution recorded with its text, later ones on S_n
    ps = records_for(proxy, "/* jdbc-ps */")
    assert len(ps) == 10, describe(recs)
    assert all(r.protocol == "extended" and r.status == "ok" and r.rows == 1 for r in ps)
    assert all("$1::int4 + 1" in r.sql for r in ps)
    named = [r.execution.statement for r in ps if r.execution.statement]
    assert len(named) >= 5 and all(s.startswith("S_") for s in named), describe(ps)
    assert len(set(named)) == 1, named

    # the batch: 1000 inserts of one row each
    inserts = records_for(proxy, f"insert into {table}")
    assert len(inserts) == 1000, describe(recs)
    assert all(r.rows == 1 and r.status == "ok" for r in inserts)

    # the fetch-size cursor: one execution, suspended and resumed, with all its rows
    fetch = records_for(proxy, "/* jdbc-fetch */")
    assert len(fetch) == 1, describe(fetch)
    assert fetch[0].execution.portal, "pgjdbc runs a fetch-size query on a named portal"
    assert fetch[0].execution.suspensions >= 1, describe(fetch)
    assert fetch[0].rows == 1000, describe(fetch)
    assert fetch[0].status == "ok"

    errors = [r for r in recs if r.status == "error"]
    assert [r.sqlstate for r in errors] == ["22012"], describe(errors)
    assert records_for(proxy, "TABLE_TYPE"), "DatabaseMetaData.getTables query not recorded"


# ---------------------------------------------------------------------------------- node-postgres


def _lock_versions() -> tuple[str | None, str | None]:
    """pg's version in package-lock.json and in node_modules (None if not installed)."""
    lock = json.loads((CLIENTS_DIR / "package-lock.json").read_text())
    wanted = lock["packages"]["node_modules/pg"]["version"]
    installed_file = CLIENTS_DIR / "node_modules" / "pg" / "package.json"
    installed = (
        json.loads(installed_file.read_text())["version"] if installed_file.is_file() else None
    )
    return wanted, installed


@pytest.fixture(scope="session")
def node_modules() -> Callable[[], Path]:
    """`npm ci` in tests/integration/clients once per session if node_modules is missing or
    stale (node_modules is git-ignored), on first use inside a test."""
    cache: dict[str, Path] = {}

    def ensure() -> Path:
        if "dir" not in cache:
            require_tool("node")
            lock_path = Path(tempfile.gettempdir()) / "pgsage-npm-ci.lock"
            with open(lock_path, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # parallel sessions: one npm ci at a time
                wanted, installed = _lock_versions()
                if installed != wanted:
                    npm = require_tool("npm")
                    run([npm, "ci", "--no-audit", "--no-fund"], cwd=CLIENTS_DIR, timeout=180)
                    wanted, installed = _lock_versions()
                    assert installed == wanted, "npm ci did not install pg from package-lock.json"
            cache["dir"] = CLIENTS_DIR / "node_modules"
        return cache["dir"]

    return ensure


def run_node(target: Target, dbname: str) -> dict[str, Any]:
    node = require_tool("node")
    proc = run(
        [node, "node_check.js", target.host, str(target.port), dbname], cwd=CLIENTS_DIR, timeout=60
    )
    return json.loads(proc.stdout)


def test_node_postgres(proxy, test_db, node_modules):
    node_modules()
    direct = run_node(Target.direct(), test_db)
    through = run_node(Target.of(proxy), test_db)
    assert through == direct

    assert through["simple"] == [
        {"command": "SELECT", "rows": [{"a": 1}]},
        {"command": "SELECT", "rows": [{"b": 2, "c": 3}]},
        {"command": "SELECT", "rows": [{"d": "x"}]},
    ]
    assert through["simple_single"] is True
    assert through["params"] == {"sum": 42, "txt": "hello", "doc": {"k": [1, 2]}}
    assert (through["series_count"], through["series_sum"]) == (25, 325)
    assert through["named"] == [{"doubled": 2 * i, "rep": "ab" * i} for i in range(1, 7)]
    assert (through["tx_inside"], through["tx_after_rollback"]) == (2, 0)
    assert (through["tx_insert_rowcount"], through["tx_after_commit"]) == (1, 1)
    assert [e and e["code"] for e in through["errors"]] == ["22012", "22012", "42P01"]
    assert (through["tx_error"], through["tx_aborted"]) == ("23505", "25P02")
    assert through["after_errors"] == "still alive"

    recs = proxy.records
    simple = [r for r in recs if r.protocol == "simple" and r.sql]
    assert [r.sql.strip() for r in simple[:3]] == [
        "select 1 as a",
        "select 2 as b, 3 as c",
        "select 'x' as d /* node-simple */",
    ], describe(recs)

    params = records_for(proxy, "/* node-params */")
    assert [(r.protocol, r.rows, r.execution.statement) for r in params] == [("extended", 1, "")]
    series = records_for(proxy, "/* node-series */")
    assert [(r.protocol, r.rows) for r in series] == [("extended", 25)]

    named = records_for(proxy, "/* node-named */")
    assert len(named) == 6, describe(recs)
    assert {(r.protocol, r.execution.statement, r.rows, r.status) for r in named} == {
        ("extended", "pgsage_node_named", 1, "ok")
    }

    err_simple = records_for(proxy, "node-error-simple")
    err_ext = records_for(proxy, "node-error-extended")
    assert [(r.protocol, r.status, r.sqlstate) for r in err_simple] == [
        ("simple", "error", "22012")
    ]
    assert [(r.protocol, r.status, r.sqlstate) for r in err_ext] == [("extended", "error", "22012")]
    states = [r.sqlstate for r in recs if r.status == "error"]
    assert states == ["22012", "22012", "42P01", "23505", "25P02"], describe(recs)
    tx = [
        r.sql.strip().lower()
        for r in simple
        if r.sql.strip().lower() in ("begin", "rollback", "commit")
    ]
    assert tx == ["begin", "rollback", "begin", "commit", "begin", "rollback"]
