"""Reads params.yaml into typed, frozen objects; the only module that reads params.yaml.

Every key is required (no defaults hide here: params.yaml is the single source of truth), unknown
keys are refused, and each value is checked for type and range. Errors name the dotted key, the
value found and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from pipeline.errors import PipelineError

PARAMS_FILE = Path("params.yaml")
RECIPES_DIR = Path("recipes")  # named sets of params.yaml values (see load_recipe)
CIFAR10_TRAIN_IMAGES = 50_000  # the official training batches hold 5 x 10,000 images


class ParamsError(PipelineError):
    """params.yaml has a missing or unknown key, a wrong type or an out-of-range value."""


Check = tuple[Callable[[Any], bool], str]


def check(predicate: Callable[[Any], bool], allowed: str) -> dict[str, Check]:
    """Field metadata: a range rule and its wording in error messages."""
    return {"check": (predicate, allowed)}


def positive() -> dict[str, Check]:
    return check(lambda v: v > 0, "a number > 0")


def non_negative() -> dict[str, Check]:
    return check(lambda v: v >= 0, "a number >= 0")


def fraction() -> dict[str, Check]:
    """For dropout rates and the like: 0 <= value < 1."""
    return check(lambda v: 0 <= v < 1, "a number in [0, 1)")


# --- the sections of params.yaml ------------------------------------------------------------


@dataclass(frozen=True)
class PathsParams:
    archive: Path
    prepared: Path
    data_report: Path
    untrained_model: Path
    model_summary: Path
    model: Path
    checkpoint: Path
    run_info: Path
    history: Path
    train_metrics: Path
    test_metrics: Path
    confusion: Path
    plots: Path
    best_params: Path
    trials: Path
    sweep_plots: Path


@dataclass(frozen=True)
class DataParams:
    url: str = field(metadata=check(lambda v: v.strip() != "", "a non-empty URL or path"))
    sha256: str | None = field(
        metadata=check(
            lambda v: v is None or (len(v) == 64 and all(c in "0123456789abcdef" for c in v)),
            "null or 64 lowercase hex digits",
        )
    )
    timeout: float = field(metadata=positive())
    retries: int = field(metadata=non_negative())


@dataclass(frozen=True)
class PreprocessParams:
    validation_size: int = field(
        metadata=check(
            lambda v: 0 < v < CIFAR10_TRAIN_IMAGES,
            f"an integer in [1, {CIFAR10_TRAIN_IMAGES - 1}] (the training set has "
            f"{CIFAR10_TRAIN_IMAGES:,} images)",
        )
    )
    seed: int = field(metadata=non_negative())


@dataclass(frozen=True)
class ModelParams:
    conv_filters: tuple[int, ...] = field(
        metadata=check(lambda v: len(v) >= 1 and all(f > 0 for f in v), "a list of integers > 0")
    )
    dense_units: int = field(metadata=positive())
    conv_dropout: float = field(metadata=fraction())
    dense_dropout: float = field(metadata=fraction())
    pixel_scale: Literal["unit", "symmetric"]
    kernel_initializer: Literal["glorot_uniform", "he_normal", "he_uniform"]
    init_seed: int = field(metadata=non_negative())


@dataclass(frozen=True)
class AugmentParams:
    flip: bool
    translate: float = field(metadata=check(lambda v: 0 <= v <= 0.5, "a number in [0, 0.5]"))
    cutout: int = field(metadata=check(lambda v: 0 <= v <= 32, "an integer in [0, 32] (pixels)"))


Schedule = Literal["time_decay", "step", "cosine", "one_cycle"]
Precision = Literal["float32", "mixed_bfloat16"]


@dataclass(frozen=True)
class TrainParams:
    epochs: int = field(metadata=positive())
    batch_size: int = field(metadata=positive())
    learning_rate: float = field(metadata=positive())
    base_batch_size: int | None = field(metadata=positive())
    momentum: float = field(metadata=fraction())
    nesterov: bool
    schedule: Schedule
    decay: float = field(metadata=non_negative())
    step_epochs: int = field(metadata=positive())
    step_factor: float = field(metadata=check(lambda v: 0 < v <= 1, "a number in (0, 1]"))
    warmup_epochs: float = field(metadata=non_negative())
    weight_decay: float = field(metadata=non_negative())
    label_smoothing: float = field(metadata=fraction())
    precision: Precision
    seed: int = field(metadata=non_negative())
    deterministic: bool
    distribute: Literal["none", "mirrored"]
    restore_best: bool
    augment: AugmentParams

    @property
    def peak_learning_rate(self) -> float:
        """learning_rate, scaled linearly from base_batch_size to batch_size when one is set."""
        if self.base_batch_size is None:
            return self.learning_rate
        return self.learning_rate * self.batch_size / self.base_batch_size

    def problem(self) -> str | None:
        if self.schedule in ("cosine", "one_cycle") and self.warmup_epochs >= self.epochs:
            return (
                f"warmup_epochs ({self.warmup_epochs}) must be below epochs ({self.epochs}): "
                f"the {self.schedule} schedule needs epochs left to anneal"
            )
        return None


@dataclass(frozen=True)
class MlflowParams:
    experiment: str = field(metadata=check(lambda v: v.strip() != "", "a non-empty name"))
    registered_model: str = field(metadata=check(lambda v: v.strip() != "", "a non-empty name"))
    champion_alias: str = field(
        metadata=check(lambda v: re.fullmatch(r"[A-Za-z_][\w-]*", v) is not None, "an alias name")
    )


@dataclass(frozen=True)
class RangeParams:
    """A search range for one hyperparameter: floats, or integers when the tuned key holds one."""

    low: float
    high: float
    log: bool  # sample uniformly on a log scale (for learning rates)

    def problem(self) -> str | None:
        if self.low >= self.high:
            return f"low ({self.low}) must be below high ({self.high})"
        if self.log and self.low <= 0:
            return f"low ({self.low}) must be > 0 on a log scale"
        return None


@dataclass(frozen=True)
class ChoiceParams:
    """Values to choose from: a schedule, a switch, a few sizes."""

    choices: tuple[object, ...] = field(metadata=check(lambda v: len(v) >= 1, "a non-empty list"))


Dimension = RangeParams | ChoiceParams
TUNABLE_SECTIONS = ("model", "train")  # data and preprocess define the data; tune, the sweep


@dataclass(frozen=True)
class TuneParams:
    study_name: str = field(metadata=check(lambda v: v.strip() != "", "a non-empty name"))
    storage: str = field(metadata=check(lambda v: "://" in v, "a database URL (sqlite:///...)"))
    n_trials: int = field(metadata=positive())
    timeout: float | None = field(metadata=positive())
    epochs: int = field(metadata=positive())
    train_fraction: float = field(metadata=check(lambda v: 0 < v <= 1, "a number in (0, 1]"))
    sampler: Literal["tpe", "random"]
    seed: int = field(metadata=non_negative())
    pruner: Literal["median", "successive_halving", "hyperband", "none"]
    startup_trials: int = field(metadata=non_negative())
    warmup_epochs: int = field(metadata=non_negative())
    reduction_factor: int = field(metadata=check(lambda v: v >= 2, "an integer >= 2"))
    heartbeat_seconds: int = field(metadata=positive())
    grace_seconds: int = field(metadata=positive())
    connect_seconds: int = field(metadata=positive())
    space: dict[str, Dimension]  # by dotted params.yaml key: train.learning_rate, ...

    def problem(self) -> str | None:
        if self.grace_seconds <= self.heartbeat_seconds:
            return (
                f"grace_seconds ({self.grace_seconds}) must exceed heartbeat_seconds "
                f"({self.heartbeat_seconds}), or live trials would be failed"
            )
        return None


@dataclass(frozen=True)
class Params:
    paths: PathsParams
    data: DataParams
    preprocess: PreprocessParams
    model: ModelParams
    train: TrainParams
    mlflow: MlflowParams
    tune: TuneParams

    def section(self, name: str) -> dict[str, Any]:
        """One section as plain data (for logging, hashing and MLflow params)."""
        return to_plain(getattr(self, name))

    def problem(self) -> str | None:
        """Every tune.space key names a model or train param, and every value it can take is
        one that param accepts."""
        tree = to_plain(self)
        flat = flatten(tree)
        for dotted, dimension in self.tune.space.items():
            where = f"tune.space.{dotted}"
            section = dotted.split(".", 1)[0]
            if section not in TUNABLE_SECTIONS:
                return f"{where}: only model.* and train.* params can be tuned"
            if dotted not in flat:
                return f"{where}: params.yaml has no key {dotted!r}"
            integer = isinstance(flat[dotted], int) and not isinstance(flat[dotted], bool)
            values: list[object]
            if isinstance(dimension, ChoiceParams):
                values = list(dimension.choices)
            elif integer:
                if not (dimension.low.is_integer() and dimension.high.is_integer()):
                    return f"{where}: {dotted} is an integer, so low and high must be integers"
                values = [int(dimension.low), int(dimension.high)]
            else:
                values = [dimension.low, dimension.high]
            for value in values:  # in the trial's own configuration, as the sweep trains it
                trial = copy.deepcopy(tree)
                for key, changed in trial_values(self, {dotted: value}).items():
                    set_dotted(trial, key, changed, where)
                try:
                    _build(SECTIONS[section], trial[section], f"{section}.", "tune.space")
                except ParamsError as error:
                    reason = str(error).removeprefix("tune.space: ")
                    return f"{where}: the value {value!r} is refused ({reason})"
        return None


SECTIONS: dict[str, type] = {"model": ModelParams, "train": TrainParams}


# --- loading ----------------------------------------------------------------------------------

T = TypeVar("T")


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Reads and validates params.yaml; raises ParamsError naming the offending key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the project root)") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return params_from_dict(raw, source=str(path))


def update_params_file(path: str | Path, values: Mapping[str, Any]) -> None:
    """Sets dotted keys in params.yaml, keeping its comments and layout; validates first.

    Only the given values change: the file is edited as a round-trip document (ruamel.yaml),
    checked as a whole, and then replaced atomically.
    """
    from io import StringIO

    from ruamel.yaml import YAML

    from pipeline.atomic import write_text

    path = Path(path)
    editor = YAML()  # round-trip: comments, order, flow style and quotes survive
    editor.width = 4096  # never re-wrap long lines
    editor.representer.add_representer(  # keep `null` written as `null`, not as nothing
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    document = editor.load(path.read_text())
    for dotted, value in values.items():
        set_dotted(document, dotted, value, str(path))
    text = StringIO()
    editor.dump(document, text)
    params_from_dict(yaml.safe_load(text.getvalue()), source=str(path))  # refuse a bad result
    write_text(text.getvalue(), path)


def set_dotted(tree: MutableMapping[str, Any], dotted: str, value: Any, source: str) -> None:
    """tree['train']['augment']['flip'] = value for 'train.augment.flip'; the key must exist."""
    node: Any = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        if not isinstance(node, MutableMapping) or key not in node:
            raise ParamsError(f"{source}: cannot set '{dotted}': there is no '{key}' section")
        node = node[key]
    if not isinstance(node, MutableMapping) or leaf not in node:
        raise ParamsError(f"{source}: cannot set '{dotted}': no such key")
    node[leaf] = value


def with_values(params: Params, values: Mapping[str, Any], source: str = "overrides") -> Params:
    """`params` with dotted keys replaced ({'train.learning_rate': 0.05}), checked as a whole."""
    tree = to_plain(params)
    for dotted, value in values.items():
        set_dotted(tree, dotted, value, source)
    return params_from_dict(tree, source=source)


def shorter_run(params: Params, epochs: int) -> dict[str, Any]:
    """The values that train `epochs` epochs instead of train.epochs, with the warm-up scaled
    to keep its share of the run (a schedule written for the full run then fits the shorter
    one, and a sweep trial's 2 of 10 epochs hand back as 14 of 70)."""
    train = params.train
    return {
        "train.epochs": epochs,
        "train.warmup_epochs": train.warmup_epochs * epochs / train.epochs,
    }


def trial_values(params: Params, values: Mapping[str, Any]) -> dict[str, Any]:
    """What a sweep trial changes in params: a shorter run of `tune.epochs` epochs, then its
    suggested `values` (a tuned warm-up is the trial's own)."""
    return {**shorter_run(params, params.tune.epochs), **values}


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


def params_from_dict(raw: Any, source: str = "params") -> Params:
    """Builds Params from a parsed YAML document (also used by tests to shrink the real one)."""
    return _build(Params, raw, prefix="", source=source)


def to_plain(value: Any) -> Any:
    """Dataclasses to dicts, Paths to strings, tuples to lists: what YAML and MLflow take."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, tuple | list):
        return [to_plain(v) for v in value]
    return value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'learning_rate': 0.01}} -> {'train.learning_rate': 0.01}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _build(cls: type[T], raw: Any, prefix: str, source: str) -> T:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{source}: {where} must be a mapping of keys, found {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (allowed in {where}: "
            f"{', '.join(fields)})"
        )
    missing = [name for name in fields if name not in raw]
    if missing:
        raise ParamsError(f"{source}: missing key '{prefix}{missing[0]}'")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        value = _convert(hints[name], raw[name], key, source)
        rule = f.metadata.get("check")
        if rule is not None and value is not None:
            predicate, allowed = rule
            if not predicate(value):
                raise ParamsError(
                    f"{source}: {key} = {raw[name]!r} is out of range: must be {allowed}"
                )
        values[name] = value
    built = cls(**values)
    problem = getattr(built, "problem", None)
    message = problem() if problem is not None else None
    if message:
        raise ParamsError(f"{source}: {message}" if not prefix else f"{source}: {where}: {message}")
    return built


def _convert(hint: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.", source)  # type: ignore[arg-type]
    if origin is dict:  # tune.space: dotted keys to ranges or choices
        if not isinstance(value, Mapping) or not value:
            raise ParamsError(
                f"{source}: {key} must map dotted params.yaml keys to {{low, high, log}} or "
                f"{{choices: [...]}}, found {_show(value)}"
            )
        return {
            str(name): _build(
                ChoiceParams if isinstance(spec, Mapping) and "choices" in spec else RangeParams,
                spec,
                f"{key}.{name}.",
                source,
            )
            for name, spec in value.items()
        }
    if hint is object:  # a choice: any YAML scalar
        if value is not None and not isinstance(value, str | int | float | bool):
            raise ParamsError(f"{source}: {key} must be a number, a string, true/false or null")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key, source)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ParamsError(
                f"{source}: {key} = {value!r} is not allowed: must be one of {allowed}"
            )
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{source}: {key} must be a list, found {_show(value)}")
        return tuple(_convert(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{source}: {key} must be true or false, found {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{source}: {key} must be an integer, found {_show(value)}")
        return value
    if hint is float:
        number = _as_float(value)
        if number is None or not math.isfinite(number):
            raise ParamsError(f"{source}: {key} must be a finite number, found {_show(value)}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"{source}: {key} must be a string, found {_show(value)}")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ParamsError(f"{source}: {key} must be a relative path, found {_show(value)}")
        return Path(value)
    raise TypeError(f"config.py cannot read a field of type {hint!r} ({key})")


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        # PyYAML reads `1e-6` (no dot) as a string; it is a number to anyone writing params.yaml.
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"
