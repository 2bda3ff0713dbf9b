"""The results file of a dissection: its schema (``hf_clip_aft.dissect/v1``), validation and reading."""

from __future__ import annotations

import math
import os
from typing import Any

from ...files import read_json
from .constants import METHOD_CLIP_DISSECT, METHOD_NETDISSECT

SCHEMA = "hf_clip_aft.dissect/v1"
DATASET_KEYS = {"name", "config", "split", "num_images"}
# Optional, newer keys: images skipped because they could not be read.
OPTIONAL_DATASET_KEYS = {"skipped_images"}


_SUMMARY_KEYS = {
    METHOD_CLIP_DISSECT: (
        "num_units",
        "constant_units",
        "labelled_fraction",
        "unique_concepts",
        "mean_best_similarity",
        "threshold",
    ),
    METHOD_NETDISSECT: (
        "num_units",
        "detectors",
        "detector_fraction",
        "unique_detector_concepts",
        "mean_best_iou",
        "detectors_per_category",
    ),
}
_UNIT_KEYS = {
    METHOD_CLIP_DISSECT: {"unit", "concept", "similarity", "labelled", "top_images"},
    METHOD_NETDISSECT: {"unit", "concept", "category", "iou", "detector"},
}
SUMMARY_DESCRIPTIONS = {
    "labelled_fraction": "share of units whose best concept beats the permutation null",
    "unique_concepts": "distinct concepts among the labelled units",
    "mean_best_similarity": "mean best similarity over non-constant units",
    "threshold": "the null's similarity threshold",
    "constant_units": "units constant over the probe set (no concept)",
    "detectors": "units whose best IoU exceeds the threshold",
    "detector_fraction": "share of units that are detectors",
    "unique_detector_concepts": "distinct concepts among the detectors",
    "mean_best_iou": "mean best IoU over units",
}


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ValueError(f"Invalid {SCHEMA} results at {where}: {message}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_dissection(results: dict[str, Any]) -> None:
    """Raise `ValueError` naming the first field of `results` that breaks schema ``hf_clip_aft.dissect/v1``::

        {"schema": "hf_clip_aft.dissect/v1",
         "dataset": {"name", "config", "split", "num_images", "skipped_images"}, "models": [str, ...],
         "settings": {...},
         "layers": [{"model": str, "layer": int, "method": "clip_dissect" | "network_dissection",
                     "summary": {numbers, see SUMMARY_DESCRIPTIONS}, "units": [one record per unit]}, ...]}

    A CLIP-Dissect unit is ``{"unit", "concept" (null if constant), "similarity" (nats for (soft-)WPMI, null if
    constant), "labelled", "top_images" (dataset rows)}``; a Network Dissection unit ``{"unit", "concept",
    "category" (the mask column or Broden category; both null when the unit's IoU is 0 for every concept), "iou",
    "detector"}``. ``skipped_images`` (unreadable probe images) is absent from files written before it existed.
    """
    _require(isinstance(results, dict), "top level", "expected an object")
    expected = {"schema", "dataset", "models", "settings", "layers"}
    _require(
        set(results) == expected,
        "top level",
        f"keys {sorted(results)} != {sorted(expected)}",
    )
    _require(
        results["schema"] == SCHEMA,
        "schema",
        f"{results['schema']!r} is not {SCHEMA!r}",
    )
    dataset = results["dataset"]
    _require(
        isinstance(dataset, dict) and DATASET_KEYS <= set(dataset) <= DATASET_KEYS | OPTIONAL_DATASET_KEYS,
        "dataset",
        "expected {name, config, split, num_images[, skipped_images]}",
    )
    models = results["models"]
    _require(
        isinstance(models, list) and models and all(isinstance(m, str) for m in models),
        "models",
        "a non-empty list of strings",
    )
    _require(isinstance(results["settings"], dict), "settings", "expected an object")
    _require(isinstance(results["layers"], list), "layers", "expected a list")
    for i, entry in enumerate(results["layers"]):
        where = f"layers[{i}]"
        _require(
            isinstance(entry, dict) and set(entry) == {"model", "layer", "method", "summary", "units"},
            where,
            "expected the keys model, layer, method, summary, units",
        )
        _require(
            entry["model"] in models,
            f"{where}.model",
            f"{entry['model']!r} is not one of models",
        )
        _require(
            isinstance(entry["layer"], int) and entry["layer"] >= 0,
            f"{where}.layer",
            "a block index >= 0",
        )
        _require(
            entry["method"] in _SUMMARY_KEYS,
            f"{where}.method",
            f"unknown method {entry['method']!r}",
        )
        summary = entry["summary"]
        _require(
            isinstance(summary, dict) and set(summary) == set(_SUMMARY_KEYS[entry["method"]]),
            f"{where}.summary",
            f"expected the keys {_SUMMARY_KEYS[entry['method']]}",
        )
        for key, value in summary.items():
            numbers = value.values() if isinstance(value, dict) else [value]
            _require(
                all(_finite(v) for v in numbers),
                f"{where}.summary.{key}",
                f"{value!r} is not a finite number",
            )
        units = entry["units"]
        _require(
            isinstance(units, list) and len(units) == summary["num_units"],
            f"{where}.units",
            f"expected {summary['num_units']} unit records",
        )
        for j, unit in enumerate(units):
            _require(
                isinstance(unit, dict) and set(unit) == _UNIT_KEYS[entry["method"]],
                f"{where}.units[{j}]",
                f"expected the keys {sorted(_UNIT_KEYS[entry['method']])}",
            )
            _require(
                unit["unit"] == j,
                f"{where}.units[{j}].unit",
                "units must be listed in order",
            )


def load_dissection(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a dissection ``results.json`` (or the one inside a folder)."""
    return read_json(path, validate_dissection)
