"""Stage `preprocess`: paths.archive -> train/validation/test arrays (paths.prepared) + data report.

The validation split is carved from the training batches, stratified by class and seeded; the
test batch passes through untouched. Pixels stay uint8: scaling belongs to the model.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import replacing, write_json
from pipeline.cifar import Cifar10, load_cifar10
from pipeline.config import PreprocessParams, load_params
from pipeline.splits import CLASSES_FILE, SPLITS, Split, split_dir, stratified_split
from pipeline.stage_runner import run_stage

log = logging.getLogger(__name__)

STATS_CHUNK = 1000  # images whose squares are taken at once (6 MB as uint16)


@dataclass(frozen=True)
class PreparedData:
    train: Split
    validation: Split
    test: Split
    class_names: tuple[str, ...]

    def split(self, name: str) -> Split:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]


def prepare(cifar: Cifar10, params: PreprocessParams) -> PreparedData:
    """Carves a stratified, seeded validation split from the training images."""
    train_idx, val_idx = stratified_split(cifar.train_labels, params.validation_size, params.seed)
    batches, labels = cifar.train_batches, cifar.train_labels
    return PreparedData(
        train=Split(take_rows(batches, train_idx), labels[train_idx]),
        validation=Split(take_rows(batches, val_idx), labels[val_idx]),
        test=Split(cifar.test_images, cifar.test_labels),
        class_names=cifar.class_names,
    )


def take_rows(arrays: tuple[np.ndarray, ...], indices: np.ndarray) -> np.ndarray:
    """The rows at ascending `indices` of `arrays` placed end to end, gathered batch by batch
    straight into the result (joining the 150 MB of training batches first would cost a copy,
    and fresh memory costs more here than the copying)."""
    out = np.empty((len(indices), *arrays[0].shape[1:]), dtype=arrays[0].dtype)
    start = 0
    for array in arrays:
        low, high = np.searchsorted(indices, [start, start + len(array)])
        np.take(array, indices[low:high] - start, axis=0, out=out[low:high])
        start += len(array)
    return out


def write_split(split: Split, final: Path) -> None:
    """Writes a split to a temporary folder beside its place, then swaps it in."""
    with replacing(final) as staging:
        staging.mkdir()
        np.save(staging / "images.npy", split.images, allow_pickle=False)
        np.save(staging / "labels.npy", split.labels, allow_pickle=False)


def channel_stats(
    images: np.ndarray, chunk_images: int = STATS_CHUNK
) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of the pixels scaled to [0, 1].

    Sums run down each of an image's 3,072 values (a contiguous row, so NumPy vectorises them)
    and then fold into the three channels; squares are taken `chunk_images` images at a time, as
    uint16 (255 ** 2 fits).
    """
    rows = images.reshape(len(images), -1)  # R, G, B interleaved
    total = rows.sum(axis=0, dtype=np.uint64)
    squares = np.zeros(rows.shape[1], dtype=np.uint64)
    for start in range(0, len(rows), chunk_images):
        chunk = rows[start : start + chunk_images].astype(np.uint16)
        squares += np.multiply(chunk, chunk, out=chunk).sum(axis=0, dtype=np.uint64)
    count = max(len(images), 1) * 32 * 32 * 255.0  # per channel, scaled to [0, 1]
    mean = total.reshape(-1, 3).sum(axis=0) / count
    mean_square = squares.reshape(-1, 3).sum(axis=0) / (count * 255.0)
    std = np.sqrt(np.maximum(mean_square - mean**2, 0.0))
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def preprocess(
    archive: Path, params: PreprocessParams, prepared_dir: Path, report_path: Path
) -> dict[str, Any]:
    """The stage's work: decode, split, write the splits and the report; returns the report."""
    data = prepare(load_cifar10(archive), params)
    # The three splits are written and the report counted side by side: NumPy and the kernel's
    # copies into the page cache let go of the GIL, so they run on as many cores.
    with ThreadPoolExecutor(thread_name_prefix="preprocess") as pool:
        written = [
            pool.submit(write_split, data.split(name), split_dir(prepared_dir, name))
            for name in SPLITS
        ]
        report = data_report(data)
        for future in written:
            future.result()
    write_json(list(data.class_names), prepared_dir / CLASSES_FILE)
    write_json(report, report_path)
    return report


def data_report(data: PreparedData) -> dict[str, Any]:
    """Images per class per split and per-channel statistics, for `dvc metrics show`."""
    report: dict[str, Any] = {}
    for name in SPLITS:
        split = data.split(name)
        counts = np.bincount(split.labels, minlength=len(data.class_names))
        mean, std = channel_stats(split.images)
        report[name] = {
            "images": len(split),
            "per_class": {cls: int(n) for cls, n in zip(data.class_names, counts, strict=True)},
            "mean_rgb": mean,
            "std_rgb": std,
        }
    return report


def main() -> None:
    params = load_params()
    log.info("reading %s", params.paths.archive)
    report = preprocess(
        params.paths.archive, params.preprocess, params.paths.prepared, params.paths.data_report
    )
    log.info(
        "wrote %s: %s train / %s validation / %s test images",
        params.paths.prepared,
        *(f"{report[name]['images']:,}" for name in SPLITS),
    )


if __name__ == "__main__":
    run_stage(main)
