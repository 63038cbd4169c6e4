"""Atomic writes: a stage's output is either whole or absent, never half-written."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write a file or a folder to; renamed over `path` when
    the block succeeds, removed when it fails. It keeps `path`'s suffixes (Keras goes by them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffixes = "".join(path.suffixes)
    tmp = path.with_name(f".{path.name.removesuffix(suffixes)}.tmp-{os.getpid()}{suffixes}")
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)  # os.replace moves a folder only onto an empty one
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_text(text: str, path: Path) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def write_json(data: Any, path: Path) -> None:
    """Indented JSON with a trailing newline (stable bytes for DVC), written atomically."""
    write_text(json.dumps(data, indent=2) + "\n", path)
