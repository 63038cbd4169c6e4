"""Sweep workers as a Slurm array job (sweep/slurm.sbatch) on a real one-node Slurm cluster, with
the PostgreSQL study and the MLflow server of the fault tests: one task is cancelled mid-trial and
one reaches its time limit mid-trial; the last one finishes the study."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest

from tests.fault_sweeps import ENDS_WITHIN, State, Sweep
from tests.helpers import ROOT, Slurm, run, start_slurm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm() -> Iterator[Slurm]:
    cluster = start_slurm()
    try:
        yield cluster
    finally:
        cluster.stop()


def array_task_of(pid: int) -> str:
    """The array task a worker runs as (the batch script execs Python, so its pid is the task's)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    (task,) = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"SLURM_ARRAY_TASK_ID=")]
    return task.decode()


def worker_of(trial: optuna.trial.FrozenTrial) -> int:
    """The process id of the worker that ran the trial."""
    return int(trial.user_attrs["worker"].rsplit(":", 1)[1])


def wait_until_gone(slurm: Slurm, job: str, task: str | None = None) -> None:
    """Polls squeue until the array job (or one of its tasks) has left the queue."""
    which = job if task is None else f"{job}_{task}"
    deadline = time.monotonic() + ENDS_WITHIN
    while slurm.command("squeue", "-h", "-j", which).strip():
        assert time.monotonic() < deadline, slurm.command("squeue")
        time.sleep(1)


def test_an_array_job_sweeps_through_a_cancelled_task_and_a_time_limit(
    fault_sweep: Callable[..., Sweep], slurm: Slurm
) -> None:
    sweep = fault_sweep(n_trials=10, epochs=12)  # 12 epochs: a trial is still in fit when hit
    submitted = run(
        ["sbatch", "--parsable", "--array=0-2", str(ROOT / "sweep/slurm.sbatch")],
        sweep.project, **sweep.env, **slurm.env,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    started = time.monotonic()

    # `scancel` of one task while its trial trains: Slurm sends SIGTERM, then SIGKILL.
    in_fit = sweep.in_fit()
    cancelled = worker_of(in_fit)
    cancelled_task = array_task_of(cancelled)
    slurm.command("scancel", f"{job}_{cancelled_task}")
    wait_until_gone(slurm, job, cancelled_task)

    # Another task's time limit cut to one minute: at its next check (every 30 s or so) Slurm
    # signals it (SIGTERM), and past the limit ends it (SIGTERM, then SIGKILL after KillWait).
    timed_out = worker_of(sweep.wait_for(
        lambda t: t.state == State.RUNNING and worker_of(t) != cancelled, "on another task"
    ))  # fmt: skip
    timed_out_task = array_task_of(timed_out)
    slurm.command("scontrol", "update", f"JobId={job}_{timed_out_task}", "TimeLimit=1")
    wait_until_gone(slurm, job)
    seconds = time.monotonic() - started

    trials = sweep.check(workers=3)
    # The time-limited task stops on the warning (--signal=B:TERM@120, already due: the worker
    # exits 130) or at the limit itself (TIMEOUT), whichever Slurm's periodic check sends first.
    for pid, task, states in (
        (cancelled, cancelled_task, {"JobState=CANCELLED"}),
        (timed_out, timed_out_task, {"JobState=TIMEOUT", "JobState=FAILED"}),
    ):
        shown = slurm.command("scontrol", "show", "job", f"{job}_{task}")
        assert any(state in shown for state in states), shown
        assert "JobState=FAILED" not in shown or "ExitCode=130:0" in shown, shown
        output = (sweep.project / f"slurm-cifar10-sweep-{job}_{task}.out").read_text()
        assert "Traceback" not in output, output[-3000:]
        # The trial it held when Slurm stopped it (none, if it was between two trials, as the
        # time limit may find it) went back to the study and was retried.
        held = [t for t in trials if worker_of(t) == pid and t.state == State.FAIL]
        assert len(held) <= 1, held
        for trial in held:
            handed_back = f"trial {trial.number} failed as this worker stopped; queued again"
            assert handed_back in output, output[-3000:]
            sweep.retried(trial.number)
    assert trials[in_fit.number].state == State.FAIL  # the cancelled task's trial was cut
    (last,) = {"0", "1", "2"} - {cancelled_task, timed_out_task}
    shown = slurm.command("scontrol", "show", "job", f"{job}_{last}")
    assert "JobState=COMPLETED" in shown, shown
    print(
        f"Slurm array {job} of 3 tasks: task {cancelled_task} cancelled, task "
        f"{timed_out_task} timed out, task {last} completed the study: {len(trials)} trials, "
        f"{len([t for t in trials if t.state == State.FAIL])} failed and retried, in {seconds:.0f} s"
    )
