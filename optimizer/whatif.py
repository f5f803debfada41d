"""Index what-if: candidate indexes from a weighted workload, their DDL, and their estimated effect.

No IO happens here. Candidate generation is pure (parse trees from `optimizer.parse`, catalog
facts passed in as `TableInfo`); the what-if evaluation talks to PostgreSQL only through a
`Query` callable the caller passes in, with asyncpg's ``fetchval`` semantics:
``await query(sql, *args)`` returns the first column of the first row (or None).

Candidates (`generate_candidates`), per table reference of every statement, weighted by
calls x mean time of its fingerprint:

- WHERE columns compared to constants, equality before range (``a = $1 AND b > $2`` gives
  ``(a, b)``), equality columns ordered by distinctness when statistics are known;
- join keys (the inner side of a nested loop), alone and after the equality columns;
- ORDER BY columns after the equality columns (a sort, or a top-N, served by the index);
- GROUP BY columns after the equality columns;
- single-column variants of every filtered column (the Dexter-style baseline);
- INCLUDE variants where the statement reads only a few more columns of a wide table
  (an index-only scan pays);
- partial variants where a constant predicate dominates a fingerprint's samples
  (``WHERE status = 'return'`` in at least `partial_share` of them).

Indexes that exist (or whose key is a prefix of an existing index's key) are skipped, as are
tables below `min_rows`. `Candidate.statement()` builds the CREATE INDEX with every identifier
quoted, so hostile names cannot inject SQL.

What-if (`WhatIf`): ``EXPLAIN`` costs of the workload's statements with hypothetical indexes
(HypoPG's ``hypopg_create_index`` / ``hypopg_reset()``, reset after each round), or, without
HypoPG, with the index built for real inside a transaction that is rolled back (``lock_timeout``
set, and only for tables below `max_build_bytes`). Statements with ``$n`` placeholders are
costed by their generic plan (PREPARE + EXPLAIN EXECUTE with ``plan_cache_mode =
force_generic_plan`` on PostgreSQL 15; EXPLAIN (GENERIC_PLAN) from 16 on).

>>> from optimizer.whatif import TableInfo, WorkloadItem, generate_candidates
>>> cat = {"public.t": TableInfo(rows=1e6, size_bytes=10**8, columns=tuple("abcdef"))}
>>> work = [WorkloadItem("f1", "select c from t where b > 5 and a = 3", 100.0)]
>>> [c.candidate.label for c in generate_candidates(work, cat)]
['public.t (a)', 'public.t (a, b)', 'public.t (a, b) INCLUDE (c)', 'public.t (b)']
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlglot import exp
from sqlglot.optimizer.scope import Scope, traverse_scope

from .parse import parse_statement

#: ``await query(sql, *args)`` -> first column of the first row (asyncpg's fetchval)
Query = Callable[..., Awaitable[Any]]

_RANGE = (exp.GT, exp.GTE, exp.LT, exp.LTE)
_PARAM = re.compile(r"\$(\d+)")
_NUMBER = re.compile(r"^-?\d+(\.\d+)?([eE][+-]?\d+)?$")
_QUOTED = re.compile(r"^'(?:[^']|'')*'$")
#: PostgreSQL's NAMEDATALEN - 1
MAX_IDENT = 63


def quote_ident(name: str) -> str:
    """An identifier in double quotes with embedded quotes doubled (always quoted: no keywords
    or case folding to get wrong).

    >>> quote_ident('x"; drop table t; --')
    '"x""; drop table t; --"'
    """
    if "\x00" in name:
        raise ValueError("identifier contains a NUL byte")
    return '"' + name.replace('"', '""') + '"'


def quote_table(name: str) -> str:
    """``schema.table`` (split on the first dot) as a quoted qualified name."""
    schema, _, table = name.partition(".")
    return f"{quote_ident(schema)}.{quote_ident(table)}" if table else quote_ident(schema)


def quote_literal(value: str | int | float | bool | None) -> str:
    """A SQL literal: strings in single quotes with quotes doubled (standard strings only)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("non-finite number")
        return repr(value)
    if "\x00" in value:
        raise ValueError("literal contains a NUL byte")
    return "'" + value.replace("'", "''") + "'"


