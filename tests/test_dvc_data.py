"""The real `dvc repro` of the data stages in a fresh copy of the repository."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from pipeline.splits import load_split
from tests.helpers import (
    ROOT,
    ArchiveServer,
    copy_project,
    run,
    sha256_of,
    shrink,
    write_params,
)


@pytest.mark.slow
def test_dvc_repro_runs_download_and_preprocess_then_nothing(
    tmp_path: Path, http_server: ArchiveServer, python_archive: Path, params_dict: dict[str, Any]
) -> None:
    project = copy_project(tmp_path / "project")
    write_params(project, shrink(params_dict, sha256_of(python_archive)))
    http_server.files["cifar.tar.gz"] = python_archive.read_bytes()
    url = http_server.url("cifar.tar.gz")

    result = run(["dvc", "repro", "preprocess"], project, CIFAR10_URL=url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Running stage 'download'" in result.stdout
    assert "Running stage 'preprocess'" in result.stdout
    assert len(load_split(project / "data/prepared", "validation")) == 30
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"download", "preprocess"}
    assert json.loads((project / "metrics/data.json").read_text())["test"]["images"] == 30

    again = run(["dvc", "repro", "preprocess"], project, CIFAR10_URL=url)
    assert again.returncode == 0, again.stderr
    assert "Running stage" not in again.stdout
    assert "Data and pipelines are up to date" in again.stdout
    assert len(http_server.requests) == 1

    # Changing the split reruns preprocess only; the archive is not fetched again.
    params = shrink(params_dict, sha256_of(python_archive))
    params["preprocess"]["validation_size"] = 50
    write_params(project, params)
    third = run(["dvc", "repro", "preprocess"], project, CIFAR10_URL=url)
    assert third.returncode == 0, third.stderr
    assert "Running stage 'download'" not in third.stdout
    assert "Running stage 'preprocess'" in third.stdout
    assert len(http_server.requests) == 1
    assert (
        np.bincount(load_split(project / "data/prepared", "validation").labels).tolist() == [5] * 10
    )


def _pipeline_imports(module: str) -> set[str]:
    """The pipeline modules that pipeline/<module>.py imports, anywhere in it."""
    tree = ast.parse((ROOT / "pipeline" / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
            found.add(node.module.split(".")[1])  # type: ignore[union-attr]
        elif isinstance(node, ast.ImportFrom) and node.module == "pipeline":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline.")}
    return found


@pytest.mark.parametrize("dvc_file", ["dvc.yaml", "sweep/dvc.yaml"])
def test_each_stage_depends_on_exactly_the_modules_it_imports(dvc_file: str) -> None:
    # A module missing from a stage's deps would let DVC skip the stage after that module
    # changed; one too many would rerun it (a retrain) for nothing.
    for name, stage in yaml.safe_load((ROOT / dvc_file).read_text())["stages"].items():
        entry = stage["cmd"].split("python -m pipeline.")[1].split()[0]
        imported, todo = set(), [entry]
        while todo:
            module = todo.pop()
            if module not in imported:
                imported.add(module)
                todo += _pipeline_imports(module)
        listed = {dep for dep in stage["deps"] if dep.startswith("pipeline/")}
        assert listed == {f"pipeline/{module}.py" for module in imported}, name
