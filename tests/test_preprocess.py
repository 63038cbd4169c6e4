"""preprocess: stratified seeded split, uint8 arrays on disk, report, byte-identical reruns."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pipeline.preprocess as preprocess_module
from pipeline.config import params_from_dict
from pipeline.dataset import load_class_names, load_split, stratified_split
from pipeline.errors import PipelineError
from pipeline.preprocess import PixelSums, Rows, image_sums
from tests.conftest import TinyCifar, run, sha256_of, shrink, write_params


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
    planes = images.transpose(0, 3, 1, 2).reshape(20, 3072)  # as the archive stores them
    mean, std = PixelSums.of(image_sums(planes)).mean_std()
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


def test_image_sums_are_exact_for_each_image_and_channel() -> None:
    planes = np.random.default_rng(2).integers(0, 256, size=(150, 3072), dtype=np.uint8)
    planes[7] = 255  # the largest sums an image can have must not overflow
    sums = image_sums(planes)  # 150 images: more than two chunks of SUMS_CHUNK, and a rest
    channels = planes.reshape(150, 3, 1024).astype(np.int64)
    np.testing.assert_array_equal(sums[:, 0], channels.sum(axis=2))
    np.testing.assert_array_equal(sums[:, 1], (channels**2).sum(axis=2))
    assert sums[7, 1].tolist() == [1024 * 255**2] * 3
    # A split's sums are its images' rows: exact integers, whatever the subset.
    picked = np.array([3, 7, 99, 149])
    subset = PixelSums.of(sums[picked])
    assert subset.count == 4 * 1024
    assert subset.total == tuple(int(n) for n in channels[picked].sum(axis=(0, 2)))
    assert subset.squares == tuple(int(n) for n in (channels[picked] ** 2).sum(axis=(0, 2)))


@pytest.mark.parametrize(
    "indices",
    [
        np.arange(60),  # all of them: one run per array
        np.array([0, 19, 20, 21, 39, 59]),  # runs broken at and across the arrays' ends
        np.sort(np.random.default_rng(3).choice(60, 45, replace=False)),
        np.array([42]),
        np.array([], dtype=np.int64),
    ],
)
def test_rows_are_written_as_np_save_writes_them_gathered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, indices: np.ndarray
) -> None:
    rng = np.random.default_rng(4)
    arrays = tuple(rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8) for _ in range(3))
    rows = Rows(arrays, indices)
    gathered = np.concatenate(arrays)[indices]
    monkeypatch.setattr(preprocess_module, "IOV_MAX", 2)  # several writev calls
    preprocess_module._save(tmp_path / "rows.npy", rows)
    np.save(tmp_path / "gathered.npy", gathered)
    assert (tmp_path / "rows.npy").read_bytes() == (tmp_path / "gathered.npy").read_bytes()


def test_a_short_write_of_rows_goes_on_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = (np.arange(4 * 3072, dtype=np.uint16).astype(np.uint8).reshape(4, 32, 32, 3),)
    real_writev = os.writev
    # Each call writes all but the last 100 bytes of its first buffer, and says so.
    monkeypatch.setattr(os, "writev", lambda fd, buffers: real_writev(fd, [buffers[0][:-100]]))
    preprocess_module._save(tmp_path / "rows.npy", Rows(arrays, np.array([0, 2, 3])))
    np.testing.assert_array_equal(np.load(tmp_path / "rows.npy"), arrays[0][[0, 2, 3]])


def test_rows_refuse_indices_out_of_order_or_range() -> None:
    arrays = (np.zeros((5, 2), np.uint8), np.zeros((5, 2), np.uint8))
    for indices in ([3, 2], [1, 1], [-1, 2], [4, 10]):
        with pytest.raises(ValueError, match="strictly ascending, within 0..9"):
            Rows(arrays, np.array(indices))