# ------------------------------------------------------------------------------ data types


@dataclass(frozen=True)
class ExistingIndex:
    """An index of the catalog (pg_index): key columns ('' for an expression), INCLUDE columns."""

    name: str
    columns: tuple[str, ...]
    include: tuple[str, ...] = ()
    predicate: str | None = None
    unique: bool = False
    primary: bool = False


@dataclass(frozen=True)
class TableInfo:
    """What the advisor knows about one table (pg_class, pg_attribute, pg_stats, pg_index)."""

    rows: float
    size_bytes: int
    columns: tuple[str, ...] = ()
    indexes: tuple[ExistingIndex, ...] = ()
    #: pg_stats.n_distinct per column (negative: minus the fraction of rows)
    n_distinct: Mapping[str, float] = field(default_factory=dict)
    #: pg_stats.avg_width per column (bytes)
    avg_width: Mapping[str, float] = field(default_factory=dict)

    def distinct(self, column: str) -> float:
        nd = self.n_distinct.get(column)
        if nd is None or nd != nd:  # unknown
            return 0.0
        return -nd * self.rows if nd < 0 else nd


@dataclass(frozen=True)
class WorkloadItem:
    """One runnable or normalized SQL text of a fingerprint and its weight (calls x mean ms).

    A fingerprint may come with several items (samples of its literals); its weight is then
    the largest of theirs, not their sum.
    """

    fingerprint: str
    sql: str
    weight: float


@dataclass(frozen=True)
class Candidate:
    """A possible index: key columns in order, INCLUDE columns, an optional partial predicate.

    `predicate` is ``(column, operator, literal)`` with the literal already rendered by
    `quote_literal` (operator one of ``=``, ``IS NULL``, ``IS NOT NULL``).
    """

    table: str
    columns: tuple[str, ...]
    include: tuple[str, ...] = ()
    predicate: tuple[str, str, str] | None = None

    @property
    def label(self) -> str:
        out = f"{self.table} ({', '.join(self.columns)})"
        if self.include:
            out += f" INCLUDE ({', '.join(self.include)})"
        if self.predicate:
            out += f" WHERE {self.where_sql(quoted=False)}"
        return out

    @property
    def key(self) -> str:
        """A short stable id of the candidate (for names and for matching across runs)."""
        return hashlib.blake2b(self.label.encode(), digest_size=4).hexdigest()

    def index_name(self, prefix: str = "pgsage") -> str:
        """``pgsage_<table>_<cols>_<hash>``, cut to 63 bytes (the hash keeps it unique)."""
        table = self.table.rpartition(".")[2]
        body = re.sub(r"[^a-z0-9_]+", "", f"{table}_{'_'.join(self.columns)}".lower())
        suffix = f"_{self.key}"
        head = f"{prefix}_{body}"[: MAX_IDENT - len(suffix)]
        return head + suffix

    def where_sql(self, quoted: bool = True) -> str:
        if self.predicate is None:
            return ""
        column, op, literal = self.predicate
        name = quote_ident(column) if quoted else column
        return f"{name} {op}" if op.startswith("IS") else f"{name} {op} {literal}"

    def statement(
        self, name: str | None = None, *, concurrently: bool = False, if_not_exists: bool = False
    ) -> str:
        """The CREATE INDEX statement, every identifier quoted.

        >>> Candidate("s.t", ("a",), ("b",), ("k", "=", "'x'")).statement("i")
        'CREATE INDEX "i" ON "s"."t" USING btree ("a") INCLUDE ("b") WHERE "k" = \\'x\\''
        """
        if not self.columns:
            raise ValueError("an index needs at least one key column")
        if self.predicate is not None:
            _check_predicate(self.predicate)
        parts = ["CREATE INDEX"]
        if concurrently:
            parts.append("CONCURRENTLY")
        if if_not_exists:
            parts.append("IF NOT EXISTS")
        if name is not None or if_not_exists:
            parts.append(quote_ident(name or self.index_name()))
        parts.append(f"ON {quote_table(self.table)} USING btree")
        parts.append("(" + ", ".join(quote_ident(c) for c in self.columns) + ")")
        if self.include:
            parts.append("INCLUDE (" + ", ".join(quote_ident(c) for c in self.include) + ")")
        if self.predicate is not None:
            parts.append("WHERE " + self.where_sql())
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "columns": list(self.columns),
            "include": list(self.include),
            "predicate": list(self.predicate) if self.predicate else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Candidate:
        pred = data.get("predicate")
        return cls(
            str(data["table"]),
            tuple(str(c) for c in data["columns"]),
            tuple(str(c) for c in data.get("include") or ()),
            (str(pred[0]), str(pred[1]), str(pred[2])) if pred else None,
        )


