"""Which modules are served by a compiled build, and the import hook that keeps a stale build
from serving (the builds themselves: models/accel.py, ``make accel``).

It sits in the lowest layer so that every package can install the hook before it imports a
compiled module of its own: ``optimizer``, ``models`` and ``proxy`` each call `install` in their
``__init__``. (An extension module is found before its source by the ordinary import, so a
build older than its source, say after an edit without ``make accel``, would otherwise serve
old code wherever ``optimizer`` was imported first.)
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
#: modules compiled by models.accel's `build`: the query log worker's per-execution work (the
#: anomaly detector; building query_logs rows and their binary COPY; the literal-masked cache
#: keys and literal classes of statement texts), and the relay's statement tracker and frame
#: scanner (stdlib only, `mypy --strict`). Not proxy/session.py:
#: its relay is mostly uvloop and the kernel, and compiled it measured no faster; nor a class
#: an interpreted one inherits from (a compiled base refuses interpreted subclasses)
ACCELERATED = (
    "models.anomaly",
    "proxy.protocol.tracker",
    "proxy.protocol.framing",
    "proxy.telemetry.logrows",
    "optimizer.literals",
)


def source_of(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def stamp_of(module: str) -> Path:
    return source_of(module).with_suffix(".accel")


def extensions_of(module: str) -> list[Path]:
    src = source_of(module)
    return [
        p
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        for p in [src.with_suffix(suffix)]
        if p.exists()
    ]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fresh(module: str) -> bool:
    """An extension of `module` exists and was built from its current source."""
    stamp = stamp_of(module)
    if not extensions_of(module) or not stamp.exists():
        return False
    return stamp.read_text().strip() == digest(source_of(module))


def compiled(module: ModuleType) -> bool:
    """Whether an imported module is the compiled build (not the source)."""
    return not str(getattr(module, "__file__", "")).endswith(".py")


class _SourceWhenStale:  # a meta path finder (importlib.abc's base costs 7 ms to import)
    """Imports an accelerated module from its source when its extension is missing a stamp or
    was built from another version of the source."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in ACCELERATED or not extensions_of(fullname) or fresh(fullname):
            return None  # (no build, or a current one: the ordinary import)
        src = source_of(fullname)
        loader = importlib.machinery.SourceFileLoader(fullname, str(src))
        return importlib.util.spec_from_file_location(fullname, src, loader=loader)


def install() -> None:
    if not any(isinstance(f, _SourceWhenStale) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceWhenStale())
