"""Stage `preprocess`: paths.archive -> train/validation/test arrays (paths.prepared) + data report.

The validation split is carved from the training batches, stratified by class and seeded; the
test batch passes through untouched. Pixels stay uint8: scaling belongs to the model.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import write_json
from pipeline.cifar import PIXELS, TRAIN_BATCHES, Batch, load_cifar10
from pipeline.cli import run_stage
from pipeline.config import PreprocessParams, load_params
from pipeline.dataset import CLASSES_FILE, SPLITS, split_dir, stratified_split

log = logging.getLogger(__name__)

IOV_MAX = 1024  # buffers per writev call (Linux's limit)
SUMS_CHUNK = 64  # images per step: their squares (384 kB as uint16) stay in the CPU's caches


def image_sums(planes: np.ndarray) -> np.ndarray:
    """Per image and channel, the sum and the sum of squares of its pixels: (N, 2, 3) uint32.

    `planes` is (N, 3072) uint8, R|G|B planes of 32x32 as the archive stores them, so each sum
    runs over one contiguous plane. Exact: 1,024 squares of at most 255**2 fit in uint32.
    """
    channels = planes.reshape(len(planes), 3, -1)
    sums = np.empty((len(planes), 2, 3), dtype=np.uint32)
    squared = np.empty((SUMS_CHUNK, *channels.shape[1:]), dtype=np.uint16)  # 255**2 fits
    for start in range(0, len(planes), SUMS_CHUNK):
        chunk = channels[start : start + SUMS_CHUNK]
        totals, squares = sums[start : start + len(chunk)].transpose(1, 0, 2)
        np.sum(chunk, axis=2, dtype=np.uint32, out=totals)
        np.multiply(chunk, chunk, out=squared[: len(chunk)], dtype=np.uint16)
        np.sum(squared[: len(chunk)], axis=2, dtype=np.uint32, out=squares)
    return sums


@dataclass(frozen=True)
class PixelSums:
    """Per-channel count, sum and sum of squares of uint8 pixels, as exact integers."""

    count: int
    total: tuple[int, ...]
    squares: tuple[int, ...]

    @classmethod
    def of(cls, sums: np.ndarray) -> PixelSums:
        """The sums over images, from their image_sums rows."""
        both = sums.sum(axis=0, dtype=np.uint64)
        return cls(
            count=len(sums) * PIXELS // 3,  # pixels per channel
            total=tuple(int(n) for n in both[0]),
            squares=tuple(int(n) for n in both[1]),
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


# --- writing the splits ------------------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    """The rows at `indices` (ascending) of `arrays` placed end to end, not gathered.

    A split carved from the training batches: it is written to disk straight from the batches,
    which saves a copy of 138 MB (and the fresh memory for it) in preprocess.
    """

    arrays: tuple[np.ndarray, ...]  # C-ordered, same dtype and row shape
    indices: np.ndarray

    def __post_init__(self) -> None:
        total = sum(len(array) for array in self.arrays)
        if len(self.indices) and (
            np.any(np.diff(self.indices) <= 0) or self.indices[0] < 0 or self.indices[-1] >= total
        ):
            raise ValueError(f"indices must be strictly ascending, within 0..{total - 1}")

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.indices), *self.arrays[0].shape[1:])

    def _rows(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(array, its selected rows) for each array."""
        start = 0
        for array in self.arrays:
            low, high = np.searchsorted(self.indices, [start, start + len(array)])
            yield array, self.indices[low:high] - start
            start += len(array)

    def pieces(self) -> list[memoryview]:
        """The selected rows as views of `arrays`, one per run of consecutive rows, in order."""
        pieces = []
        for array, rows in self._rows():
            if not len(rows):
                continue
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1  # where a run of rows ends
            firsts = rows[np.r_[0, breaks]].tolist()
            ends = (rows[np.r_[breaks - 1, len(rows) - 1]] + 1).tolist()
            flat = array.reshape(len(array), -1)
            pieces += [
                flat[first:end].data.cast("B") for first, end in zip(firsts, ends, strict=True)
            ]
        return pieces