def _check_predicate(pred: tuple[str, str, str]) -> None:
    """Only literals `quote_literal` could have produced reach the DDL."""
    _, op, literal = pred
    if op in ("IS NULL", "IS NOT NULL"):
        return
    if op != "=":
        raise ValueError(f"unsupported partial-index operator {op!r}")
    if literal in ("true", "false") or _NUMBER.match(literal):
        return
    if not _QUOTED.match(literal):
        raise ValueError("partial-index literal is not a quoted SQL string")


@dataclass
class CandidateInfo:
    """A candidate and why it was proposed: fingerprint -> weight, and the kinds that made it."""

    candidate: Candidate
    fingerprints: dict[str, float] = field(default_factory=dict)
    reasons: set[str] = field(default_factory=set)

    @property
    def weight(self) -> float:
        return sum(self.fingerprints.values())


# ---------------------------------------------------------------------- statement analysis


@dataclass
class Access:
    """How one statement uses one table reference."""

    table: str
    eq: list[str] = field(default_factory=list)
    range: list[str] = field(default_factory=list)
    join: list[str] = field(default_factory=list)
    ored: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    group: list[str] = field(default_factory=list)
    used: set[str] = field(default_factory=set)
    star: bool = False
    #: equality with a literal (not a $n parameter): column -> rendered literal
    constants: dict[str, str] = field(default_factory=dict)


def resolve_table(name: str, catalog: Mapping[str, TableInfo]) -> str | None:
    """`schema.table` of a table as written (an unqualified name is looked up, public first)."""
    if "." in name:
        return name if name in catalog else None
    if f"public.{name}" in catalog:
        return f"public.{name}"
    found = [k for k in catalog if k.rpartition(".")[2] == name]
    return found[0] if len(found) == 1 else None


def analyze(tree: exp.Expr | None, catalog: Mapping[str, TableInfo]) -> list[Access]:
    """Every table reference of a statement with the columns it filters, joins, sorts, groups."""
    if tree is None:
        return []
    try:
        scopes = traverse_scope(tree)
    except Exception:  # sqlglot cannot scope every statement (DDL, some DML)
        return []
    out: list[Access] = []
    for scope in scopes:
        out.extend(_scope_accesses(scope, catalog))
    return out


def _scope_accesses(scope: Scope, catalog: Mapping[str, TableInfo]) -> list[Access]:
    tables: dict[str, Access] = {}
    for alias, source in scope.sources.items():
        if isinstance(source, exp.Table) and source.name:
            written = f"{source.db}.{source.name}" if source.db else source.name
            resolved = resolve_table(written, catalog)
            if resolved is not None:
                tables[alias] = Access(resolved)
    if not tables:
        return []

    def owner(col: exp.Column) -> Access | None:
        if col.table:
            return tables.get(col.table)
        if len(tables) == 1 and len(scope.sources) == 1:
            return next(iter(tables.values()))
        having = [a for a in tables.values() if col.name in catalog[a.table].columns]
        return having[0] if len(having) == 1 else None

    node = scope.expression
    for col in scope.columns:
        acc = owner(col)
        if acc is not None:
            acc.used.add(col.name)
    if isinstance(node, exp.Select):
        for proj in node.expressions:
            if isinstance(proj, exp.Star):
                for acc in tables.values():
                    acc.star = True
            elif isinstance(proj, exp.Column) and isinstance(proj.this, exp.Star):
                acc = tables.get(proj.table)
                if acc is not None:
                    acc.star = True
    conjuncts: list[exp.Expr] = []
    where = node.args.get("where")
    if where is not None:
        conjuncts += _flatten_and(where.this)
    for join in node.args.get("joins") or ():
        on = join.args.get("on")
        if on is not None:
            conjuncts += _flatten_and(on)
    for pred in conjuncts:
        _classify(pred, owner, set(scope.sources))
    _order_group(node, owner)
    return list(tables.values())


