"""The forests' reference is ordinary traffic: executions the training labels mark are left out."""

from __future__ import annotations

import numpy as np

from models.anomaly import AnomalyModel, fit_and_evaluate
from tests.unit.test_anomaly import synthetic_log


def test_labelled_training_executions_are_not_in_the_forests_reference() -> None:
    executions, kinds = synthetic_log()
    train = executions[: len(executions) // 2]
    labelled = np.array([e.label in kinds for e in train], bool)
    blind = AnomalyModel(n_estimators=30, random_state=0).fit(train)
    told = AnomalyModel(n_estimators=30, random_state=0).fit(train, labelled)
    # the planted x12 regression no longer sets the top of the residual range or the ranks
    assert told.residual_max_ < blind.residual_max_
    assert len(told.view_ref_[0]) < len(blind.view_ref_[0])
    assert len(blind.view_ref_[0]) - len(told.view_ref_[0]) <= int(labelled.sum())


def test_the_planted_regression_is_found_with_the_labelled_reference() -> None:
    executions, kinds = synthetic_log()
    info = fit_and_evaluate(executions, kinds, train_share=0.5).info
    assert info["test"]["per_kind"]["seq_scan"]["recall"] >= 0.8
    assert info["test"]["fpr"] <= 0.02
