"""The map monitor's own numbers and rules, as pure functions: the collapse signs (embedding spread, majority share),
which registered metrics it measures, each number's direction, and the guard against maps worse than the base's.

The map metrics are the evaluation's, by name (:mod:`hf_clip_aft.interpret.registry`): the ``sparsity`` group always,
then the ``localization`` group with object masks or the ``faithfulness`` group without. Three numbers are the
monitor's own: ``embedding_drift`` (mean ‖f(x) − f0(x)‖² on clean images, f0 the frozen base), ``embedding_spread``
(1 − mean pairwise cosine of the clean embeddings; 0 means every image has one embedding) and ``majority_share``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import scorers  # noqa: F401  (registers the metrics and groups named below)
from .registry import get_metric, metric_groups

# Metrics computed without a mask; with a mask column the localisation metrics are computed instead of these.
MASK_FREE_METRICS = (*metric_groups()["sparsity"], *metric_groups()["faithfulness"])
MASK_METRICS = (*metric_groups()["sparsity"], *metric_groups()["localization"])
# The monitor's own numbers and their directions (True: higher is better).
MONITOR_ONLY = {"embedding_drift": False, "embedding_spread": True, "majority_share": False}


def embedding_spread(embeds: torch.Tensor) -> float:
    """1 − the mean cosine similarity over distinct pairs of rows of `embeds` ``(N, D)``, N ≥ 2.

    0 when every image has the same embedding direction (a collapsed encoder); a base CLIP on natural images has
    spreads around 0.3–0.6.
    """
    if embeds.shape[0] < 2:
        raise ValueError(f"embedding_spread needs at least 2 embeddings, got {embeds.shape[0]}.")
    unit = F.normalize(embeds.double(), dim=-1)
    n = unit.shape[0]
    # Sum of all pairwise cosines = ‖Σ u‖²; remove the n self-pairs.
    total = unit.sum(dim=0).pow(2).sum() - n
    return float(1.0 - total / (n * (n - 1)))


def majority_share(predictions: torch.Tensor) -> float:
    """The share of the most frequent value of `predictions` ``(N,)`` (1.0 when one class is predicted for all)."""
    return float(torch.bincount(predictions.flatten()).max() / predictions.numel())


def higher_is_better(metric: str) -> bool:
    """The direction of a monitored metric: the registry's, or the monitor's own for its extra numbers."""
    if metric in MONITOR_ONLY:
        return MONITOR_ONLY[metric]
    return get_metric(metric).higher_is_better


def better(metric: str, value: float, than: float) -> bool:
    """Whether `value` of `metric` is strictly better than `than`, in the metric's direction."""
    return value > than if higher_is_better(metric) else value < than


@dataclass
class MapGuard:
    """Fires when `metric` is worse than the base's by more than `tolerance` for `patience` evaluations in a row.

    Attributes:
        metric: the registered metric watched.
        higher_is_better: its direction.
        tolerance: allowed loss against the base, in the metric's own units.
        patience: consecutive bad evaluations before it fires.
    """

    metric: str
    higher_is_better: bool
    tolerance: float = 0.02
    patience: int = 2
    bad_in_a_row: int = field(default=0, init=False)

    def update(self, base: float, current: float) -> bool:
        """Record one evaluation; True when the guard fires (and keeps firing while it stays bad)."""
        worse = base - current if self.higher_is_better else current - base
        self.bad_in_a_row = self.bad_in_a_row + 1 if worse > self.tolerance else 0
        return self.bad_in_a_row >= self.patience