def _flatten_and(node: exp.Expr) -> list[exp.Expr]:
    node = node.unnest() if isinstance(node, exp.Paren) else node
    if isinstance(node, exp.And):
        return _flatten_and(node.this) + _flatten_and(node.expression)
    return [node]


def _bare_column(node: exp.Expr | None) -> exp.Column | None:
    while isinstance(node, exp.Paren):
        node = node.this
    return node if isinstance(node, exp.Column) and isinstance(node.this, exp.Identifier) else None


def _constant(node: exp.Expr | None, sources: Collection[str]) -> bool:
    """No column of this scope's sources in it (literals, $n, outer columns of a correlation)."""
    if node is None or isinstance(node, exp.Query | exp.Subquery):
        return False
    return not any(c.table in sources or not c.table for c in node.find_all(exp.Column))


def _literal(node: exp.Expr | None) -> str | None:
    """The rendered literal of a constant side (None for $n, expressions, casts of $n)."""
    while isinstance(node, exp.Paren | exp.Cast):
        node = node.this
    if isinstance(node, exp.Literal):
        if node.is_string:
            return quote_literal(node.this)
        return node.this if _NUMBER.match(node.this) else None
    if isinstance(node, exp.Boolean):
        return "true" if node.this else "false"
    if isinstance(node, exp.Neg):
        inner = _literal(node.this)
        return f"-{inner}" if inner and _NUMBER.match(inner) else None
    return None


def _add(items: list[str], name: str) -> None:
    if name not in items:
        items.append(name)


def _classify(
    pred: exp.Expr,
    owner: Callable[[exp.Column], Access | None],
    tables: Collection[str],
) -> None:
    if isinstance(pred, exp.Paren):
        pred = pred.unnest()
    if isinstance(pred, exp.Or):
        for side in _flatten_or(pred):
            col = _simple_column(side, tables)
            acc = owner(col) if col is not None else None
            if acc is not None and col is not None:
                _add(acc.ored, col.name)
        return
    if isinstance(pred, exp.EQ | exp.NullSafeEQ):
        left, right = _bare_column(pred.this), _bare_column(pred.expression)
        lacc = owner(left) if left is not None else None
        racc = owner(right) if right is not None else None
        if left is not None and lacc is not None and right is not None and racc is not None:
            if lacc is not racc:
                _add(lacc.join, left.name)
                _add(racc.join, right.name)
            return
        for col, acc, other in ((left, lacc, pred.expression), (right, racc, pred.this)):
            if col is not None and acc is not None and _constant(other, tables):
                _add(acc.eq, col.name)
                lit = _literal(other)
                if lit is not None:
                    acc.constants[col.name] = lit
        return
    if isinstance(pred, exp.Is):
        col = _bare_column(pred.this)
        acc = owner(col) if col is not None else None
        if col is not None and acc is not None and isinstance(pred.expression, exp.Null):
            _add(acc.eq, col.name)
            acc.constants[col.name] = "NULL"
        return
    if isinstance(pred, exp.In):
        col = _bare_column(pred.this)
        acc = owner(col) if col is not None else None
        if col is not None and acc is not None:
            if pred.args.get("query") is not None:
                _add(acc.join, col.name)
            elif all(_constant(e, tables) for e in pred.expressions):
                _add(acc.eq, col.name)
        return
    if isinstance(pred, (*_RANGE, exp.Between)):
        sides = [pred.this] + (
            [pred.args.get("low"), pred.args.get("high")]
            if isinstance(pred, exp.Between)
            else [pred.expression]
        )
        for i, side in enumerate(sides):
            col = _bare_column(side)
            acc = owner(col) if col is not None else None
            others = [s for j, s in enumerate(sides) if j != i]
            if col is not None and acc is not None and all(_constant(o, tables) for o in others):
                _add(acc.range, col.name)
                break


