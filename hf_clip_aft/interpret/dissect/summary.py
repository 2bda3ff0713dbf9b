"""The markdown report of a dissection: per method and layer, each model's summary numbers and their differences."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .constants import METHOD_CLIP_DISSECT
from .results import SUMMARY_DESCRIPTIONS, validate_dissection


def model_label(model: str) -> str:
    """A model's short name in tables and figures: the last part of its folder or Hub id."""
    return os.path.basename(os.path.normpath(model)) or model


def _format(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.4g}"


def summary_table(results: dict[str, Any], keys: Sequence[str] | None = None) -> list[str]:
    """Markdown lines of the summary numbers: one row per method, layer and number (`keys`, default every number but
    ``num_units``), one column per model, and last − first (Δ) when there are 2+ models."""
    models = results["models"]
    table: dict[tuple[str, int, str], dict[str, float]] = {}
    for entry in results["layers"]:
        for key, value in entry["summary"].items():
            if key == "num_units" or (keys is not None and key not in keys):
                continue
            for name, number in value.items() if isinstance(value, dict) else [(None, value)]:
                label = key if name is None else f"{key} ({name})"
                table.setdefault((entry["method"], entry["layer"], label), {})[entry["model"]] = number
    delta = len(models) > 1
    lines = [
        "| method | layer | number | "
        + " | ".join(f"`{model_label(m)}`" for m in models)
        + (" | Δ |" if delta else " |"),
        "|---|---|---|" + "---|" * (len(models) + delta),
    ]
    for (method, layer, label), values in table.items():
        cells = [_format(values[m]) if m in values else "–" for m in models]
        if delta and models[0] in values and models[-1] in values:
            cells.append(f"{values[models[-1]] - values[models[0]]:+.4g}")
        elif delta:
            cells.append("–")
        lines.append(f"| {method} | {layer} | {label} | " + " | ".join(cells) + " |")
    return lines


def dissection_summary(results: dict[str, Any]) -> str:
    """A markdown report: the summary numbers (:func:`summary_table`), then each model's most frequent labels per
    layer."""
    validate_dissection(results)
    dataset, settings = results["dataset"], results["settings"]
    frequent: dict[tuple[str, int, str], list[tuple[str, int]]] = {}
    for entry in results["layers"]:
        flag = "labelled" if entry["method"] == METHOD_CLIP_DISSECT else "detector"
        counts = Counter(u["concept"] for u in entry["units"] if u[flag])
        frequent[entry["method"], entry["layer"], entry["model"]] = counts.most_common(5)
    shown = {key for entry in results["layers"] for key in entry["summary"]}
    lines = [
        f"# Network dissection on {dataset['name']} ({dataset['split']}), {dataset['num_images']} images",
        "",
        *(
            [f"{dataset['skipped_images']} unreadable probe images were skipped.", ""]
            if dataset.get("skipped_images")
            else []
        ),
        (
            f"Units: `{settings['unit_kind']}`; CLIP-Dissect similarity `{settings['similarity']}` (top-k "
            f"{settings['top_k']}, {settings['summary']} token), dissector `{settings['dissector']}`, "
            f"{settings['num_concepts']} concepts ({settings['concept_source']}). Labelled: best similarity above the "
            f"{settings['null_quantile']} quantile of {settings['null_units']} null units (layer units drawn with "
            "replacement, their activations shuffled across images)."
        ),
        "",
        *summary_table(results),
        "",
        "Numbers: " + "; ".join(f"{k}: {v}" for k, v in SUMMARY_DESCRIPTIONS.items() if k in shown) + ".",
        "",
        "## Most frequent labels",
        "",
    ]
    for (method, layer, model), common in frequent.items():
        text = ", ".join(f"{concept} ({count})" for concept, count in common) or "none"
        lines.append(f"- {method}, layer {layer}, `{model_label(model)}`: {text}")
    return "\n".join(lines) + "\n"
