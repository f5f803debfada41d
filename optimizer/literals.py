"""Statement texts with their literals masked: the cache key of fingerprints, steering templates
and admission's duration estimates (`literal_key`).

Clients that inline literals (psycopg2, pgbench -M simple, most BI tools) send a new text every
time; texts that differ only in numeric or string literals, or in the length of an IN list, get
one key. A key may only merge texts whose fingerprints are the same, so masking stops wherever
it could be unsafe: a text with a dollar sign (dollar quotes, parameters) or a backslash
(escape strings) is its own key, and so is one with an unterminated quote.

Comments are masked whole (they never change a fingerprint; a quote inside one opens no
string literal).

Compiled with mypyc (models/accel.py; the source serves when no build matches it): the log
worker asks this for every statement of the simple protocol, and a scan by hand over the
characters of a compiled string is several times faster than the regular expression it
replaced (the whole key: 0.5 against 3.8 µs on a pgbench text here, 1.4 against 6.8 on a
200-character BI query).

What is masked follows PostgreSQL's lexer (scan.l): a numeric literal is a run of digits not
touching an identifier character, and an identifier character is an ASCII letter or digit, `_`,
`$` or *any* non-ASCII character (scan.l's `ident_cont`, `[A-Za-z\\200-\\377_0-9\\$]`), so the
digits of `t€1` stay: the identifiers `t€1` and `t€2` are different tables. (The regular
expression before took `\\b` for the boundary, which does not hold `€` for a word character, and
gave both one key.)
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

#: quoted identifiers (kept as they are), string literals, numbers with a fraction or exponent
_QUOTED_TEXT = re.compile(
    r"""(?=["'0-9.])(?:"""
    r"""("(?:[^"]|"")*")"""  # quoted identifier: kept as is
    r"""|('(?:[^']|'')*')"""  # string literal
    r"""|(?<![\w$.\x80-\U0010ffff])"""  # a number (ASCII digits), not inside an identifier
    r"""([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?)"""
    r""")"""
)
#: an IN list of masked values (`in` itself not the end of an identifier: t€in(1, 2) is a call)
_IN_LIST = re.compile(r"(?i)(?<![\w$\x80-\U0010ffff])in\s*\(\s*\?(?:\s*,\s*\?)*\s*\)")
QUOTE: Final = 39  # '
DASH: Final = 45  # -
SLASH: Final = 47  # /
STAR: Final = 42  # *


def _mask(match: re.Match[str]) -> str:
    return match.group(1) or "?"


def _ident(o: int) -> bool:
    """An identifier character of PostgreSQL's lexer (by code point)."""
    return (97 <= o <= 122) or (65 <= o <= 90) or (48 <= o <= 57) or o == 95 or o == 36 or o >= 128


def _comment_end(sql: str, i: int) -> int:
    """The index after the `/* ... */` comment opening at `i` (they nest), or -1."""
    depth = 0
    n = len(sql)
    while i < n:
        if sql.startswith("/*", i):
            depth += 1
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return -1


def mask_simple(sql: str) -> str:
    """String literals and the digit runs of numeric literals as `?`, comments as an empty one,
    for a text without double quotes, dollar signs or backslashes; the text itself when a quote
    or comment is unterminated.

    Comments are skipped whole: they never change a fingerprint, and a quote inside one
    (`-- it's`) must not open a string literal that runs on over the SQL after it."""
    n = len(sql)
    parts: list[str] = []
    last = 0
    i = 0
    while i < n:
        o = ord(sql[i])
        if o == QUOTE:
            j = i + 1
            while True:
                k = sql.find("'", j)
                if k < 0:
                    return sql  # unterminated: never merge it with anything
                if k + 1 < n and ord(sql[k + 1]) == QUOTE:
                    j = k + 2  # a doubled quote inside the literal
                    continue
                break
            parts.append(sql[last:i])
            parts.append("?")
            i = k + 1
            last = i
        elif o == DASH and i + 1 < n and ord(sql[i + 1]) == DASH:
            # a comment to the end of the line, which \r ends as well as \n (scan.l's
            # non_newline is [^\n\r])
            end = n
            for newline in ("\n", "\r"):
                k = sql.find(newline, i)
                if 0 <= k < end:
                    end = k
            parts.append(sql[last:i])
            parts.append("--?")
            i = last = end
        elif o == SLASH and i + 1 < n and ord(sql[i + 1]) == STAR:
            end = _comment_end(sql, i)
            if end < 0:
                return sql  # unterminated
            parts.append(sql[last:i])
            parts.append("/*?*/")
            i = last = end
        elif 48 <= o <= 57:
            if i > 0 and _ident(ord(sql[i - 1])):
                # inside an identifier (t1), or the rest of a run already passed over
                i += 1
                continue
            j = i + 1
            while j < n and 48 <= ord(sql[j]) <= 57:
                j += 1
            if j < n and _ident(ord(sql[j])):
                i = j  # touches an identifier character (1e5, 123abc): left as it is
                continue
            parts.append(sql[last:i])
            parts.append("?")
            i = j
            last = i
        else:
            i += 1
    if not parts:
        return sql
    parts.append(sql[last:])
    return "".join(parts)


def literal_key(sql: str) -> str:
    """The text with literals masked, or the text itself where masking could be unsafe."""
    if "$" in sql or "\\" in sql:
        return sql
    masked = _QUOTED_TEXT.sub(_mask, sql) if '"' in sql else mask_simple(sql)
    if "?" in masked and "(" in masked:
        return _IN_LIST.sub("in (?)", masked)
    return masked


class LiteralCache:
    """A bounded LRU of what `compute` makes of a text, by the text and by its `literal_key`:
    texts that differ only in literals share one computation (Fingerprinter's cache; compiled
    here with the key, because the log worker looks up every statement of the simple protocol).

    `compute(sql)` returns (value, mergeable): a value that is not mergeable (a fingerprint of
    text that did not parse) is kept under the text itself, never under the key."""

    def __init__(self, compute: Callable[[str], tuple[Any, bool]], maxsize: int) -> None:
        self.compute = compute
        self.maxsize = maxsize
        self.cache: OrderedDict[str, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def lookup(self, sql: str) -> Any:
        cache = self.cache
        value = cache.get(sql)
        if value is not None:
            self.hits += 1
            cache.move_to_end(sql)
            return value
        key = literal_key(sql)
        value = cache.get(key)
        if value is not None:
            self.hits += 1
            cache.move_to_end(key)
            return value
        self.misses += 1
        value, mergeable = self.compute(sql)
        cache[key if mergeable else sql] = value
        if len(cache) > self.maxsize:
            cache.popitem(last=False)
        return value


def _word(sql: str, i: int) -> bool:
    """sql[i] is a character of Python's `\\w` in a str pattern (letters, digits, `_`)."""
    o = ord(sql[i])
    if o < 128:
        return (97 <= o <= 122) or (65 <= o <= 90) or (48 <= o <= 57) or o == 95
    return sql[i].isalnum()


def _decimal(sql: str, i: int) -> bool:
    """sql[i] is a character of Python's `\\d` in a str pattern (any decimal digit)."""
    o = ord(sql[i])
    if o < 128:
        return 48 <= o <= 57
    return sql[i].isdecimal()


def literal_tokens(sql: str) -> list[tuple[str | None, str | None]]:
    """The literals of a text as optimizer.features' `_LITERALS` finds them, (string content,
    None) or (None, number), in order: the same matches as
    ``'((?:[^']|'')*)'|(?<![\\w$.])(\\d+(?:\\.\\d*)?(?:[eE][+-]?\\d+)?)`` (a test holds the two
    together), by a compiled scan instead of the regular expression's per-position work
    (literal classes are computed for every execution a cost prediction is asked for)."""
    out: list[tuple[str | None, str | None]] = []
    n = len(sql)
    i = 0
    while i < n:
        o = ord(sql[i])
        if o == QUOTE:
            j = i + 1
            pair = -1  # the first quote of the last doubled quote passed over
            end = -1
            while True:
                k = sql.find("'", j)
                if k < 0:
                    end = pair  # the expression backtracks: that quote closes the string
                    break
                if k + 1 < n and ord(sql[k + 1]) == QUOTE:
                    pair = k
                    j = k + 2
                    continue
                end = k
                break
            if end >= 0:
                out.append((sql[i + 1 : end], None))
                i = end + 1
                continue
            i += 1
        elif (48 <= o <= 57) or (o >= 128 and _decimal(sql, i)):
            if i > 0:
                b = ord(sql[i - 1])
                if b == 36 or b == 46 or _word(sql, i - 1):  # $ . or a word character
                    i += 1
                    continue
            j = i + 1
            while j < n and _decimal(sql, j):
                j += 1
            if j < n and ord(sql[j]) == 46:  # .
                j += 1
                while j < n and _decimal(sql, j):
                    j += 1
            if j < n and (ord(sql[j]) == 101 or ord(sql[j]) == 69):  # e E
                k = j + 1
                if k < n and (ord(sql[k]) == 43 or ord(sql[k]) == 45):  # + -
                    k += 1
                if k < n and _decimal(sql, k):
                    k += 1
                    while k < n and _decimal(sql, k):
                        k += 1
                    j = k
            out.append((None, sql[i:j]))
            i = j
        else:
            i += 1
    return out


#: digests of literal-class descriptions seen (the descriptions of one template repeat)
_CLASS_MEMO: dict[str, str] = {}
_CLASS_MEMO_MAX: Final = 65_536


#: the bucket of an infinite value: past every finite one (2 * log2 of the largest double < 2049)
INFINITE: Final = 2049


def magnitude(value: float) -> int:
    """Bucket of |value| in steps of ~1.4x (half powers of two), signed. A literal too large
    for a double (`1e999`) is infinite, and the width between two of them NaN: buckets of
    their own, where `round` raised and took the log worker's whole batch with it."""
    if value != value:
        return 0
    if value in (math.inf, -math.inf):
        return -INFINITE if value < 0 else INFINITE
    size = round(2 * math.log2(abs(value) + 1))
    return -size if value < 0 else size


def class_of_tokens(tokens: list[tuple[str | None, str | None]]) -> str:
    """The literal class (optimizer.features.literal_class) of a text's `literal_tokens`: each
    literal's order of magnitude (a string's by its length) and the widths between consecutive
    numbers, as a short digest. Compiled beside the scan: the cost server asks it of every
    logged execution whose text it has not seen (a text with inlined literals, every time)."""
    parts: list[str] = []
    numbers: list[float] = []
    for string, number in tokens:
        if number is not None:
            value = float(number)
            numbers.append(value)
            parts.append(f"n{magnitude(value)}")
        else:
            parts.append(f"s{magnitude(float(len(string or '')))}")
    for k in range(1, len(numbers)):
        parts.append(f"d{magnitude(numbers[k] - numbers[k - 1])}")
    described = ",".join(parts)
    digest = _CLASS_MEMO.get(described)
    if digest is None:
        digest = hashlib.blake2b(described.encode(), digest_size=6).hexdigest()
        if len(_CLASS_MEMO) >= _CLASS_MEMO_MAX:
            _CLASS_MEMO.clear()
        _CLASS_MEMO[described] = digest
    return digest


def has_parameter(sql: str) -> bool:
    """Whether `sql` holds a bind parameter, `$` and a decimal digit (the regular expression
    `\\$(\\d+)`, whose `\\d` is any Unicode decimal digit, as `str.isdecimal`)."""
    n = len(sql)
    i = sql.find("$")
    while 0 <= i < n - 1:
        if sql[i + 1].isdecimal():
            return True
        i = sql.find("$", i + 1)
    return False


def literal_class(sql: str) -> str:
    """optimizer.features.literal_class, whole in compiled code: the cost server asks it of every
    logged execution whose text it has not seen, and the interpreted glue around the scan and
    the digest was a third of its cost."""
    tokens = literal_tokens(sql)
    if not tokens and has_parameter(sql):
        return "generic"
    return class_of_tokens(tokens)


class ClassKeys:
    """The cost server's cache key of an execution, (fingerprint, static class), where the
    static class is `models.dataset.static_class`: the literal class of the text and the
    variant (`variant`, dataset.text_variant) of its normalised text. Memoised per text and
    per normalised text (at most `max_memo` each, started afresh beyond); compiled, because the
    log worker asks it of every logged execution with a cost model active, and as interpreted
    code around the compiled scan it was a fifth of that worker's time on pgbench -S."""

    def __init__(self, variant: Callable[[str], str], max_memo: int) -> None:
        self.variant = variant
        self.max_memo = max_memo
        self.classes: dict[tuple[str, str], str] = {}
        self.variants: dict[str, str] = {}

    def key(self, fingerprint: str, text: str | None, normalized: str) -> tuple[str, str]:
        sent = text or normalized  # no text logged: the normalised one, as in training
        memo = (sent, normalized)
        lclass = self.classes.get(memo)
        if lclass is None:
            # texts with inlined literals miss the memo above every time; their template's
            # normalised text does not
            variant = self.variants.get(normalized)
            if variant is None:
                if len(self.variants) >= self.max_memo:
                    self.variants.clear()
                variant = self.variant(normalized)
                self.variants[normalized] = variant
            if len(self.classes) >= self.max_memo:
                self.classes.clear()
            lclass = literal_class(sent) + "." + variant
            self.classes[memo] = lclass
        return (fingerprint, lclass)
