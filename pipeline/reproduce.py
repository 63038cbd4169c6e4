"""`python -m pipeline.reproduce RUN_ID`: an MLflow train run's configuration back into params.yaml.

Only the keys that differ move (comments and layout stay; `dvc params diff` shows them), and a few
lines say whether the code commit and the data hashes recorded in the run match the workspace.
The next `dvc repro` then re-creates the run; with `train.deterministic: true`, to the same test
metrics. A run that trained nothing of its own (a sweep's parent or trial) is refused.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import yaml

from pipeline import provenance, tracking
from pipeline.config import PARAMS_FILE, load_params
from pipeline.errors import PipelineError
from pipeline.params_edit import update_params_file
from pipeline.stage_runner import run_stage

log = logging.getLogger(__name__)

# What a run's result depends on; paths, the registry's names and the sweep's settings do not.
REPRODUCED_SECTIONS = ("data", "preprocess", "model", "train")
DATA_TAGS = {"archive": "data.archive_md5", "train": "data.train_dvc_hash",
             "validation": "data.validation_dvc_hash", "test": "data.test_dvc_hash"}  # fmt: skip


def logged_value(text: str, current: Any) -> Any:
    """A param as MLflow stored it (a string) in the type params.yaml holds now."""
    if isinstance(current, str):
        return text
    value = yaml.safe_load(text)  # 'null', 'True', '[32, 64]', '0.0679'
    if isinstance(current, float) and not isinstance(value, bool):
        return float(value)  # '1e-06' reads as a string, '5' as an integer
    return value


def changed_values(run_params: dict[str, str], current: dict[str, Any]) -> dict[str, Any]:
    """The dotted keys whose run value differs from params.yaml, with the run's value."""
    changes = {}
    for key, now in current.items():
        if key.split(".", 1)[0] not in REPRODUCED_SECTIONS:
            continue
        if key not in run_params:
            log.warning("%s: not recorded in the run (older code?); kept at %r", key, now)
            continue
        then = logged_value(run_params[key], now)
        if then != now:
            changes[key] = then
    return changes


def refuse_sweep_runs(run_id: str, tags: dict[str, str]) -> None:
    if "optuna.trial" in tags:
        raise PipelineError(
            f"MLflow run {run_id} is trial {tags['optuna.trial']} of sweep "
            f"{tags.get('optuna.study', '?')!r}, a shortened run on part of the training split; "
            "hand its values back with `python -m pipeline.handback` instead"
        )
    if "optuna.study" in tags:
        raise PipelineError(
            f"MLflow run {run_id} is the parent run of sweep {tags['optuna.study']!r} and trained "
            "nothing; reproduce a train run, or hand the sweep's best back with "
            "`python -m pipeline.handback`"
        )


def provenance_report(tags: dict[str, str], lock_hashes: dict[str, str], paths: Any) -> list[str]:
    """Lines saying whether the run's commit and data hashes match the workspace."""
    lines = []
    commit, workspace = tags.get("git.commit", "unknown"), provenance.git_state()
    if commit == "unknown":
        lines.append("code: the run recorded no git commit")
    elif commit != workspace["git.commit"]:
        lines.append(
            f"code: the run was made at commit {commit[:12]}, the workspace is at "
            f"{workspace['git.commit'][:12]}: `git checkout {commit[:12]}` to re-create it exactly"
        )
    else:
        lines.append(f"code: the workspace is at the run's commit {commit[:12]}")
    if tags.get("git.dirty") == "true":
        lines.append("code: the run was made with uncommitted changes, which are not recorded")
    if workspace["git.dirty"] == "true":
        lines.append("code: the workspace has uncommitted changes to tracked files")
    differ = []
    for name, tag in DATA_TAGS.items():
        path = paths.archive if name == "archive" else paths.prepared / name
        then, now = tags.get(tag, "unknown"), lock_hashes.get(path.as_posix(), "none")
        if then != now:
            differ.append(f"{name} (run {then}, dvc.lock {now})")
    if differ:
        lines.append("data: differs from dvc.lock: " + "; ".join(differ))
    else:
        lines.append("data: the archive and the prepared splits match dvc.lock")
    return lines


def reproduce(run_id: str) -> dict[str, Any]:
    """Writes the run's values into params.yaml; returns the keys that moved."""
    params = load_params()
    run = tracking.get_run(run_id)
    tags = dict(run.data.tags)
    refuse_sweep_runs(run_id, tags)
    if not run.data.params:
        raise PipelineError(f"MLflow run {run_id} has no params: it is not a train run")
    changes = changed_values(dict(run.data.params), params.flat())
    if changes:
        update_params_file(PARAMS_FILE, changes)  # validated whole first; untouched on error
    log.info(
        "%s: %d keys moved to MLflow run %s (%s)%s",
        PARAMS_FILE, len(changes), run_id, run.info.run_name,
        "; `dvc repro` re-creates it" if changes else "; they already match",
    )  # fmt: skip
    for line in provenance_report(tags, provenance.dvc_hashes(), params.paths):
        log.info("%s", line)
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_id", help="an MLflow run id (the MLflow UI shows it on the run)")
    reproduce(parser.parse_args().run_id)


if __name__ == "__main__":
    run_stage(main)
