"""Compiled builds of the hottest pure-Python modules (mypyc), with the source as the fallback.

The anomaly detector walks every logged execution through a per-fingerprint state machine in the
query log worker: on `pgbench -S -c 8` it was the largest share of that process's CPU, spread over
many short Python lines (issue "Proxy performance"); the relay's statement tracker and frame
scanner run for every message. mypyc, mypy's own compiler (mypy ships compiled with it), turns
the unchanged, type-annotated modules into C extensions (the detector 2.5x faster per
execution), with no second implementation to keep in step.

- `build` (``make accel``, run by ``make run`` and ``make test``) compiles each module of
  `ACCELERATED` next to its source and records the source's SHA-256 beside it
  (``<module>.accel``). No compiler, no mypy, or a failed build: a warning, and the source
  serves.
- An extension built from another version of the source is never used: `install`
  (optimizer/compiled.py, called by the ``__init__`` of ``optimizer``, ``models`` and
  ``proxy``) puts a finder first on ``sys.meta_path`` that imports the source instead when the
  stamp does not match it (an edit after the last build), so a stale build cannot shadow new
  code. `compiled` tells which one was imported. The list of modules, `ACCELERATED`, is there.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from optimizer.compiled import (
    ACCELERATED,
    compiled,
    digest,
    extensions_of,
    fresh,
    install,
    source_of,
    stamp_of,
)

__all__ = ["ACCELERATED", "build", "clean", "compiled", "fresh", "install", "load_compiled",
           "load_source"]  # fmt: skip

#: mypyc reads only the module itself: everything it imports is taken as untyped (seconds, not
#: the minutes of type-checking NumPy, pandas and scikit-learn's stubs)
MYPYC_CONFIG = """\
[mypy]
python_version = 3.11
follow_imports = skip
ignore_missing_imports = True
"""


def load_source(module: str) -> ModuleType:
    """`module` loaded from its source as a module of its own (`<package>._<name>_source`),
    beside whatever was imported: to compare the two."""
    package, _, name = module.rpartition(".")
    spec = importlib.util.spec_from_file_location(f"{package}._{name}_source", source_of(module))
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded  # (dataclasses look their module up)
    spec.loader.exec_module(loaded)
    return loaded


def load_compiled(module: str) -> ModuleType:
    """`module`'s compiled build, built first when missing or stale (RuntimeError when mypyc
    cannot): the imported module if that is the build, else the build loaded beside it."""
    if not fresh(module) and build([module], quiet=True) != [module]:
        raise RuntimeError(f"mypyc could not compile {module}")
    imported = sys.modules.get(module)
    if imported is not None and compiled(imported):
        return imported
    spec = importlib.util.spec_from_file_location(module, extensions_of(module)[0])
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def build(modules: Sequence[str] = ACCELERATED, quiet: bool = False) -> list[str]:
    """Compile `modules` in place; the ones built (the rest keep serving from source)."""
    import shutil
    import subprocess
    import tempfile

    built = []
    for module in modules:
        if fresh(module):
            built.append(module)
            continue
        src = source_of(module)
        with tempfile.TemporaryDirectory(prefix="pgsage-mypyc-") as tmp:
            config = Path(tmp, "mypyc.ini")
            config.write_text(MYPYC_CONFIG)
            before = digest(src)
            # mypyc works in the scratch directory: its build/ there, and the extensions copied
            # to the module's package path under it
            out = Path(tmp).joinpath(*module.split(".")[:-1])
            out.mkdir(parents=True, exist_ok=True)
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "mypyc", "--config-file", str(config),
                     "--cache-dir", str(Path(tmp, "cache")), str(src)],
                    cwd=tmp, capture_output=True, text=True, timeout=600,
                )  # fmt: skip
            except (OSError, subprocess.TimeoutExpired) as exc:
                print(f"pgsage: {module} not compiled ({exc}); the source serves", file=sys.stderr)
                continue
            # the module's extension and mypyc's runtime library for it
            made = sorted(out.glob(f"{src.stem}*.so")) + sorted(out.glob(f"{src.stem}*.pyd"))
            if proc.returncode != 0 or not made:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                print(f"pgsage: {module} not compiled; the source serves:\n{tail}",
                      file=sys.stderr)  # fmt: skip
                continue
            clean([module])
            for so in made:
                shutil.copy2(so, src.parent / so.name)
        stamp_of(module).write_text(before + "\n")
        built.append(module)
        if not quiet:
            print(f"pgsage: compiled {module}", file=sys.stderr)
    return built


def clean(modules: Sequence[str] = ACCELERATED) -> None:
    for module in modules:
        for p in [*extensions_of(module), stamp_of(module)]:
            p.unlink(missing_ok=True)
        # mypyc's runtime library for the group: <module>__mypyc.<suffix> beside it
        src = source_of(module)
        for p in src.parent.glob(f"{src.stem}__mypyc.*"):
            p.unlink(missing_ok=True)
