"""The prepared splits on disk (paths.prepared): written by preprocess, read by train and evaluate.

(The writing is preprocess's own code, so that a change to it does not make DVC retrain.)

One folder per split, `<prepared>/<split>/images.npy` and `labels.npy`, plus `classes.json`.
Each split is its own DVC output, so it has its own DVC hash (MLflow's dataset digest) and a
stage can depend on train and validation without touching test. Plain .npy files load at disk
speed and are byte-identical for identical arrays (a .npz stores timestamps), so DVC's cache
sees no change when nothing changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

SPLITS = ("train", "validation", "test")
CLASSES_FILE = "classes.json"


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, 32, 32, 3)
    labels: np.ndarray  # uint8 (N,)

    def __len__(self) -> int:
        return len(self.labels)


def stratified_split(
    labels: np.ndarray, size: int, seed: int, what: str = "preprocess.validation_size"
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, picked), each in ascending order, with `size` picked images.

    Each class gives its share of `size` in proportion to its count; the remainders go to the
    classes with the largest fractional shares (ties to the lower class number), so the split is
    exact for any size and the same for the same labels and seed. `what` names the setting that
    asked for `size`, for the error message.
    """
    if not 0 < size < len(labels):
        raise PipelineError(
            f"{what} asks for {size} images; it must be between 1 and {len(labels) - 1}: "
            f"the set it is taken from has {len(labels):,} images"
        )
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * size / len(labels)
    shares = np.floor(exact).astype(int)
    order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: size - shares.sum()]:
        shares[i] += 1
    rng = np.random.default_rng(seed)
    picked = [
        rng.permutation(np.flatnonzero(labels == cls))[:share]
        for cls, share in zip(classes, shares, strict=True)
    ]
    validation = np.sort(np.concatenate(picked))
    train = np.setdiff1d(np.arange(len(labels)), validation, assume_unique=True)
    return train, validation


def split_dir(prepared_dir: Path, name: str) -> Path:
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
    return prepared_dir / name


def split_files(prepared_dir: Path, name: str) -> list[Path]:
    """The split's images.npy and labels.npy; raises PipelineError if either is missing."""
    folder = split_dir(prepared_dir, name)
    paths = [folder / "images.npy", folder / "labels.npy"]
    for path in paths:
        if not path.is_file():
            raise PipelineError(f"{path}: missing; run `dvc repro preprocess` first")
    return paths


def load_split(prepared_dir: Path, name: str) -> Split:
    """One split, checked for shape and dtype."""
    paths = split_files(prepared_dir, name)
    images = np.load(paths[0], allow_pickle=False)
    labels = np.load(paths[1], allow_pickle=False)
    if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3) or len(images) != len(labels):
        raise PipelineError(
            f"{paths[0]}: expected uint8 (N, 32, 32, 3) images with N labels, found "
            f"{images.dtype} {images.shape} with {len(labels)} labels; rerun preprocess"
        )
    return Split(images=images, labels=labels)


def load_class_names(prepared_dir: Path) -> tuple[str, ...]:
    path = prepared_dir / CLASSES_FILE
    try:
        return tuple(json.loads(path.read_text()))
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing; run `dvc repro preprocess` first") from None
