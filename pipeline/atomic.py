"""Atomic file writes: a stage's output is either whole or absent, never half-written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text(text: str, path: Path) -> None:
    """Writes beside `path`, then renames over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(data: Any, path: Path) -> None:
    """Indented JSON with a trailing newline (stable bytes for DVC), written atomically."""
    write_text(json.dumps(data, indent=2) + "\n", path)
