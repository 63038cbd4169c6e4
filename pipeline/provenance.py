"""Where a run's inputs came from, as tags and dataset inputs of the active MLflow run: the git
commit and whether it was dirty, and DVC's hashes of the archive and of each prepared split."""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import mlflow
import yaml
from mlflow.data.numpy_dataset import from_numpy

from pipeline.config import Params
from pipeline.splits import Split

DVC_LOCK = Path("dvc.lock")


def dvc_hashes(lock: Path = DVC_LOCK) -> dict[str, str]:
    """DVC's hash of every stage output in dvc.lock, by path (a folder's ends in `.dir`)."""
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {
        out["path"]: out["md5"]
        for stage in stages.values()
        for out in stage.get("outs", [])
        if "md5" in out
    }


def git_state() -> dict[str, str]:
    """The commit and whether tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def log_provenance(params: Params) -> None:
    """Tags: git commit and dirtiness, the DVC hashes of the archive and the prepared data."""
    hashes = dvc_hashes()
    tags = git_state()
    tags["data.archive_md5"] = hashes.get(params.paths.archive.as_posix(), "unknown")
    for split in ("train", "validation", "test"):
        path = (params.paths.prepared / split).as_posix()
        tags[f"data.{split}_dvc_hash"] = hashes.get(path, "unknown")
    mlflow.set_tags(tags)


def log_dataset(split: Split, name: str, source: Path, context: str) -> None:
    """An MLflow dataset input whose digest is the split's DVC hash (the UI's Dataset column)."""
    digest = dvc_hashes().get(source.as_posix(), "unknown")
    with warnings.catch_warnings():  # "source can be interpreted in multiple ways": it is a path
        warnings.simplefilter("ignore", UserWarning)
        dataset = from_numpy(
            split.images, targets=split.labels, name=name, digest=digest, source=source.as_posix()
        )
    mlflow.log_input(dataset, context=context)
