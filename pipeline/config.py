"""Reads params.yaml into frozen pydantic models; the only module that reads params.yaml.

Every key is required (no defaults hide here: params.yaml is the single source of truth), unknown
keys are refused, and each value is checked for type and range. An error is one line naming the
dotted key, the value found and what is allowed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    model_validator,
)

from pipeline.errors import PipelineError

PARAMS_FILE = Path("params.yaml")
STORAGE_ENV = "OPTUNA_STORAGE"  # overrides tune.storage (workers sharing a study)
CIFAR10_TRAIN_IMAGES = 50_000  # the official training batches hold 5 x 10,000 images


class ParamsError(PipelineError):
    """params.yaml has a missing or unknown key, a wrong type or an out-of-range value."""


def _yaml_number(value: Any) -> Any:
    """PyYAML reads `1e-6` (no dot) as a string; it is a number to anyone writing params.yaml."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _relative_path(value: Any) -> Any:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a relative path")
    return Path(value)


# Strict: true is not 1, "5" is not 5; floats also take integers and YAML's dotless exponents.
Number = Annotated[float, BeforeValidator(_yaml_number), Field(strict=True, allow_inf_nan=False)]
Int = StrictInt
Name = Annotated[StrictStr, Field(pattern=r"\S")]
Fraction = Annotated[Number, Field(ge=0, lt=1)]  # dropout rates and the like
RelativePath = Annotated[Path, BeforeValidator(_relative_path)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsParams(Section):
    archive: RelativePath
    prepared: RelativePath
    data_report: RelativePath
    untrained_model: RelativePath
    model_summary: RelativePath
    model: RelativePath
    checkpoint: RelativePath
    run_info: RelativePath
    history: RelativePath
    train_metrics: RelativePath
    test_metrics: RelativePath
    test_per_class: RelativePath
    confusion: RelativePath
    plots: RelativePath
    best_params: RelativePath
    trials: RelativePath
    sweep_plots: RelativePath


class DataParams(Section):
    url: Name
    sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")] | None
    timeout: Annotated[Number, Field(gt=0)]
    retries: Annotated[Int, Field(ge=0)]


class PreprocessParams(Section):
    validation_size: Annotated[Int, Field(gt=0, lt=CIFAR10_TRAIN_IMAGES)]
    seed: Annotated[Int, Field(ge=0)]


class ModelParams(Section):
    conv_filters: Annotated[tuple[Annotated[Int, Field(gt=0)], ...], Field(min_length=1)]
    dense_units: Annotated[Int, Field(gt=0)]
    conv_dropout: Fraction
    dense_dropout: Fraction
    pixel_scale: Literal["unit", "symmetric"]
    kernel_initializer: Literal["glorot_uniform", "he_normal", "he_uniform"]
    init_seed: Annotated[Int, Field(ge=0)]


class AugmentParams(Section):
    flip: StrictBool
    translate: Annotated[Number, Field(ge=0, le=0.5)]
    cutout: Annotated[Int, Field(ge=0, le=32)]  # pixels


class TrainParams(Section):
    epochs: Annotated[Int, Field(gt=0)]
    batch_size: Annotated[Int, Field(gt=0)]
    learning_rate: Annotated[Number, Field(gt=0)]
    base_batch_size: Annotated[Int, Field(gt=0)] | None
    momentum: Fraction
    nesterov: StrictBool
    schedule: Literal["time_decay", "step", "cosine", "one_cycle"]
    decay: Annotated[Number, Field(ge=0)]
    step_epochs: Annotated[Int, Field(gt=0)]
    step_factor: Annotated[Number, Field(gt=0, le=1)]
    warmup_epochs: Annotated[Number, Field(ge=0)]
    weight_decay: Annotated[Number, Field(ge=0)]
    label_smoothing: Fraction
    precision: Literal["float32", "mixed_bfloat16"]
    seed: Annotated[Int, Field(ge=0)]
    deterministic: StrictBool
    distribute: Literal["none", "mirrored"]
    restore_best: StrictBool
    augment: AugmentParams

    @property
    def peak_learning_rate(self) -> float:
        """learning_rate, scaled linearly from base_batch_size to batch_size when one is set."""
        if self.base_batch_size is None:
            return self.learning_rate
        return self.learning_rate * self.batch_size / self.base_batch_size

    @model_validator(mode="after")
    def _warmup_leaves_epochs_to_anneal(self) -> TrainParams:
        if self.schedule in ("cosine", "one_cycle") and self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be below epochs ({self.epochs}): "
                f"the {self.schedule} schedule needs epochs left to anneal"
            )
        return self