def _flatten_or(node: exp.Expr) -> list[exp.Expr]:
    node = node.unnest() if isinstance(node, exp.Paren) else node
    if isinstance(node, exp.Or):
        return _flatten_or(node.this) + _flatten_or(node.expression)
    return [node]


def _simple_column(pred: exp.Expr, tables: Collection[str]) -> exp.Column | None:
    if isinstance(pred, (exp.EQ, exp.In, exp.Is, exp.Between, *_RANGE)):
        col = _bare_column(pred.this)
        if col is not None:
            return col
        if isinstance(pred, exp.EQ):
            return _bare_column(pred.expression)
    return None


def _order_group(node: exp.Expr, owner: Callable[[exp.Column], Access | None]) -> None:
    order = node.args.get("order")
    if order is not None:
        cols = [_bare_column(o.this) for o in order.expressions]
        dirs = {bool(o.args.get("desc")) for o in order.expressions}
        accs = {id(owner(c)) for c in cols if c is not None}
        if cols and all(c is not None for c in cols) and len(accs) == 1 and len(dirs) == 1:
            acc = owner(cols[0])  # type: ignore[arg-type]
            if acc is not None:
                for c in cols:
                    _add(acc.order, c.name)  # type: ignore[union-attr]
    group = node.args.get("group")
    if group is not None:
        gcols = [_bare_column(g) for g in group.expressions]
        if gcols and all(c is not None for c in gcols):
            gaccs = {id(owner(c)) for c in gcols if c is not None}
            acc = owner(gcols[0])  # type: ignore[arg-type]
            if len(gaccs) == 1 and acc is not None:
                for c in gcols:
                    _add(acc.group, c.name)  # type: ignore[union-attr]


# ---------------------------------------------------------------------- candidate generation


@dataclass(frozen=True)
class CandidateConfig:
    #: tables with fewer rows are not worth an index
    min_rows: float = 10_000
    max_columns: int = 3
    #: INCLUDE only when the statement reads at most this many further columns ...
    max_include: int = 3
    #: ... and the table has at least this many times as many columns as the statement reads
    include_width_ratio: float = 1.5
    #: a constant predicate dominates a fingerprint when this share of its samples has it
    partial_share: float = 0.8
    partial_min_samples: int = 2


def generate_candidates(
    workload: Iterable[WorkloadItem],
    catalog: Mapping[str, TableInfo],
    config: CandidateConfig | None = None,
) -> list[CandidateInfo]:
    """Candidate indexes for a weighted workload, heaviest first (see the module docstring)."""
    cfg = config or CandidateConfig()
    found: dict[Candidate, CandidateInfo] = {}
    by_fp: dict[str, list[WorkloadItem]] = defaultdict(list)
    for item in workload:
        by_fp[item.fingerprint].append(item)
    for fp, items in by_fp.items():
        weight = max(i.weight for i in items)
        samples = [analyze(parse_statement(i.sql), catalog) for i in items]
        samples = [s for s in samples if s]
        if not samples:
            continue
        constants = _dominant_constants(samples, cfg)
        for acc in samples[0]:
            info = catalog[acc.table]
            if info.rows < cfg.min_rows:
                continue
            for cand, reason in _access_candidates(acc, info, cfg, constants.get(acc.table, {})):
                if _covered(cand, info):
                    continue
                entry = found.get(cand)
                if entry is None:
                    entry = found[cand] = CandidateInfo(cand)
                entry.fingerprints[fp] = max(entry.fingerprints.get(fp, 0.0), weight)
                entry.reasons.add(reason)
    return sorted(found.values(), key=lambda c: (-c.weight, c.candidate.label))


def _dominant_constants(
    samples: Sequence[list[Access]], cfg: CandidateConfig
) -> dict[str, dict[str, str]]:
    """table -> column -> literal for equality constants most samples of a fingerprint share."""
    if len(samples) < cfg.partial_min_samples:
        return {}
    counts: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for accesses in samples:
        for acc in accesses:
            for col, lit in acc.constants.items():
                counts[(acc.table, col)][lit] += 1
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for (table, col), values in counts.items():
        lit, n = values.most_common(1)[0]
        if n >= cfg.partial_share * len(samples):
            out[table][col] = lit
    return out