@dataclass(frozen=True)
class PreparedSplit:
    """A split as preprocess writes it: its images are an array or rows of the batches."""

    images: np.ndarray | Rows  # uint8 (N, 32, 32, 3)
    labels: np.ndarray  # uint8 (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class PreparedData:
    train: PreparedSplit
    validation: PreparedSplit
    test: PreparedSplit
    class_names: tuple[str, ...]

    def split(self, name: str) -> PreparedSplit:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]


def write_prepared(data: PreparedData, prepared_dir: Path) -> None:
    """Writes each split to a temporary folder beside its place, then swaps it in.

    The splits are written side by side, one thread each: the kernel's copies into the page
    cache then run on as many cores.
    """
    prepared_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=len(SPLITS), thread_name_prefix="write") as writers:
        written = [writers.submit(_write_split, data, prepared_dir, name) for name in SPLITS]
        for future in written:
            future.result()
    write_json(list(data.class_names), prepared_dir / CLASSES_FILE)


def _write_split(data: PreparedData, prepared_dir: Path, name: str) -> None:
    split, final = data.split(name), split_dir(prepared_dir, name)
    staging = prepared_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _save(staging / "images.npy", split.images)
        np.save(staging / "labels.npy", split.labels, allow_pickle=False)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save(path: Path, images: np.ndarray | Rows) -> None:
    """np.save's bytes, for an array or for rows written from where they lie."""
    if isinstance(images, np.ndarray):
        np.save(path, images, allow_pickle=False)
        return
    header = {
        "descr": np.lib.format.dtype_to_descr(images.arrays[0].dtype),
        "fortran_order": False,
        "shape": images.shape,
    }
    with path.open("wb") as file:
        np.lib.format.write_array_header_1_0(file, header)
        file.flush()
        _write_all(file.fileno(), images.pieces())


def _write_all(fd: int, pieces: list[memoryview]) -> None:
    """Writes the pieces in order, IOV_MAX at a time (a short write goes on piece by piece)."""
    for start in range(0, len(pieces), IOV_MAX):
        batch = pieces[start : start + IOV_MAX]
        written = os.writev(fd, batch)  # a regular file takes it all, unless the disk is full
        for piece in batch:
            rest, written = piece[written:], max(0, written - len(piece))
            while len(rest):
                rest = rest[os.write(fd, rest) :]


def preprocess(
    archive: Path, params: PreprocessParams, prepared_dir: Path, report_path: Path
) -> dict[str, Any]:
    """The stage's work: decode, split, write the splits and the report; returns the report."""
    batch_sums: dict[tuple[str, int], Future[np.ndarray]] = {}
    # Pixels are counted on a thread of their own (NumPy drops the GIL), each batch's while the
    # next one inflates and decodes; a split's sums then add up its images' rows.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="count") as counter:

        def count_pixels(batch: Batch) -> None:
            batch_sums[batch.split, batch.number] = counter.submit(image_sums, batch.planes)

        cifar = load_cifar10(archive, on_batch=count_pixels)
        train_idx, val_idx = stratified_split(
            cifar.train_labels, params.validation_size, params.seed
        )
        data = PreparedData(
            train=PreparedSplit(
                Rows(cifar.train_batches, train_idx), cifar.train_labels[train_idx]
            ),
            validation=PreparedSplit(
                Rows(cifar.train_batches, val_idx), cifar.train_labels[val_idx]
            ),
            test=PreparedSplit(cifar.test_images, cifar.test_labels),
            class_names=cifar.class_names,
        )
        write_prepared(data, prepared_dir)
        train_sums = np.concatenate(
            [batch_sums["train", n].result() for n in range(1, TRAIN_BATCHES + 1)]
        )
        sums = {
            "train": PixelSums.of(train_sums[train_idx]),
            "validation": PixelSums.of(train_sums[val_idx]),
            "test": PixelSums.of(batch_sums["test", 0].result()),
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
