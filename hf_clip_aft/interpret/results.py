"""The evaluation results file (``results.json``): its schema, a validator, a loader, and the markdown summary.

Schema ``hf_clip_aft.eval/v1`` (read by the model-card renderer; change it only with a new version string)::

    {
      "schema": "hf_clip_aft.eval/v1",
      "dataset": {"name": str, "config": str | null, "split": str, "num_images": int},
      "models": [str, ...],          # in the order given on the command line; the last is usually the AFT model
      "settings": {"seed": int, "limit": int | null, "metrics": [str, ...], "methods": [str, ...], ...},
      "results": [
        {"model": str, "task": str, "metric": str, "method": str | null, "value": float, "settings": {...}},
        ...
      ]
    }

``task`` is the metric's registered task: ``zero-shot-image-classification`` for accuracy metrics (``method``
null), ``saliency`` for metrics of saliency maps and ``segmentation`` for metrics of per-class dense maps (``method``
a map method of :data:`hf_clip_aft.interpret.registry.MAP_METHODS`). Every ``model`` of a result is one of
``models``. A result's ``settings`` holds what that number depends on beyond the top-level settings (e.g.
``{"eps": 4}`` for robust accuracy, ``{"fraction": 0.3}`` for a ROAR point) and ``num_images``, the number of images
averaged. :data:`METRICS` (the metric registry) gives each metric's task and which direction is better.

This module is the one place that reads the schema: :func:`results_document` builds a file's content,
:func:`validate_results` checks it, :func:`save_results` / :func:`load_results` write and read it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from ..files import read_json, write_text_atomic
from .registry import MAP_METHODS, METRICS, TASK_SALIENCY, TASK_SEGMENTATION, TASK_ZERO_SHOT

SCHEMA = "hf_clip_aft.eval/v1"
TASKS = (TASK_ZERO_SHOT, TASK_SALIENCY, TASK_SEGMENTATION)


# Result settings that distinguish rows of the summary table (one row per value).
ROW_SETTINGS = ("eps", "fraction")

# The summary's family table: the families compared, each shown by these methods when run (else by its first method
# run), and the metric compared: the first of FAMILY_TABLE_METRICS the run has for both families.
FAMILY_COLUMNS = {"gradient": ("simple_gradient",), "training-free": ("clip_surgery", "naclip")}
FAMILY_TABLE_METRICS = ("energy_pointing_game", "pointing_game", "top_k_iou", "insertion_auc", "deletion_auc", "gini")


# Why an AUC can be negative: it is the plain area, not a difference from a baseline.
FAITHFULNESS_NOTE = (
    "deletion_auc / insertion_auc: the plain area under the curve of the cosine similarity between the image and its "
    "class prompt as the map's top pixels are deleted (set to black) / inserted (into a blurred copy), over 0 to 100% "
    "of the pixels; no baseline is subtracted, so the area is the curve's mean height, in [-1, 1]. It is negative "
    "when the model's image embeddings point away from their class prompts (random or barely trained weights do); "
    "compare models by the difference, and look at insertion minus deletion within a model."
)


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ValueError(f"Invalid {SCHEMA} results at {where}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_results(results: dict[str, Any]) -> None:
    """Raise `ValueError` naming the first field of `results` that breaks the schema (see the module docstring)."""
    _require(isinstance(results, dict), "top level", f"expected an object, got {type(results).__name__}")
    expected = {"schema", "dataset", "models", "settings", "results"}
    _require(set(results) == expected, "top level", f"keys {sorted(results)} != {sorted(expected)}")
    _require(results["schema"] == SCHEMA, "schema", f"{results['schema']!r} is not {SCHEMA!r}")

    dataset = results["dataset"]
    _require(isinstance(dataset, dict), "dataset", "expected an object")
    _require(set(dataset) == {"name", "config", "split", "num_images"}, "dataset", f"keys {sorted(dataset)}")
    _require(isinstance(dataset["name"], str), "dataset.name", "expected a string")
    _require(dataset["config"] is None or isinstance(dataset["config"], str), "dataset.config", "string or null")
    _require(isinstance(dataset["split"], str), "dataset.split", "expected a string")
    _require(_is_int(dataset["num_images"]) and dataset["num_images"] >= 0, "dataset.num_images", "int >= 0")

    models = results["models"]
    _require(isinstance(models, list) and models, "models", "expected a non-empty list")
    _require(all(isinstance(m, str) for m in models), "models", "every model must be a string")

    settings = results["settings"]
    _require(isinstance(settings, dict), "settings", "expected an object")
    for key in ("seed", "limit", "metrics", "methods"):
        _require(key in settings, "settings", f"missing {key!r}")
    _require(_is_int(settings["seed"]), "settings.seed", "expected an int")
    _require(settings["limit"] is None or _is_int(settings["limit"]), "settings.limit", "int or null")
    for key in ("metrics", "methods"):
        value = settings[key]
        _require(isinstance(value, list) and all(isinstance(v, str) for v in value), f"settings.{key}", "list of str")

    _require(isinstance(results["results"], list), "results", "expected a list")
    keys = {"model", "task", "metric", "method", "value", "settings"}
    for i, entry in enumerate(results["results"]):
        where = f"results[{i}]"
        _require(isinstance(entry, dict) and set(entry) == keys, where, f"expected exactly the keys {sorted(keys)}")
        _require(entry["model"] in models, f"{where}.model", f"{entry['model']!r} is not one of models")
        _require(entry["task"] in TASKS, f"{where}.task", f"unknown task {entry['task']!r}")
        _require(isinstance(entry["metric"], str), f"{where}.metric", "expected a string")
        if entry["task"] == TASK_ZERO_SHOT:
            _require(entry["method"] is None, f"{where}.method", "must be null for zero-shot metrics")
        else:
            _require(isinstance(entry["method"], str), f"{where}.method", f"a {entry['task']} metric needs a method")
        value = entry["value"]
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}.value", "expected a number")
        _require(math.isfinite(value), f"{where}.value", f"{value} is not finite")
        _require(isinstance(entry["settings"], dict), f"{where}.settings", "expected an object")


def results_document(
    dataset: dict[str, Any], models: list[str], settings: dict[str, Any], results: list[dict[str, Any]]
) -> dict[str, Any]:
    """A results file's content from its parts (see the module docstring), validated."""
    document = {"schema": SCHEMA, "dataset": dataset, "models": models, "settings": settings, "results": results}
    validate_results(document)
    return document


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a ``results.json`` file (or the ``results.json`` inside a folder)."""
    return read_json(path, validate_results)


def save_results(results: dict[str, Any], path: str | os.PathLike) -> None:
    """Validate `results` and write them as indented JSON (the file is only written when valid, atomically)."""
    validate_results(results)
    write_text_atomic(path, json.dumps(results, indent=2) + "\n")


def save_summary(results: dict[str, Any], path: str | os.PathLike) -> None:
    """Write :func:`summary_markdown` of `results` to `path` (atomically)."""
    write_text_atomic(path, summary_markdown(results))


def _model_label(model: str) -> str:
    return os.path.basename(os.path.normpath(model)) or model


def _row_key(entry: dict[str, Any]) -> tuple:
    extras = tuple((key, entry["settings"][key]) for key in ROW_SETTINGS if key in entry["settings"])
    return entry["metric"], entry["method"], extras


def _family_table(results: dict[str, Any]) -> list[str]:
    """The {models} x {gradient maps, training-free maps} section of the summary: rows = models, columns = each
    family's methods of :data:`FAMILY_COLUMNS`, value = the first metric of :data:`FAMILY_TABLE_METRICS` that the
    run has for both families. Empty (no section) unless both families were run."""
    values: dict[tuple[str, str], dict[str, float]] = {}
    for entry in results["results"]:
        if entry["task"] == TASK_SALIENCY and entry["method"] in MAP_METHODS:
            values.setdefault((entry["metric"], entry["method"]), {}).setdefault(entry["model"], entry["value"])
    for metric in FAMILY_TABLE_METRICS:
        run = [method for method in MAP_METHODS if (metric, method) in values]
        columns = []
        for family, preferred in FAMILY_COLUMNS.items():
            members = [method for method in run if MAP_METHODS[method].family == family]
            columns.append([method for method in preferred if method in members] or members[:1])
        if all(columns):
            break
    else:
        return []
    methods = [method for family_columns in columns for method in family_columns]
    models = results["models"]
    arrow = "↑" if METRICS[metric].higher_is_better else "↓"
    lines = [
        "",
        f"## Gradient vs training-free maps: {metric} {arrow}",
        "",
        "| model | " + " | ".join(f"{method} ({MAP_METHODS[method].family})" for method in methods) + " |",
        "|" + "---|" * (1 + len(methods)),
    ]
    rows = [(f"`{_model_label(model)}`", [values[metric, method].get(model) for method in methods]) for model in models]
    if len(models) > 1:
        first, last = rows[0][1], rows[-1][1]
        delta = [None if a is None or b is None else b - a for a, b in zip(first, last, strict=True)]
        rows.append((f"Δ (`{_model_label(models[-1])}` − `{_model_label(models[0])}`)", delta))
    for label, cells in rows:
        sign = "+" if label.startswith("Δ") else ""
        lines.append(f"| {label} | " + " | ".join("–" if v is None else f"{v:{sign}.4f}" for v in cells) + " |")
    return lines


def summary_markdown(results: dict[str, Any]) -> str:
    """A markdown report: one row per metric (and method), one column per model, plus last − first when 2+ models;
    when both gradient and training-free maps were run, a second table of one metric per model and map family
    (:func:`_family_table`)."""
    validate_results(results)
    models = results["models"]
    dataset = results["dataset"]
    config = f" ({dataset['config']})" if dataset["config"] else ""
    lines = [
        f"# Evaluation on {dataset['name']}{config}, split {dataset['split']}, {dataset['num_images']} images",
        "",
        "Models: " + ", ".join(f"`{m}`" for m in models) + ". ↑: higher is better, ↓: lower is better.",
        "",
    ]
    table: dict[tuple, dict[str, float]] = {}
    for entry in results["results"]:
        table.setdefault(_row_key(entry), {})[entry["model"]] = entry["value"]
    # Group the rows by metric (in the registry's order), keeping the order of methods and settings within a metric.
    order = {name: i for i, name in enumerate(METRICS)}
    rows = sorted(table.items(), key=lambda row: order.get(row[0][0], len(order)))
    header = ["metric", "method", *(f"`{_model_label(m)}`" for m in models)]
    if len(models) > 1:
        header.append(f"Δ (`{_model_label(models[-1])}` − `{_model_label(models[0])}`)")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (metric, method, extras), values in rows:
        info = METRICS.get(metric)
        arrow = "" if info is None else (" ↑" if info.higher_is_better else " ↓")
        name = metric + "".join(f", {key}={value}" for key, value in extras) + arrow
        cells = [name, method or "–", *(f"{values[m]:.4f}" if m in values else "–" for m in models)]
        if len(models) > 1:
            first, last = values.get(models[0]), values.get(models[-1])
            cells.append("–" if first is None or last is None else f"{last - first:+.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += _family_table(results)
    metrics_run = {entry["metric"] for entry in results["results"]}
    if metrics_run & {"deletion_auc", "insertion_auc"}:
        lines += ["", FAITHFULNESS_NOTE]
    notes = results["settings"].get("notes", [])
    if notes:
        lines += ["", "Notes:", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"