def _order_eq(cols: Sequence[str], info: TableInfo) -> list[str]:
    """Equality columns, most distinct first (stable when statistics are missing)."""
    return sorted(cols, key=lambda c: -info.distinct(c))


def _access_candidates(
    acc: Access, info: TableInfo, cfg: CandidateConfig, constants: Mapping[str, str]
) -> list[tuple[Candidate, str]]:
    known = set(info.columns)

    def ok(cols: Iterable[str]) -> list[str]:
        return [c for c in cols if not known or c in known]

    eq = _order_eq(ok(acc.eq), info)
    rng = [c for c in ok(acc.range) if c not in eq]
    keys: list[tuple[tuple[str, ...], str]] = []

    def add(cols: Sequence[str], reason: str) -> None:
        out: list[str] = []
        for c in cols:
            if c not in out:
                out.append(c)
        if out:
            keys.append((tuple(out[: cfg.max_columns]), reason))

    if eq or rng:
        add(eq + rng[:1], "where")
    for c in eq + rng + ok(acc.ored):
        add([c], "single")
    order = ok(acc.order)
    if order and len(order) == len(acc.order):
        add(eq + order, "order_by")
    group = ok(acc.group)
    if group and len(group) == len(acc.group):
        add(eq + group, "group_by")
    for j in ok(acc.join):
        add([j], "join")
        if eq:
            add([*eq, j], "join")
    out: list[tuple[Candidate, str]] = []
    for cols, reason in keys:
        cand = Candidate(acc.table, cols)
        out.append((cand, reason))
        if reason in ("where", "order_by", "join") and not acc.star:
            extra = sorted(ok(acc.used - set(cols)))
            wide = len(info.columns) >= cfg.include_width_ratio * len(acc.used | set(cols))
            if extra and len(extra) <= cfg.max_include and wide:
                out.append((Candidate(acc.table, cols, tuple(extra)), "include"))
        for col, lit in constants.items():
            if col in cols and len(cols) > 1 and col in known | {col}:
                rest = tuple(c for c in cols if c != col)
                op, value = ("IS NULL", "") if lit == "NULL" else ("=", lit)
                out.append((Candidate(acc.table, rest, (), (col, op, value)), "partial"))
    return out


def _covered(cand: Candidate, info: TableInfo) -> bool:
    """An existing index already gives this key order (the candidate is a prefix of it)."""
    for ix in info.indexes:
        if ix.predicate is not None and (
            cand.predicate is None or ix.predicate.replace('"', "") != cand.where_sql(False)
        ):
            continue
        if ix.columns[: len(cand.columns)] != cand.columns:
            continue
        if set(cand.include) <= set(ix.columns) | set(ix.include):
            return True
    return False


def estimate_size(cand: Candidate, info: TableInfo) -> int:
    """Bytes of a B-tree on the candidate's columns: rows x (tuple header + widths) / fill."""
    width = sum(info.avg_width.get(c, 8.0) for c in (*cand.columns, *cand.include))
    tuple_bytes = 8 + 4 + 8 * math.ceil((width + 1e-9) / 8)  # header + line pointer, aligned
    rows = max(info.rows, 0.0)
    if cand.predicate is not None:
        rows *= 0.3  # unknown selectivity of the predicate: a guess, HypoPG knows better
    return int(rows * tuple_bytes / 0.9) + 8192


# ---------------------------------------------------------------------- what-if evaluation


def plan_total_cost(explain_output: Any) -> float:
    """The total cost of EXPLAIN (FORMAT JSON) output (parsed JSON or its text)."""
    doc = json.loads(explain_output) if isinstance(explain_output, str | bytes) else explain_output
    if isinstance(doc, list):
        doc = doc[0]
    return float(doc["Plan"]["Total Cost"])


def has_params(sql: str) -> int:
    """The highest $n placeholder in a SQL text (0 if none), ignoring string literals."""
    stripped = re.sub(r"'(?:[^']|'')*'", "''", sql)
    return max((int(m.group(1)) for m in _PARAM.finditer(stripped)), default=0)


