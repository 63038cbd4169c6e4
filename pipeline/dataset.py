"""The prepared splits on disk (paths.prepared): written by preprocess, read by train and evaluate.

One uint8 `.npy` per array (`train_images.npy`, `train_labels.npy`, ...) and `classes.json`.
Plain .npy files load at disk speed, can be memory-mapped and are byte-identical for identical
arrays (a .npz stores timestamps), so DVC's cache sees no change when nothing changed.
"""

from __future__ import annotations

import json
import os
import shutil
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


@dataclass(frozen=True)
class PreparedData:
    train: Split
    validation: Split
    test: Split
    class_names: tuple[str, ...]

    def split(self, name: str) -> Split:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]


def write_prepared(data: PreparedData, out_dir: Path) -> None:
    """Writes the splits to a temporary folder beside out_dir, then swaps it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for name in SPLITS:
            split = data.split(name)
            np.save(staging / f"{name}_images.npy", split.images, allow_pickle=False)
            np.save(staging / f"{name}_labels.npy", split.labels, allow_pickle=False)
        (staging / CLASSES_FILE).write_text(json.dumps(list(data.class_names), indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_split(prepared_dir: Path, name: str, mmap: bool = False) -> Split:
    """One split; `mmap=True` maps the images instead of reading them (for huge sets)."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
    paths = [prepared_dir / f"{name}_{kind}.npy" for kind in ("images", "labels")]
    for path in paths:
        if not path.is_file():
            raise PipelineError(f"{path}: missing; run `dvc repro preprocess` first")
    images = np.load(paths[0], mmap_mode="r" if mmap else None, allow_pickle=False)
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
