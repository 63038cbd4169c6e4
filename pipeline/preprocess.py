"""Stage `preprocess`: paths.archive -> train/validation/test arrays (paths.prepared) + data report.

The validation split is carved from the training batches, stratified by class and seeded; the
test batch passes through untouched. Pixels stay uint8: scaling belongs to the model.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import write_json
from pipeline.cifar import TRAIN_BATCHES, Batch, load_cifar10
from pipeline.cli import run_stage
from pipeline.config import PreprocessParams, load_params
from pipeline.dataset import SPLITS, PreparedData, Split, stratified_split, write_prepared

log = logging.getLogger(__name__)

SUMS_CHUNK = 256  # images per step: their squares (1.5 MB as uint16) stay in the CPU's caches


@dataclass(frozen=True)
class PixelSums:
    """Per-channel count, sum and sum of squares of uint8 pixels.

    Exact integers, so sums of parts add and subtract without error: the training split's are
    all training batches' (counted while the archive inflates) minus the validation split's.
    """

    count: int
    total: tuple[int, ...]
    squares: tuple[int, ...]

    @classmethod
    def of(cls, images: np.ndarray) -> PixelSums:
        """Sums over uint8 (N, H, W, C) images, without a float copy of them."""
        channels = images.shape[-1]
        rows = images.reshape(len(images), -1)  # each row: H * W pixels of C channels
        total = np.zeros(rows.shape[1], dtype=np.uint64)
        squares = np.zeros(rows.shape[1], dtype=np.uint64)
        squared = np.empty((SUMS_CHUNK, rows.shape[1]), dtype=np.uint16)  # 255**2 fits
        for start in range(0, len(rows), SUMS_CHUNK):
            chunk = rows[start : start + SUMS_CHUNK]
            np.multiply(chunk, chunk, out=squared[: len(chunk)], dtype=np.uint16)
            total += chunk.sum(axis=0, dtype=np.uint64)
            squares += squared[: len(chunk)].sum(axis=0, dtype=np.uint64)
        return cls(
            count=len(rows) * rows.shape[1] // channels,
            total=tuple(int(n) for n in total.reshape(-1, channels).sum(axis=0)),
            squares=tuple(int(n) for n in squares.reshape(-1, channels).sum(axis=0)),
        )

    def __add__(self, other: PixelSums) -> PixelSums:
        return self._combine(other, operator.add)

    def __sub__(self, other: PixelSums) -> PixelSums:
        return self._combine(other, operator.sub)

    def _combine(self, other: PixelSums, op: Callable[[int, int], int]) -> PixelSums:
        return PixelSums(
            op(self.count, other.count),
            tuple(map(op, self.total, other.total)),
            tuple(map(op, self.squares, other.squares)),
        )

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and standard deviation of the pixels scaled to [0, 1]."""
        n = self.count
        means = [total / (255 * n) for total in self.total]
        # n * sum(x^2) - sum(x)^2 is an exact integer: no cancellation error in the variance.
        variances = [
            (n * squares - total**2) / (255 * n) ** 2
            for total, squares in zip(self.total, self.squares, strict=True)
        ]
        return [round(m, 6) for m in means], [round(v**0.5, 6) for v in variances]


def preprocess(
    archive: Path, params: PreprocessParams, prepared_dir: Path, report_path: Path
) -> dict[str, Any]:
    """The stage's work: decode, split, write the splits and the report; returns the report."""
    batch_sums: dict[tuple[str, int], Future[PixelSums]] = {}
    # Pixels are counted on a thread of their own (NumPy drops the GIL): each batch's while the
    # next one inflates and decodes (0.35 s less than counting in line, on two cores), the
    # validation split's while the splits are written.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="count") as counter:

        def count_pixels(batch: Batch) -> None:
            batch_sums[batch.split, batch.number] = counter.submit(PixelSums.of, batch.images)

        cifar = load_cifar10(archive, on_batch=count_pixels)
        train_idx, val_idx = stratified_split(
            cifar.train_labels, params.validation_size, params.seed
        )
        data = PreparedData(
            train=Split(cifar.train_images(train_idx), cifar.train_labels[train_idx]),
            validation=Split(cifar.train_images(val_idx), cifar.train_labels[val_idx]),
            test=Split(cifar.test_images, cifar.test_labels),
            class_names=cifar.class_names,
        )
        validation = counter.submit(PixelSums.of, data.validation.images)
        write_prepared(data, prepared_dir)
        first, *rest = [batch_sums["train", n].result() for n in range(1, TRAIN_BATCHES + 1)]
        sums = {
            "train": sum(rest, start=first) - validation.result(),
            "validation": validation.result(),
            "test": batch_sums["test", 0].result(),
        }
    report = data_report(data, sums)
    write_json(report, report_path)
    return report


def data_report(data: PreparedData, sums: dict[str, PixelSums]) -> dict[str, Any]:
    """Images per class per split and per-channel statistics, for `dvc metrics show`."""
    report: dict[str, Any] = {}
    for name in SPLITS:
        split = data.split(name)
        counts = np.bincount(split.labels, minlength=len(data.class_names))
        mean, std = sums[name].mean_std()
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
