"""The compiled anomaly detector (mypyc, models/accel.py) is the source's detector, only faster;
a build from another version of the source is never imported."""

from __future__ import annotations

import subprocess
import sys
from types import ModuleType

import pytest

from models import accel
from tests.unit.test_anomaly import synthetic_log

MODULE = "models.anomaly"


def _python(code: str, *args: str, build: bool = True) -> list[str]:
    """What a fresh interpreter prints for `code`; with `build=False`, as after an edit of
    models/anomaly.py since its build (a stamp that matches no source), restored after."""
    stamp = accel.stamp_of(MODULE)
    saved = stamp.read_text() if stamp.exists() else None
    try:
        if not build:
            stamp.write_text("0" * 64 + "\n")
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                             text=True, check=True)  # fmt: skip
    finally:
        if saved is not None:
            stamp.write_text(saved)
    return out.stdout.split()


@pytest.fixture(scope="module")
def compiled() -> ModuleType:
    """The compiled build, built here when `make accel` has not (or the source changed since)."""
    module = accel.load_compiled(MODULE)
    probe = "import models.anomaly as a, models.accel as x; print(x.compiled(a))"
    assert _python(probe) == ["True"]
    return module


@pytest.mark.parametrize("name", accel.ACCELERATED)
def test_every_accelerated_module_builds_and_is_imported_compiled(name: str) -> None:
    if not accel.fresh(name):
        assert accel.build([name], quiet=True) == [name], f"mypyc could not compile {name}"
    probe = f"import {name} as m, models.accel as x; print(x.compiled(m), m.__file__)"
    out = _python(probe)
    assert out[0] == "True" and not out[1].endswith(".py"), out


def source() -> ModuleType:
    """models/anomaly.py itself, as a module of its own (beside whatever was imported)."""
    return accel.load_source(MODULE)


def _flags(mod: ModuleType, fitted: bool) -> list[tuple[object, ...]]:
    log, _ = synthetic_log(seed=4, days=4.0)
    executions = [mod.Execution(*e) for e in log]
    half = len(executions) // 2
    if fitted:
        model = mod.AnomalyModel(n_estimators=30, random_state=0).fit(executions[:half])
        detector = model.detector()
    else:
        detector = mod.Detector(None)
        detector.process(executions[:half])
    flags = []
    for i in range(half, len(executions), 500):
        flags.extend(detector.process(executions[i : i + 500]))
    return [tuple(f) for f in flags]


@pytest.mark.parametrize("fitted", [True, False], ids=["model", "cold-rules"])
def test_the_compiled_detector_flags_what_the_source_flags(compiled: ModuleType, fitted: bool):
    assert accel.compiled(compiled)
    pure = source()
    assert not accel.compiled(pure)
    want = _flags(pure, fitted)
    assert want, "the planted anomalies are flagged"
    assert _flags(compiled, fitted) == want


def test_a_build_of_another_source_is_not_imported(compiled: ModuleType) -> None:
    probe = "import models.anomaly as a, models.accel as x; print(x.compiled(a), a.__file__)"
    out = _python(probe, build=False)
    assert out == ["False", str(accel.source_of(MODULE))]
    out = _python(probe)
    assert out[0] == "True"


_DUMP = """
import pickle, sys
import models.anomaly as a, models.accel as x
from tests.unit.test_anomaly import synthetic_log
log, _ = synthetic_log(seed=2, days=2.0)
model = a.AnomalyModel(n_estimators=10, random_state=0).fit([a.Execution(*e) for e in log])
pickle.dump(model, open(sys.argv[1], "wb"))
print(x.compiled(a))
"""
_LOAD = """
import pickle, sys
import models.anomaly as a, models.accel as x
from tests.unit.test_anomaly import synthetic_log
model = pickle.load(open(sys.argv[1], "rb"))
log, _ = synthetic_log(seed=2, days=3.0)
flags = model.detector().process([a.Execution(*e) for e in log])
print(x.compiled(a), type(model).__module__, len(model.baselines_), len(flags) > 0)
"""


def test_models_pickled_by_either_load_in_the_other(compiled: ModuleType, tmp_path) -> None:
    """The registry's pickles name models.anomaly's classes: a model trained by the source
    serves in a compiled worker, and the other way round."""
    for trained_compiled in (True, False):
        path = str(tmp_path / f"model-{trained_compiled}.pkl")
        assert _python(_DUMP, path, build=trained_compiled) == [str(trained_compiled)]
        loaded = _python(_LOAD, path, build=not trained_compiled)
        assert loaded[:2] == [str(not trained_compiled), "models.anomaly"]
        assert int(loaded[2]) > 0 and loaded[3] == "True"


def test_the_side_by_side_bench_runs_both_and_compares_their_flags(compiled: ModuleType) -> None:
    from bench import accel as bench_accel

    doc = bench_accel.main(["--executions", "20000", "--rounds", "1", "--no-save"])
    assert doc["same_flags"] and doc["flags"] > 0
    assert set(doc["us_per_execution"]) == {"source", "compiled"}
    assert all(v > 0 for v in doc["us_per_execution"].values())
