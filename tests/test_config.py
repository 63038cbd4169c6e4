"""params.yaml is read by one module into frozen objects; bad values fail naming the key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.config import (
    ParamsError,
    load_params,
    params_from_dict,
    trial_values,
    with_values,
)
from tests.helpers import ROOT, run, write_params


def test_the_real_params_load_into_frozen_objects() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.preprocess.validation_size == 5000
    assert params.paths.archive == Path("data/raw/cifar-10.tar.gz")
    with pytest.raises(ValidationError, match="frozen"):
        params.preprocess.seed = 1  # type: ignore[misc]


def test_plain_tree_round_trips_and_flattens(params_dict: dict[str, Any]) -> None:
    params = params_from_dict(params_dict)
    assert params.plain() == params_dict
    flat = params.flat()
    assert flat["preprocess.validation_size"] == 5000
    assert flat["data.sha256"] is None


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        (
            "preprocess",
            "validation_size",
            60_000,
            "preprocess.validation_size = 60000: input should be less than 50000",
        ),
        (
            "preprocess",
            "validation_size",
            -5,
            "preprocess.validation_size = -5: input should be greater than 0",
        ),
        (
            "preprocess",
            "validation_size",
            "lots",
            "preprocess.validation_size = 'lots' (str): input should be a valid integer",
        ),
        (
            "preprocess",
            "validation_size",
            True,
            "preprocess.validation_size = True (bool): input should be a valid integer",
        ),
        ("data", "timeout", -1, "data.timeout = -1: input should be greater than 0"),
        ("data", "timeout", "soon", "data.timeout = 'soon' (str): input should be a valid number"),
        (
            "data",
            "sha256",
            "abc",
            "data.sha256 = 'abc': string should match pattern '^[0-9a-f]{64}$'",
        ),
        ("data", "url", 42, "data.url = 42 (int): input should be a valid string"),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(
    params_dict: dict[str, Any], section: str, key: str, value: Any, message: str
) -> None:
    params_dict[section][key] = value
    with pytest.raises(ParamsError, match=re.escape(message)):
        params_from_dict(params_dict)


def test_unknown_and_missing_keys_are_refused(params_dict: dict[str, Any]) -> None:
    params_dict["preprocess"]["validaton_size"] = 10
    with pytest.raises(ParamsError, match=r"unknown key 'preprocess.validaton_size' \(allowed"):
        params_from_dict(params_dict)
    del params_dict["preprocess"]["validaton_size"]
    del params_dict["preprocess"]["seed"]
    with pytest.raises(ParamsError, match="missing key 'preprocess.seed'"):
        params_from_dict(params_dict)
    params_dict["nonsense"] = {}
    with pytest.raises(ParamsError, match="unknown key 'nonsense'"):
        params_from_dict(params_dict)


def test_a_float_written_without_a_dot_is_still_a_number(params_dict: dict[str, Any]) -> None:
    params_dict["data"]["timeout"] = "1e1"  # PyYAML reads 1e1 as a string
    assert params_from_dict(params_dict).data.timeout == 10.0


def test_bad_params_fail_before_any_download(
    tmp_path: Path, params_dict: dict[str, Any], http_server: Any
) -> None:
    params_dict["preprocess"]["validation_size"] = 50_001
    write_params(tmp_path, params_dict)
    result = run(
        ["python", "-m", "pipeline.download"], tmp_path, CIFAR10_URL=http_server.url("x.tar.gz")
    )
    assert result.returncode == 1
    assert "preprocess.validation_size = 50001: input should be less than 50000" in result.stderr
    assert "Traceback" not in result.stderr
    assert http_server.requests == []
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda p: p["train"].update(learning_rate=-0.1),
            "train.learning_rate = -0.1: input should be greater than 0",
        ),
        (
            lambda p: p["model"].update(dense_dropout=1.5),
            "model.dense_dropout = 1.5: input should be less than 1",
        ),
        (
            lambda p: p["train"]["augment"].update(flip="yes"),
            "train.augment.flip = 'yes' (str): input should be a valid boolean",
        ),
        (
            lambda p: p["tune"].update(pruner="sometimes"),
            "tune.pruner = 'sometimes': input should be 'median', 'successive_halving', 'hyperband' or 'none'",
        ),
        (
            lambda p: p["tune"]["space"]["train.momentum"].update(low=0.9, high=0.5),
            "tune.space.train.momentum: low (0.9) must be below high (0.5)",
        ),
        (
            lambda p: p["tune"]["space"]["model.conv_dropout"].update(high=1.2),
            "tune.space.model.conv_dropout: the value 1.2 is refused (model.conv_dropout = 1.2: "
            "input should be less than 1)",
        ),
        (
            lambda p: p["tune"]["space"]["train.learning_rate"].update(low=0.0),
            "tune.space.train.learning_rate: low (0.0) must be > 0 on a log scale",
        ),
        (
            lambda p: p["tune"]["space"].update(
                {"train.learnig_rate": {"low": 0.1, "high": 1, "log": False}}
            ),
            "tune.space.train.learnig_rate: params.yaml has no key 'train.learnig_rate'",
        ),
        (
            lambda p: p["tune"]["space"].update(
                {"data.timeout": {"low": 1, "high": 9, "log": False}}
            ),
            "tune.space.data.timeout: only model.* and train.* params can be tuned",
        ),
        (
            lambda p: p["tune"]["space"].update(
                {"train.schedule": {"choices": ["cosine", "linear"]}}
            ),
            "tune.space.train.schedule: the value 'linear' is refused (train.schedule = 'linear': "
            "input should be 'time_decay', 'step', 'cosine' or 'one_cycle')",
        ),
        (
            lambda p: p["tune"]["space"].update(
                {"train.augment.cutout": {"low": 0, "high": 8.5, "log": False}}
            ),
            "tune.space.train.augment.cutout: train.augment.cutout is an integer, so low and high must be integers",
        ),
        (
            lambda p: p["tune"]["space"].update({"train.schedule": {"choices": []}}),
            "tune.space.train.schedule.choices = []: tuple should have at least 1 item",
        ),
        (
            lambda p: p["tune"]["space"].update(
                {"train.warmup_epochs": {"low": 1, "high": 12, "log": False}}
            ),
            "tune.space.train.warmup_epochs: the value 12.0 is refused (train: warmup_epochs "
            "(12.0) must be below epochs (10)",
        ),
        (
            lambda p: p["tune"].update(reduction_factor=1),
            "tune.reduction_factor = 1: input should be greater than or equal to 2",
        ),
        (
            lambda p: p["tune"].update(grace_seconds=10, heartbeat_seconds=30),
            "tune: grace_seconds (10) must exceed heartbeat_seconds (30)",
        ),
        (
            lambda p: p["tune"].update(enqueue=[{"train.schedule": "step"}]),
            "tune.enqueue[0].train.schedule = 'step': tune.space allows one of "
            "['time_decay', 'cosine', 'one_cycle']",
        ),
        (
            lambda p: p["model"].update(conv_filters=[32, 0]),
            "model.conv_filters[1] = 0: input should be greater than 0",
        ),
    ],
)
def test_training_and_sweep_params_are_checked(
    params_dict: dict[str, Any], change: Any, message: str
) -> None:
    change(params_dict)
    with pytest.raises(ParamsError) as error:
        params_from_dict(params_dict)
    assert message in str(error.value)


def test_a_sweep_trial_keeps_the_share_of_warm_up_in_its_shorter_run(
    params_dict: dict[str, Any],
) -> None:
    params_dict["train"].update(schedule="one_cycle", epochs=50, warmup_epochs=10)
    params_dict["tune"].update(epochs=10)
    params = params_from_dict(params_dict)  # 10 warm-up epochs > a trial's 10: still valid
    trial = with_values(params, trial_values(params, {"train.momentum": 0.85}))
    assert (trial.train.epochs, trial.train.warmup_epochs) == (10, 2.0)
    assert trial.train.momentum == 0.85
    tuned = trial_values(params, {"train.warmup_epochs": 3.0})  # a tuned warm-up is the trial's
    assert tuned["train.warmup_epochs"] == 3.0