class MlflowParams(Section):
    experiment: Name
    registered_model: Name
    champion_alias: Annotated[StrictStr, Field(pattern=r"^[A-Za-z_][\w-]*$")]


class RangeParams(Section):
    """A search range for one hyperparameter: floats, or integers when the tuned key holds one."""

    low: Number
    high: Number
    log: StrictBool  # sample uniformly on a log scale (for learning rates)

    @model_validator(mode="after")
    def _a_real_range(self) -> RangeParams:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"low ({self.low}) must be > 0 on a log scale")
        return self


class ChoiceParams(Section):
    """Values to choose from: a schedule, a switch, a few sizes."""

    choices: Annotated[
        tuple[StrictBool | StrictInt | StrictFloat | StrictStr | None, ...], Field(min_length=1)
    ]


def _dimension_kind(value: Any) -> str:
    """The union's tag, for YAML being validated and for a model being serialised."""
    choices = isinstance(value, ChoiceParams) or (isinstance(value, Mapping) and "choices" in value)
    return "<choices>" if choices else "<range>"


# The tags are left out of the keys that errors name (see _key).
Dimension = Annotated[
    Annotated[RangeParams, Tag("<range>")] | Annotated[ChoiceParams, Tag("<choices>")],
    Discriminator(_dimension_kind),
]
TUNABLE_SECTIONS = ("model", "train")  # data and preprocess define the data; tune, the sweep


class TuneParams(Section):
    study_name: Name
    storage: Annotated[StrictStr, Field(pattern=r"^[\w+]+://")]  # a database URL: sqlite:///...
    n_trials: Annotated[Int, Field(gt=0)]
    timeout: Annotated[Number, Field(gt=0)] | None
    epochs: Annotated[Int, Field(gt=0)]
    train_fraction: Annotated[Number, Field(gt=0, le=1)]
    sampler: Literal["tpe", "random"]
    seed: Annotated[Int, Field(ge=0)]
    pruner: Literal["median", "successive_halving", "hyperband", "none"]
    startup_trials: Annotated[Int, Field(ge=0)]
    warmup_epochs: Annotated[Int, Field(ge=0)]
    reduction_factor: Annotated[Int, Field(ge=2)]
    heartbeat_seconds: Annotated[Int, Field(gt=0)]
    grace_seconds: Annotated[Int, Field(gt=0)]
    connect_seconds: Annotated[Int, Field(gt=0)]
    space: Annotated[dict[str, Dimension], Field(min_length=1)]  # by dotted key: train.momentum
    # Starting points queued after params.yaml's own values: dotted tune.space keys to values.
    enqueue: tuple[dict[str, StrictBool | StrictInt | Number | StrictStr | None], ...]

    @model_validator(mode="after")
    def _grace_outlasts_a_heartbeat(self) -> TuneParams:
        if self.grace_seconds <= self.heartbeat_seconds:
            raise ValueError(
                f"grace_seconds ({self.grace_seconds}) must exceed heartbeat_seconds "
                f"({self.heartbeat_seconds}), or live trials would be failed"
            )
        return self


