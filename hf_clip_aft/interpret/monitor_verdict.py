"""The map monitor's verdict: one paragraph, from the summary of a monitored run, for the log, the training record
and the model card."""

from __future__ import annotations

from typing import Any

from .monitor_metrics import higher_is_better


def _fmt(value: float) -> str:
    return f"{value:.4f}"


def verdict_text(summary: dict[str, Any]) -> str:
    """The one-paragraph verdict of a monitored run, from :meth:`MapMonitorCallback.summary`'s fields.

    Base vs best vs final on every monitored number, the warnings raised, and whether the exported model is better
    than the base on the selection metric (``summary["metric"]``).
    """
    metric, base, best, final = summary["metric"], summary["base"], summary["best"], summary["final"]
    arrow = "↑" if higher_is_better(metric) else "↓"
    lines = [
        f"Map monitor verdict ({summary['num_images']} held-out images, {summary['method']} maps; selection metric "
        f"{metric} {arrow}): base {_fmt(base[metric])}, best {_fmt(best[metric])} (step {summary['best_step']}), "
        f"final {_fmt(final[metric])} (step {summary['final_step']})."
    ]
    exported, step = summary["exported"], summary["exported_step"]
    reason = summary.get("export_reason")
    if summary["exported_is_base"] and reason:
        lines.append(f"The exported weights are the base's: {reason}.")
    elif summary["exported_is_base"]:
        lines.append(f"AFT did not improve {metric} over the base; the exported weights are the base's.")
    elif exported is None:
        lines.append(f"The exported weights (step {step}) were not measured.")
    elif summary["improved"]:
        lines.append(
            f"The exported weights (step {step}) improve {metric} over the base: {_fmt(base[metric])} → "
            f"{_fmt(exported[metric])}."
        )
    else:
        reason = reason or summary.get("base_not_candidate") or "the base was not a candidate"
        lines.append(
            f"The exported weights (step {step}) do NOT improve {metric} over the base ({_fmt(base[metric])} → "
            f"{_fmt(exported[metric])}): {reason}."
        )
    others = [name for name in base if name != metric and name in final and name in best]
    if others:
        changes = "; ".join(f"{n} {_fmt(base[n])} → {_fmt(best[n])} → {_fmt(final[n])}" for n in others)
        lines.append(f"Base → best → final: {changes}.")
    warnings = summary["warnings"]
    if warnings:
        lines.append(f"{len(warnings)} warning(s) raised, the first: {warnings[0]}")
    else:
        lines.append("No warning raised.")
    return " ".join(lines)
