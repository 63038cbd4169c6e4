"""preprocess: stratified seeded split, uint8 arrays on disk, report, byte-identical reruns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pipeline.preprocess as preprocess_module
from pipeline.config import params_from_dict
from pipeline.errors import PipelineError
from pipeline.splits import load_class_names, load_split, stratified_split
from tests.helpers import TinyCifar, run, sha256_of, shrink, write_params


def test_stratified_split_is_exact_seeded_and_disjoint() -> None:
    labels = np.repeat(np.arange(10), 50)
    np.random.default_rng(0).shuffle(labels)
    train, validation = stratified_split(labels, 100, seed=3)
    assert len(validation) == 100 and len(train) == 400
    assert set(train).isdisjoint(validation)
    assert np.bincount(labels[validation]).tolist() == [10] * 10
    _, again_validation = stratified_split(labels, 100, seed=3)
    np.testing.assert_array_equal(validation, again_validation)
    _, other = stratified_split(labels, 100, seed=4)
    assert not np.array_equal(validation, other)
    # A size that does not divide evenly still gives exactly that many, one class at most +1.
    _, odd = stratified_split(labels, 37, seed=3)
    assert len(odd) == 37 and set(np.bincount(labels[odd])) <= {3, 4}


def test_a_validation_split_larger_than_the_archive_is_refused() -> None:
    with pytest.raises(
        PipelineError, match="preprocess.validation_size asks for 300 images; .* has 200 images"
    ):
        stratified_split(np.zeros(200, dtype=np.uint8), 300, seed=0)


def test_channel_stats_match_numpy() -> None:
    images = np.random.default_rng(1).integers(0, 256, size=(20, 32, 32, 3), dtype=np.uint8)
    mean, std = preprocess_module.channel_stats(images, chunk_images=6)  # chunks and a rest
    scaled = images / 255.0
    np.testing.assert_allclose(mean, scaled.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(std, scaled.std(axis=(0, 1, 2)), atol=1e-6)


def run_preprocess(project: Path, archive: Path, params_dict: dict[str, Any]) -> Path:
    params = shrink(params_dict, sha256_of(archive))
    project.mkdir(parents=True, exist_ok=True)
    write_params(project, params)
    target = project / params["paths"]["archive"]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(archive.read_bytes())
    result = run(["python", "-m", "pipeline.preprocess"], project)
    assert result.returncode == 0, result.stderr
    return project / params["paths"]["prepared"]


def test_the_stage_writes_uint8_splits_and_a_report(
    tmp_path: Path, python_archive: Path, tiny: TinyCifar, params_dict: dict[str, Any]
) -> None:
    prepared = run_preprocess(tmp_path, python_archive, params_dict)
    params = params_from_dict(shrink(params_dict))
    sizes = {}
    for name in ("train", "validation", "test"):
        split = load_split(prepared, name)
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (32, 32, 3)
        sizes[name] = len(split)
    assert sizes == {"train": 170, "validation": 30, "test": 30}
    np.testing.assert_array_equal(load_split(prepared, "test").labels, tiny.test_batch[1])
    assert load_class_names(prepared)[0] == "airplane"
    report = json.loads((tmp_path / params.paths.data_report).read_text())
    assert report["validation"]["per_class"] == dict.fromkeys(load_class_names(prepared), 3)
    assert report["train"]["images"] == 170
    assert len(report["test"]["mean_rgb"]) == 3 and len(report["test"]["std_rgb"]) == 3


def test_the_same_inputs_give_byte_identical_outputs(
    tmp_path: Path, python_archive: Path, binary_archive: Path, params_dict: dict[str, Any]
) -> None:
    def digests(prepared: Path) -> dict[str, str]:
        files = sorted(p for p in prepared.rglob("*") if p.is_file())
        return {path.relative_to(prepared).as_posix(): sha256_of(path) for path in files}

    first = digests(run_preprocess(tmp_path / "a", python_archive, params_dict))
    second = digests(run_preprocess(tmp_path / "b", python_archive, params_dict))
    from_binary = digests(run_preprocess(tmp_path / "c", binary_archive, params_dict))
    assert first == second == from_binary
    assert set(first) == {
        f"{split}/{kind}.npy"
        for split in ("train", "validation", "test")
        for kind in ("images", "labels")
    } | {"classes.json"}
    report = (tmp_path / "a/metrics/data.json").read_bytes()
    assert report == (tmp_path / "b/metrics/data.json").read_bytes()


def test_a_bad_archive_leaves_no_prepared_data(
    tmp_path: Path, python_archive: Path, params_dict: dict[str, Any]
) -> None:
    params = shrink(params_dict)
    write_params(tmp_path, params)
    target = tmp_path / params["paths"]["archive"]
    target.parent.mkdir(parents=True)
    target.write_bytes(python_archive.read_bytes()[:5000])
    result = run(["python", "-m", "pipeline.preprocess"], tmp_path)
    assert result.returncode == 1
    assert "truncated or corrupt" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / params["paths"]["prepared"]).exists()
