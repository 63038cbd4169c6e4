"""Figures the sweep benchmarks share: nearest-rank quantiles and the steady-state window."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def quantile(values: Sequence[float], share: float) -> float:
    """The value at nearest rank `share` of `values` (0.5: the median), to the millisecond."""
    return round(float(np.quantile(values, share, method="nearest")), 3)


def steady_window(ends_by_worker: Iterable[Sequence[Any]]) -> tuple[Any, Any]:
    """(after, before): every worker's first trial ended after, and no worker's last one before;
    the trials between run with every worker busy, none starting or finishing."""
    ends = list(ends_by_worker)
    return max(min(e) for e in ends), min(max(e) for e in ends)
