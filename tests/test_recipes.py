"""Recipes: named sets of params.yaml values, applied in memory or written into params.yaml."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.config import ParamsError, flatten, load_params, with_values
from pipeline.params_edit import RECIPES_DIR, load_recipe
from tests.helpers import ROOT, run

RECIPES = sorted(p.stem for p in (ROOT / RECIPES_DIR).glob("*.yaml"))


def test_the_seed_fast_and_best_recipes_are_shipped() -> None:
    assert {"seed", "fast", "best"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_keeps_the_architecture_and_its_1_250_858_parameters(name: str) -> None:
    from pipeline.model import build_model

    params = with_values(
        load_params(ROOT / "params.yaml"), load_recipe(str(ROOT / RECIPES_DIR / f"{name}.yaml"))
    )
    assert params.model.conv_filters == (32, 64) and params.model.dense_units == 512
    assert build_model(params.model).count_params() == 1_250_858


def test_the_seed_recipe_is_the_seed_training() -> None:
    params = with_values(
        load_params(ROOT / "params.yaml"), load_recipe(str(ROOT / "recipes/seed.yaml"))
    )
    train = params.train
    assert (train.learning_rate, train.momentum, train.nesterov, train.batch_size) == (
        0.01,
        0.9,
        True,
        32,
    )
    assert (train.schedule, train.decay, train.base_batch_size) == ("time_decay", 1e-6, None)
    assert (train.weight_decay, train.label_smoothing, train.precision) == (0.0, 0.0, "float32")
    assert (train.augment.flip, train.augment.translate, train.augment.cutout) == (False, 0.0, 0)
    assert (params.model.conv_dropout, params.model.dense_dropout) == (0.25, 0.5)


def project_with_recipes(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    return tmp_path


def test_applying_a_recipe_sets_its_keys_keeps_the_comments_and_nothing_else(
    tmp_path: Path,
) -> None:
    project = project_with_recipes(tmp_path)
    before_text = (project / "params.yaml").read_text()
    before = flatten(yaml.safe_load(before_text))
    result = run(["python", "-m", "pipeline.recipe", "fast"], project)
    assert result.returncode == 0, result.stderr
    after_text = (project / "params.yaml").read_text()
    after = flatten(yaml.safe_load(after_text))
    recipe = load_recipe(str(project / "recipes/fast.yaml"))
    assert {k: after[k] for k in recipe} == recipe
    assert {k: v for k, v in after.items() if k not in recipe} == {
        k: v for k, v in before.items() if k not in recipe
    }
    assert after_text.count("#") == before_text.count("#")
    assert len(after_text.splitlines()) == len(before_text.splitlines())

    # And back: the seed recipe restores the seed's training, one command away.
    assert run(["python", "-m", "pipeline.recipe", "seed"], project).returncode == 0
    seed = load_params(project / "params.yaml")
    assert seed.train.schedule == "time_decay" and seed.train.precision == "float32"


def test_a_bad_recipe_fails_naming_the_key_and_writes_nothing(tmp_path: Path) -> None:
    project = project_with_recipes(tmp_path)
    before = (project / "params.yaml").read_text()
    (project / "recipes/typo.yaml").write_text("train.learnig_rate: 0.1\n")
    result = run(["python", "-m", "pipeline.recipe", "typo"], project)
    assert result.returncode == 1
    assert "cannot set 'train.learnig_rate': no such key" in result.stderr
    (project / "recipes/range.yaml").write_text("train.label_smoothing: 1.5\n")
    result = run(["python", "-m", "pipeline.recipe", "range"], project)
    assert result.returncode == 1
    assert "train.label_smoothing = 1.5: input should be less than 1" in result.stderr
    result = run(["python", "-m", "pipeline.recipe", "nonesuch"], project)
    assert result.returncode == 1 and "recipes/nonesuch.yaml: no such recipe" in result.stderr
    assert "best, fast" in result.stderr
    assert (project / "params.yaml").read_text() == before
    listing = run(["python", "-m", "pipeline.recipe"], project)
    assert listing.returncode == 0 and "seed" in listing.stdout


def test_values_applied_in_memory_are_checked_like_the_file() -> None:
    params = load_params(ROOT / "params.yaml")
    changed = with_values(params, {"train.augment.cutout": 8, "train.learning_rate": 0.2})
    assert changed.train.augment.cutout == 8 and changed.train.learning_rate == 0.2
    assert changed.section("model") == params.section("model")
    with pytest.raises(
        ParamsError, match=r"train.augment.cutout = 40: input should be less than or equal to 32"
    ):
        with_values(params, {"train.augment.cutout": 40})


def test_params_yaml_ships_the_best_recipe() -> None:
    """`dvc repro` on a fresh clone trains the best recipe; `recipe seed` is one command away."""
    shipped = load_params(ROOT / "params.yaml").flat()
    best = load_recipe(str(ROOT / "recipes/best.yaml"))
    assert {key: shipped[key] for key in best} == best


def test_fast_float32_is_the_fast_recipe_in_float32() -> None:
    # A copy of fast.yaml with one key changed: it must not drift from the recipe it copies.
    fast = load_recipe(str(ROOT / RECIPES_DIR / "fast.yaml"))
    float32 = load_recipe(str(ROOT / RECIPES_DIR / "fast-float32.yaml"))
    assert float32 == {**fast, "train.precision": "float32"}
