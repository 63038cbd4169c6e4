"""`python -m pipeline.recipe NAME`: writes a recipe (recipes/NAME.yaml) into params.yaml.

A recipe is a named set of params.yaml values: `seed` (the original Keras example's training),
`fast` (75% test accuracy after about 40 s of training on two CPU cores with AVX-512 BF16),
`fast-float32` (the same in float32, for CPUs without bfloat16), `best` (the most accurate).
Only the recipe's keys change; comments and layout stay, `dvc params diff` shows what moved, and
the next `dvc repro` trains with it. Without NAME, lists the recipes.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.config import PARAMS_FILE
from pipeline.params_edit import RECIPES_DIR, load_recipe, update_params_file
from pipeline.stage_runner import run_stage

log = logging.getLogger(__name__)


def summary(name: str) -> str:
    """The first comment line of recipes/<name>.yaml."""
    for line in (RECIPES_DIR / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="a recipe in recipes/, or a path to one")
    args = parser.parse_args()
    if args.name is None:
        for path in sorted(RECIPES_DIR.glob("*.yaml")):
            print(f"{path.stem:<8} {summary(path.stem)}")
        return
    values = load_recipe(args.name)
    moved = update_params_file(PARAMS_FILE, values)
    log.info(
        "applied recipe %s: %d of its %d values moved; `dvc repro` trains with it",
        args.name, len(moved), len(values),
    )  # fmt: skip


if __name__ == "__main__":
    run_stage(main)