@dataclass
class WhatIfConfig:
    #: None: use HypoPG when the extension is there; False: always the transaction fallback
    hypopg: bool | None = None
    #: the fallback builds indexes only on tables smaller than this
    max_build_bytes: int = 256 * 1024 * 1024
    lock_timeout_ms: int = 2_000
    statement_timeout_ms: int = 60_000


class WhatIf:
    """EXPLAIN costs of statements under hypothetical index configurations.

    `query` runs on one dedicated connection (the proxy's own, never a client's). Call `setup`
    once; then `costs(sqls, candidates)` any number of times: each call is one round that
    creates the candidates, explains every statement and drops them again.
    """

    def __init__(self, query: Query, config: WhatIfConfig | None = None) -> None:
        self.query = query
        self.config = config or WhatIfConfig()
        self.use_hypopg = False
        self.server_version = 150000
        self._prepared = 0

    async def setup(self) -> WhatIf:
        self.server_version = int(await self.query("SHOW server_version_num"))
        # auto_explain must not log the advisor's EXPLAINs (a placeholder if not loaded)
        with contextlib.suppress(Exception):
            await self.query("SET auto_explain.log_min_duration = -1")
        await self.query(f"SET statement_timeout = {int(self.config.statement_timeout_ms)}")
        if self.config.hypopg is not False:
            installed = await self.query(
                "SELECT count(*) FROM pg_extension WHERE extname = 'hypopg'"
            )
            self.use_hypopg = bool(installed)
            if self.config.hypopg and not self.use_hypopg:
                raise RuntimeError("HypoPG is not installed in this database")
        return self

    @property
    def method(self) -> str:
        return "hypopg" if self.use_hypopg else "transaction"

    async def cost(self, sql: str) -> float:
        """EXPLAIN total cost of one statement (its generic plan if it has $n placeholders)."""
        body = sql.strip().rstrip(";")
        n = has_params(body)
        if not n:
            return plan_total_cost(await self.query(f"EXPLAIN (FORMAT JSON) {body}"))
        if self.server_version >= 160000:
            out = await self.query(f"EXPLAIN (GENERIC_PLAN, FORMAT JSON) {body}")
            return plan_total_cost(out)
        self._prepared += 1
        name = f"pgsage_whatif_{self._prepared}"
        await self.query("SET plan_cache_mode = force_generic_plan")
        await self.query(f"PREPARE {name} AS {body}")
        try:
            args = ", ".join(["NULL"] * n)
            return plan_total_cost(
                await self.query(f"EXPLAIN (FORMAT JSON) EXECUTE {name}({args})")
            )
        finally:
            await self.query(f"DEALLOCATE {name}")
            await self.query("RESET plan_cache_mode")

    async def _costs(self, sqls: Mapping[str, str]) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, sql in sqls.items():
            try:
                out[key] = await self.cost(sql)
            except Exception:
                out[key] = math.nan
        return out

    async def costs(
        self,
        sqls: Mapping[str, str],
        candidates: Sequence[Candidate] = (),
        sizes: Mapping[str, TableInfo] | None = None,
    ) -> tuple[dict[str, float], dict[Candidate, int]]:
        """Costs of `sqls` (key -> SQL) with `candidates` added; and each candidate's size.

        A candidate the fallback cannot build (table too large, lock not granted) is left out
        of the round and gets size -1.
        """
        if not candidates:
            return await self._costs(sqls), {}
        if self.use_hypopg:
            return await self._hypopg_round(sqls, candidates)
        return await self._transaction_round(sqls, candidates, sizes or {})

    async def _hypopg_round(
        self, sqls: Mapping[str, str], candidates: Sequence[Candidate]
    ) -> tuple[dict[str, float], dict[Candidate, int]]:
        sizes: dict[Candidate, int] = {}
        try:
            for cand in candidates:
                oid = await self.query(
                    "SELECT indexrelid FROM hypopg_create_index($1)", cand.statement()
                )
                size = await self.query("SELECT hypopg_relation_size($1)", oid)
                sizes[cand] = int(size or 0)
            return await self._costs(sqls), sizes
        finally:
            await self.query("SELECT hypopg_reset()")

    async def _transaction_round(
        self,
        sqls: Mapping[str, str],
        candidates: Sequence[Candidate],
        tables: Mapping[str, TableInfo],
    ) -> tuple[dict[str, float], dict[Candidate, int]]:
        sizes: dict[Candidate, int] = {}
        await self.query("BEGIN")
        try:
            await self.query(f"SET LOCAL lock_timeout = {int(self.config.lock_timeout_ms)}")
            for i, cand in enumerate(candidates):
                info = tables.get(cand.table)
                if info is None or info.size_bytes > self.config.max_build_bytes:
                    sizes[cand] = -1
                    continue
                name = f"pgsage_whatif_{i}"
                await self.query(f"SAVEPOINT {name}")
                try:
                    await self.query(cand.statement(name))
                    size = await self.query(
                        "SELECT pg_relation_size(c.oid) FROM pg_class c"
                        " JOIN pg_namespace n ON n.oid = c.relnamespace"
                        " WHERE c.relname = $1 AND n.nspname = $2",
                        name,
                        cand.table.partition(".")[0],
                    )
                    sizes[cand] = int(size or 0)
                except Exception:  # lock timeout, unknown column...: not part of this round
                    await self.query(f"ROLLBACK TO SAVEPOINT {name}")
                    sizes[cand] = -1
            return await self._costs(sqls), sizes
        finally:
            await self.query("ROLLBACK")


