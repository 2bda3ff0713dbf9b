"""The interpretability metrics as local `evaluate` modules: ``evaluate.load(evaluate_module_path(name))``.

Each module is a thin wrapper: it converts its inputs to tensors and calls the function of
:mod:`hf_clip_aft.interpret` that holds the math, so both routes give the same numbers. Loading works offline
(evaluate copies the local script into its module cache and imports it; nothing is fetched from the Hub).
"""

from __future__ import annotations

import os

# name -> the metric group whose math the module wraps; the group's metrics are the registry's
# (hf_clip_aft.interpret.registry.metric_groups()[group]); faithfulness_auc takes any curve (ROAR's too).
EVALUATE_MODULES = {
    "saliency_sparsity": "sparsity",
    "saliency_localization": "localization",
    "faithfulness_auc": "faithfulness",
    "top1_accuracy": "zero_shot",
}


def evaluate_module_path(name: str) -> str:
    """The folder of the local `evaluate` module `name` (pass it to ``evaluate.load``)."""
    if name not in EVALUATE_MODULES:
        raise ValueError(f"Unknown evaluate module {name!r}; choose one of {sorted(EVALUATE_MODULES)}.")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
