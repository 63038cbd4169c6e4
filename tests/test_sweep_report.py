"""The sweep's outputs read from a study alone: trials.csv for trials of older and newer code."""

from __future__ import annotations

import csv
import io

import optuna

from pipeline.sweep_report import trials_table


def test_trials_table_reads_both_fit_layouts_and_counts_epochs() -> None:
    study = optuna.create_study(direction="maximize")
    distribution = optuna.distributions.FloatDistribution(0.001, 0.1, log=True)

    def add(user_attrs: dict[str, object], epochs: dict[int, float]) -> None:
        study.add_trial(
            optuna.trial.create_trial(
                params={"train.learning_rate": 0.01},
                distributions={"train.learning_rate": distribution},
                value=0.5,
                user_attrs=user_attrs,
                intermediate_values=epochs,
            )
        )

    add({"fit_seconds": 12.5, "peak_rss_mb": 900.0}, {1: 0.4, 2: 0.5})  # older code: two attrs
    add({"fit": {"seconds": 7.25, "peak_rss_mb": 850.0}}, {1: 0.45})  # newer code: one attr
    rows = list(csv.DictReader(io.StringIO(trials_table(study, ["train.learning_rate"]))))

    assert list(rows[0])[:6] == [
        "number",
        "state",
        "train.learning_rate",
        "value",
        "duration_s",
        "epochs_run",
    ]
    assert [(r["fit_seconds"], r["peak_rss_mb"], r["epochs_run"]) for r in rows] == [
        ("12.5", "900.0", "2"), ("7.25", "850.0", "1"),
    ]  # fmt: skip
    assert "fit" not in rows[0]


def test_trials_table_of_trials_that_reported_no_epoch() -> None:
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    (row,) = csv.DictReader(io.StringIO(trials_table(study, [])))
    assert row["state"] == "FAIL" and row["epochs_run"] == "0"