class Params(Section):
    paths: PathsParams
    data: DataParams
    preprocess: PreprocessParams
    model: ModelParams
    train: TrainParams
    mlflow: MlflowParams
    tune: TuneParams

    def plain(self) -> dict[str, Any]:
        """As YAML and MLflow take it: Paths as strings, tuples as lists."""
        return self.model_dump(mode="json")

    def section(self, name: str) -> dict[str, Any]:
        """One section as plain data (for logging, hashing and MLflow params)."""
        return self.plain()[name]

    def flat(self) -> dict[str, Any]:
        """By dotted key: {'train.learning_rate': 0.01, ...}."""
        return flatten(self.plain())

    @model_validator(mode="after")
    def _space_is_tunable(self) -> Params:
        """Every tune.space key names a model or train param, and every value it can take is
        one that param accepts, in the trial's own configuration as the sweep trains it."""
        flat = self.flat()
        for dotted, dimension in self.tune.space.items():
            where = f"tune.space.{dotted}"
            if dotted.split(".", 1)[0] not in TUNABLE_SECTIONS:
                raise ValueError(f"{where}: only model.* and train.* params can be tuned")
            if dotted not in flat:
                raise ValueError(f"{where}: params.yaml has no key {dotted!r}")
            values: list[object]
            if isinstance(dimension, ChoiceParams):
                values = list(dimension.choices)
            elif is_integer(flat[dotted]):
                if not (dimension.low.is_integer() and dimension.high.is_integer()):
                    raise ValueError(
                        f"{where}: {dotted} is an integer, so low and high must be integers"
                    )
                values = [int(dimension.low), int(dimension.high)]
            else:
                values = [dimension.low, dimension.high]
            for value in values:
                self._check_trial(where, {dotted: value})
        for index, point in enumerate(self.tune.enqueue):
            where = f"tune.enqueue[{index}]"
            for dotted, value in point.items():
                if dotted not in self.tune.space:
                    raise ValueError(f"{where}.{dotted}: not a key of tune.space")
                dimension = self.tune.space[dotted]
                if not in_space(value, dimension, integer=is_integer(flat[dotted])):
                    allowed = (
                        f"one of {list(dimension.choices)}"
                        if isinstance(dimension, ChoiceParams)
                        else f"from {dimension.low:g} to {dimension.high:g}"
                    )
                    raise ValueError(f"{where}.{dotted} = {value!r}: tune.space allows {allowed}")
            self._check_trial(where, point)
        return self

    def _check_trial(self, where: str, values: Mapping[str, Any]) -> None:
        """Raises if a trial with these values would have a configuration params refuses."""
        trial = self.plain()
        for key, changed in trial_values(self, values).items():
            set_dotted(trial, key, changed, where)
        for section in {key.split(".", 1)[0] for key in values}:
            model = ModelParams if section == "model" else TrainParams
            try:
                model.model_validate(trial[section])
            except ValidationError as error:
                shown = next(iter(values.values())) if len(values) == 1 else dict(values)
                reason = validation_message(error, (section,))
                raise ValueError(f"{where}: the value {shown!r} is refused ({reason})") from None


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def in_space(value: Any, dimension: RangeParams | ChoiceParams, integer: bool) -> bool:
    """Whether a sweep could draw `value` from `dimension` (an integer key draws integers)."""
    if isinstance(dimension, ChoiceParams):
        return any(value == c and type(value) is type(c) for c in dimension.choices)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return (not integer or is_integer(value)) and dimension.low <= value <= dimension.high


# --- loading ----------------------------------------------------------------------------------


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


def params_from_dict(raw: Any, source: str = "params") -> Params:
    """Builds Params from a parsed YAML document (also used by tests to shrink the real one)."""
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(f"{source}: {validation_message(error)}") from None


def validation_message(error: ValidationError, prefix: tuple[str, ...] = ()) -> str:
    """pydantic's first error in one line: the dotted key, the value found, what is allowed."""
    errors = error.errors(include_url=False)
    # A misspelt key is also a missing one: naming the misspelling says what to fix.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = (*prefix, *(str(part) for part in first["loc"] if not str(part).startswith("<")))
    key = _key(loc)
    kind, message = first["type"], first["msg"]
    if kind == "value_error":  # a cross-field rule: its message says it all
        reason = message.removeprefix("Value error, ")
        return f"{key}: {reason}" if key else reason
    if kind == "missing":
        return f"missing key '{key}'"
    if kind == "extra_forbidden":
        return f"unknown key '{key}'{_allowed(loc[:-1])}"
    found = repr(first["input"])
    if kind.endswith("_type"):  # a wrong type: say which one was found
        found += f" ({type(first['input']).__name__})"
    return f"{key or 'the top level'} = {found}: {message[:1].lower()}{message[1:]}"


def _key(loc: tuple[str, ...]) -> str:
    """('model', 'conv_filters', '1') -> 'model.conv_filters[1]'."""
    return "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in loc).lstrip(".")


def _allowed(loc: tuple[str, ...]) -> str:
    """' (allowed in train.augment: flip, translate, cutout)', for the section at `loc`."""
    model: Any = Params
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        model = field.annotation if field is not None else None
    fields = getattr(model, "model_fields", None)
    if not fields:
        return ""
    return f" (allowed in {_key(loc) or 'the top level'}: {', '.join(fields)})"


# --- values by dotted key --------------------------------------------------------------------


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
    tree = params.plain()
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


def storage_url(params: TuneParams) -> str:
    """OPTUNA_STORAGE, when set, overrides tune.storage."""
    return os.environ.get(STORAGE_ENV, "").strip() or params.storage


def redacted(url: str) -> str:
    """A database URL without its password, for tags and logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