# ---------------------------------------------------------------------- benefit, selection


@dataclass
class Evaluation:
    """What-if result of one candidate: per fingerprint cost before and with it alone."""

    info: CandidateInfo
    size_bytes: int
    base: dict[str, float]
    cost: dict[str, float]
    #: ms of workload time per fingerprint (calls x mean time)
    weights: dict[str, float]
    #: estimated ms per period its maintenance adds to the writes on its table
    write_cost: float = 0.0
    #: filled by a ranker: predicted gain used for ordering (default: the what-if gain)
    score: float | None = None

    def saved(self, fp: str, current: float | None = None) -> float:
        """Estimated ms saved on `fp` relative to `current` cost (default: no index)."""
        base, new = self.base.get(fp, math.nan), self.cost.get(fp, math.nan)
        now = base if current is None else current
        if not (base > 0 and math.isfinite(new) and math.isfinite(now)):
            return 0.0
        return self.weights.get(fp, 0.0) * max(0.0, now - new) / base

    @property
    def gain(self) -> float:
        return sum(self.saved(fp) for fp in self.cost) - self.write_cost

    @property
    def regressions(self) -> list[str]:
        """Fingerprints the what-if says get more expensive by over 10%."""
        return sorted(fp for fp, c in self.cost.items() if c > 1.1 * self.base.get(fp, math.inf))

    @property
    def affected(self) -> list[str]:
        return sorted(fp for fp, c in self.cost.items() if c < self.base.get(fp, 0.0))


def greedy_select(
    evaluations: Sequence[Evaluation],
    budget_bytes: float,
    *,
    min_gain: float = 0.0,
) -> list[Evaluation]:
    """Greedy by marginal gain per byte under a storage budget.

    A fingerprint's cost is the best of the chosen candidates' (indexes rarely add up for one
    table scan), so a second index for a statement already served counts only what it adds.
    Candidates are ordered by `score` when a ranker set one, else by the what-if gain.
    """
    current: dict[str, float] = {}
    chosen: list[Evaluation] = []
    used = 0.0
    remaining = [e for e in evaluations if e.size_bytes >= 0]
    while remaining:
        best: tuple[float, Evaluation] | None = None
        for ev in remaining:
            marginal = sum(ev.saved(fp, current.get(fp)) for fp in ev.cost) - ev.write_cost
            if ev.score is not None and ev.gain > 0:
                marginal *= ev.score / ev.gain
            if marginal <= min_gain or used + ev.size_bytes > budget_bytes:
                continue
            density = marginal / max(ev.size_bytes, 8192)
            if best is None or density > best[0]:
                best = (density, ev)
        if best is None:
            break
        ev = best[1]
        chosen.append(ev)
        used += ev.size_bytes
        remaining.remove(ev)
        for fp, c in ev.cost.items():
            if math.isfinite(c):
                current[fp] = min(current.get(fp, ev.base.get(fp, math.inf)), c)
    return chosen
