"""Sweeps that survive faults of their own processes: a worker killed at three points, a trial
process killed, SIGTERM, and several workers on one SQLite file. Each sweep then passes the same
checks (fault_sweeps.Sweep.check): it ends by itself, with n to n + workers - 1 finished trials,
unique numbers, nothing RUNNING or WAITING, and exactly one FINISHED MLflow child run per finished
trial, every epoch logged once, under the study's single parent run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fault_sweeps import FAULT_SWEEP, State, Sweep, gone
from tests.helpers import sweep_project

pytestmark = pytest.mark.slow


def kill_a_worker_and_check(
    sweep: Sweep, victim: subprocess.Popen[str], doomed: int, others: int = 0
) -> str:
    """SIGKILLs the worker alone; the others (`others` more started once its trial is stale) fail
    its trial, retry it, and finish. Returns what the victim (and its trial process) printed."""
    trial_process = sweep.trials()[doomed].user_attrs.get("process")
    os.kill(victim.pid, signal.SIGKILL)
    if trial_process:  # it hears its worker die and stops at once
        deadline = time.monotonic() + 10
        while not gone(trial_process):
            assert time.monotonic() < deadline, "the dead worker's trial process trains on"
            time.sleep(0.1)
    if others:
        time.sleep(FAULT_SWEEP["grace_seconds"] + 2 * FAULT_SWEEP["heartbeat_seconds"])
        sweep.start(others)
    outputs = sweep.finish()
    victim_output = outputs.pop(victim.pid)
    assert "Traceback" not in victim_output, victim_output[-3000:]
    assert all(worker.returncode == 0 for worker in sweep.workers if worker is not victim), outputs
    trials = sweep.check(workers=3)
    assert trials[doomed].state == State.FAIL
    sweep.retried(doomed)
    return victim_output


def test_a_worker_killed_as_its_trial_starts(fault_sweep: Callable[..., Sweep]) -> None:
    """Killed once its trial's MLflow run is open and before the trial's process exists: a
    worker's first trial waits seconds for the fork server to import TensorFlow."""
    sweep = fault_sweep()
    (victim,) = sweep.start(1)
    sweep.start(2)
    doomed = sweep.wait_for(
        lambda t: t.state == State.RUNNING and "mlflow_run_id" in t.user_attrs
        and "process" not in t.user_attrs and t.user_attrs["worker"].endswith(f":{victim.pid}"),
        "with its run open and no process yet",
    )  # fmt: skip
    kill_a_worker_and_check(sweep, victim, doomed.number)


def test_a_worker_killed_during_fit(fault_sweep: Callable[..., Sweep]) -> None:
    # A tiny epoch takes under half a second: with 4 epochs a busy machine could let the trial
    # finish between the poll that sees it in fit and the kill.
    sweep = fault_sweep(epochs=12)
    sweep.start(3)
    doomed = sweep.in_fit()
    victim = sweep.worker_of(doomed)
    # Only trial processes train: the worker has no TensorFlow loaded, so it is 550 MB smaller.
    assert "libtensorflow_framework" not in Path(f"/proc/{victim.pid}/maps").read_text()
    output = kill_a_worker_and_check(sweep, victim, doomed.number)
    assert output.count("its sweep worker is gone; the trial stops") == 1, output[-3000:]


def test_a_worker_killed_between_fit_and_storing_the_result(
    fault_sweep: Callable[..., Sweep],
) -> None:
    """Stopped (SIGSTOP) the moment its trial's process has exited with the result, and killed
    if Optuna has not stored it yet (else let go, and tried on its next trial). The others start
    once the dead worker's trial is stale: started together with it, they could fill the study
    before any of them looked for stale trials again, and the retry would be down to timing."""
    sweep = fault_sweep()
    (victim,) = sweep.start(1)
    doomed = None
    while doomed is None:
        trial = sweep.wait_for(
            lambda t: t.state == State.RUNNING and "process" in t.user_attrs,
            "training in its own process",
        )  # fmt: skip
        while not gone(trial.user_attrs["process"]):
            time.sleep(0.005)
        os.kill(victim.pid, signal.SIGSTOP)
        if sweep.trials()[trial.number].state == State.RUNNING:
            doomed = trial
        else:
            os.kill(victim.pid, signal.SIGCONT)
    kill_a_worker_and_check(sweep, victim, doomed.number, others=2)


def test_a_killed_trial_process_fails_its_trial_and_the_worker_goes_on(
    fault_sweep: Callable[..., Sweep],
) -> None:
    sweep = fault_sweep(epochs=12)  # as in test_a_worker_killed_during_fit
    sweep.start(3)
    doomed = sweep.in_fit()
    os.kill(doomed.user_attrs["process"], signal.SIGKILL)  # as the out-of-memory killer would
    outputs = sweep.finish()
    assert all(worker.returncode == 0 for worker in sweep.workers), outputs
    trials = sweep.check(workers=3)
    assert trials[doomed.number].state == State.FAIL
    assert "exit code -9" in trials[doomed.number].user_attrs["fail_reason"]
    sweep.retried(doomed.number)


def test_sigterm_fails_the_trial_for_the_others_and_ends_its_run_killed(
    fault_sweep: Callable[..., Sweep],
) -> None:
    sweep = fault_sweep(epochs=12)  # as in test_a_worker_killed_during_fit
    sweep.start(3)
    doomed = sweep.in_fit()
    victim = sweep.worker_of(doomed)
    victim.send_signal(signal.SIGTERM)
    assert victim.wait(timeout=15) == 130
    outputs = sweep.finish()
    assert all(w.returncode == 0 for w in sweep.workers if w is not victim), outputs
    trials = sweep.check(workers=3)
    assert trials[doomed.number].state == State.FAIL
    run = sweep.client.get_run(doomed.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"
    sweep.retried(doomed.number)


def test_several_workers_on_one_sqlite_file(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    project, env = sweep_project(tmp_path, own_mlflow=True, n_trials=5, epochs=2)
    sweep = Sweep(
        project, env, f"sqlite:///{project / 'optuna.db'}", "cifar10-cnn",
        MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]), n_trials=5,
    )  # fmt: skip
    sweep.start(3)
    for output in sweep.finish().values():
        assert "database is locked" not in output and "Traceback" not in output, output[-3000:]
    assert all(worker.returncode == 0 for worker in sweep.workers)
    sweep.check(workers=3)
