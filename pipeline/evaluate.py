"""Stage `evaluate`: paths.model on the test split -> test metrics (overall, per class), plots.

Continues the MLflow run that train opened (paths.run_info), logs the test figures, logs the
model with its signature and registers it; the champion alias moves only to a better model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import pandas
from sklearn.metrics import ConfusionMatrixDisplay, classification_report, confusion_matrix

from pipeline import provenance, registry, tracking
from pipeline.atomic import replacing, write_json, write_text
from pipeline.config import PARAMS_FILE, load_params
from pipeline.errors import PipelineError
from pipeline.model import load_model
from pipeline.splits import Split, load_class_names, load_split
from pipeline.stage_runner import run_stage
from pipeline.training_loop import EVAL_BATCH_SIZE, input_pipeline

log = logging.getLogger(__name__)

CONFUSION_PNG = "confusion.png"
MISCLASSIFIED_PNG = "misclassified.png"


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    confusion: np.ndarray  # (classes, classes): rows actual, columns predicted
    labels: np.ndarray  # the actual class of each test image
    predictions: np.ndarray  # the predicted one
    probabilities: np.ndarray


def evaluate(probabilities: np.ndarray, labels: np.ndarray, num_classes: int) -> Evaluation:
    """Cross-entropy, accuracy and the confusion matrix from predicted probabilities."""
    picked = probabilities[np.arange(len(labels)), labels]
    loss = float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0))))  # Keras clips the same way
    predictions = probabilities.argmax(axis=1)
    confusion = confusion_matrix(labels, predictions, labels=np.arange(num_classes))
    accuracy = float(np.mean(predictions == labels))
    return Evaluation(loss, accuracy, confusion, labels, predictions, probabilities)


def metrics_report(result: Evaluation, class_names: tuple[str, ...]) -> dict[str, object]:
    """test_loss, test_accuracy, macro averages, and per-class precision/recall/F1/support, from
    scikit-learn's classification report (0 where a figure is undefined)."""
    report = classification_report(
        result.labels,
        result.predictions,
        labels=np.arange(len(class_names)),
        target_names=list(class_names),
        output_dict=True,
        zero_division=0,
    )

    def figures(row: dict[str, float]) -> dict[str, float]:
        return {key: round(float(row[f"{key}-score" if key == "f1" else key]), 6)
                for key in ("precision", "recall", "f1")}  # fmt: skip

    return {
        "test_loss": round(result.loss, 6),
        "test_accuracy": round(result.accuracy, 6),
        **{f"macro_{key}": value for key, value in figures(report["macro avg"]).items()},
        "per_class": {
            name: {**figures(report[name]), "support": int(report[name]["support"])}
            for name in class_names
        },
    }


def flat_metrics(report: dict[str, object]) -> dict[str, float]:
    """The report as MLflow metric names: test_accuracy, macro_f1, f1_cat, recall_ship, ..."""
    flat = {key: float(value) for key, value in report.items() if isinstance(value, float | int)}
    per_class = report["per_class"]
    assert isinstance(per_class, dict)
    for name, figures in per_class.items():
        for key in ("precision", "recall", "f1"):
            flat[f"{key}_{name}"] = float(figures[key])
    return flat


def confusion_csv(labels: np.ndarray, predictions: np.ndarray, class_names: tuple[str, ...]) -> str:
    """actual,predicted per test image: DVC's confusion template counts them."""
    names = np.asarray(class_names)
    table = pandas.DataFrame({"actual": names[labels], "predicted": names[predictions]})
    return str(table.to_csv(index=False))


def draw_confusion(confusion: np.ndarray, class_names: tuple[str, ...], path: Path) -> None:
    shown = ConfusionMatrixDisplay(confusion, display_labels=list(class_names))
    shown.plot(cmap="Blues", xticks_rotation=45, values_format="d", text_kw={"fontsize": 7})
    accuracy = np.trace(confusion) / max(confusion.sum(), 1)
    shown.ax_.set_title(f"Test confusion matrix (accuracy {accuracy:.2%})")
    shown.figure_.set_size_inches(8, 7)
    shown.figure_.tight_layout()
    _save(shown.figure_, path)


def draw_misclassified(
    test: Split, result: Evaluation, class_names: tuple[str, ...], path: Path, count: int = 25
) -> None:
    """A grid of the first misclassified test images, labelled true versus predicted."""
    wrong = np.flatnonzero(result.predictions != test.labels)[:count]
    columns = 5
    rows = max(1, -(-len(wrong) // columns))
    figure, axes_grid = plt.subplots(
        rows, columns, figsize=(columns * 2, rows * 2.2), squeeze=False
    )
    for axes in axes_grid.flat:
        axes.axis("off")
    for axes, index in zip(axes_grid.flat, wrong, strict=False):
        axes.imshow(test.images[index])
        confidence = result.probabilities[index, result.predictions[index]]
        actual, predicted = class_names[test.labels[index]], class_names[result.predictions[index]]
        axes.set_title(f"true: {actual}\npred: {predicted} ({confidence:.0%})", fontsize=8)
    total_wrong = int((result.predictions != test.labels).sum())
    figure.suptitle(f"Misclassified test images (first {len(wrong)} of {total_wrong})")
    figure.tight_layout()
    _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> None:
    with replacing(path) as tmp:
        figure.savefig(tmp, dpi=100, metadata={"Software": None})  # no version stamp: stable bytes
    plt.close(figure)


def main() -> None:
    params = load_params()
    paths = params.paths
    try:
        run_id = json.loads(paths.run_info.read_text())["run_id"]
    except (FileNotFoundError, KeyError, ValueError):
        raise PipelineError(
            f"{paths.run_info}: missing or unreadable; run `dvc repro train` first"
        ) from None
    class_names = load_class_names(paths.prepared)
    test = load_split(paths.prepared, "test")
    model = load_model(paths.model)

    with tracking.tracked_run(params.mlflow.experiment, run_id=run_id):
        probabilities = model.predict(input_pipeline(test, EVAL_BATCH_SIZE), verbose=0)
        result = evaluate(probabilities, test.labels.astype(np.int64), len(class_names))
        report = metrics_report(result, class_names)
        summary = {key: value for key, value in report.items() if key != "per_class"}
        write_json(summary, paths.test_metrics)  # what `dvc exp show` compares
        write_json(report["per_class"], paths.test_per_class)
        write_text(confusion_csv(test.labels, result.predictions, class_names), paths.confusion)
        draw_confusion(result.confusion, class_names, paths.plots / CONFUSION_PNG)
        draw_misclassified(test, result, class_names, paths.plots / MISCLASSIFIED_PNG)

        provenance.log_dataset(test, "test", paths.prepared / "test", "test")
        tracking.log_summary(flat_metrics(report))
        tables = [paths.test_metrics, paths.test_per_class, paths.confusion]
        tracking.log_artifacts([*tables, PARAMS_FILE, provenance.DVC_LOCK])
        tracking.log_artifacts(
            [paths.plots / CONFUSION_PNG, paths.plots / MISCLASSIFIED_PNG], "plots"
        )
        registry.log_and_register_model(
            model,
            example=test.images[:2],
            registered_model=params.mlflow.registered_model,
            alias=params.mlflow.champion_alias,
            test_accuracy=result.accuracy,
        )
    log.info("test accuracy %.4f, loss %.4f", result.accuracy, result.loss)


if __name__ == "__main__":
    run_stage(main)
