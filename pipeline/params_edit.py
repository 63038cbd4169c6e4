"""Changing params.yaml: dotted keys set in place with its comments kept, and named recipes.

config.py reads and checks params.yaml; update_params_file is the one writer (`make recipe`,
`make handback`, `make reproduce`): it checks the result with config.py before it replaces the
file, and says what moved.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from io import StringIO
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML

from pipeline.atomic import write_text
from pipeline.config import ParamsError, flatten, params_from_dict, set_dotted

log = logging.getLogger(__name__)

RECIPES_DIR = Path("recipes")  # named sets of params.yaml values


def rounded(value: Any) -> Any:
    """A float to three significant figures, as params.yaml holds them (a sweep's
    0.06791612352895975 is 0.0679 to a reader, and no trial measures the difference)."""
    return float(f"{value:.3g}") if isinstance(value, float) else value


def update_params_file(path: str | Path, values: Mapping[str, Any]) -> dict[str, Any]:
    """Sets dotted keys in params.yaml, keeping its comments and layout; validates first.
    Logs each key whose value moved, with the old value, and returns them.

    Only the given values change: the file is edited as a round-trip document (ruamel.yaml),
    checked as a whole, and then replaced atomically.
    """
    path = Path(path)
    editor = YAML()  # round-trip: comments, order, flow style and quotes survive
    editor.width = 4096  # never re-wrap long lines
    editor.representer.add_representer(  # keep `null` written as `null`, not as nothing
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    original = path.read_text()
    document = editor.load(original)
    for dotted, value in values.items():
        set_dotted(document, dotted, value, str(path))
    text = StringIO()
    editor.dump(document, text)
    params_from_dict(yaml.safe_load(text.getvalue()), source=str(path))  # refuse a bad result
    before = flatten(yaml.safe_load(original) or {})
    write_text(text.getvalue(), path)
    moved = {key: value for key, value in values.items() if before.get(key) != value}
    for key, value in moved.items():
        log.info("%s: %s = %r (was %r)", path, key, value, before.get(key))
    return moved


def load_recipe(name: str) -> dict[str, Any]:
    """A recipe: recipes/<name>.yaml (or a path), a mapping of dotted params.yaml keys to values.

    The keys are checked when the recipe is applied (`with_values`, `update_params_file`).
    """
    path = Path(name) if name.endswith((".yaml", ".yml")) else RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))) or "none"
        raise ParamsError(f"{path}: no such recipe (the recipes in {RECIPES_DIR}/: {known})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(k, str) for k in raw):
        raise ParamsError(f"{path}: expected a mapping of dotted params.yaml keys to values")
    return dict(raw)
