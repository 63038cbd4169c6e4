"""Stage `preprocess`: paths.archive -> train/validation/test arrays (paths.prepared) + data report.

The validation split is carved from the training batches, stratified by class and seeded; the
test batch passes through untouched. Pixels stay uint8: scaling belongs to the model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import write_json
from pipeline.cifar import load_cifar10
from pipeline.cli import run_stage
from pipeline.config import PreprocessParams, load_params
from pipeline.dataset import SPLITS, PreparedData, Split, stratified_split, write_prepared

log = logging.getLogger(__name__)


def prepare(archive: Path, params: PreprocessParams) -> PreparedData:
    """Decodes the archive and splits off the validation set."""
    cifar = load_cifar10(archive)
    train_idx, val_idx = stratified_split(cifar.train_labels, params.validation_size, params.seed)
    return PreparedData(
        train=Split(cifar.train_images(train_idx), cifar.train_labels[train_idx]),
        validation=Split(cifar.train_images(val_idx), cifar.train_labels[val_idx]),
        test=Split(cifar.test_images(), cifar.test_labels),
        class_names=cifar.class_names,
    )


HISTOGRAM_CHUNK = 256  # images per bincount call: small enough to stay in the CPU's caches


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of pixels scaled to [0, 1].

    Exact, from a 256-bin histogram per channel counted in cache-sized chunks: no float copy of
    the images, and the same bits on every run.
    """
    channels = images.shape[-1]
    hist = np.zeros((channels, 256), dtype=np.int64)
    pixels = images.reshape(-1, channels)
    step = HISTOGRAM_CHUNK * images[0].size // channels
    for start in range(0, len(pixels), step):
        chunk = pixels[start : start + step]
        for channel in range(channels):
            hist[channel] += np.bincount(chunk[:, channel], minlength=256)
    values = np.arange(256) / 255.0
    means, stds = [], []
    for channel_hist in hist:
        total = channel_hist.sum()
        mean = float((channel_hist * values).sum() / total)
        var = float((channel_hist * (values - mean) ** 2).sum() / total)
        means.append(round(mean, 6))
        stds.append(round(var**0.5, 6))
    return means, stds


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
    data = prepare(params.paths.archive, params.preprocess)
    write_prepared(data, params.paths.prepared)
    report = data_report(data)
    write_json(report, params.paths.data_report)
    log.info(
        "wrote %s: %s train / %s validation / %s test images",
        params.paths.prepared,
        *(f"{report[name]['images']:,}" for name in SPLITS),
    )


if __name__ == "__main__":
    run_stage(main)
