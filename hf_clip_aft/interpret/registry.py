"""Registries of map methods and metrics: adding a method or a metric is one entry here, read by every consumer.

The command line's choices, the summary table, the saliency grid, the model card and the app all list what these
registries hold, in registration order; nothing else keeps a list of method or metric names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

# (model, pixels (B, 3, H, W) in [0, 1], text_embeds (B, D), *, image_processor, **options) -> maps (B, H, W)
MapFn = Callable[..., torch.Tensor]
# (model, pixels (B, 3, H, W) in [0, 1], class_text_embeds (C, D), *, image_processor, **options) -> (B, C, H, W)
DenseMapFn = Callable[..., torch.Tensor]

TASK_ZERO_SHOT = "zero-shot-image-classification"
TASK_SALIENCY = "saliency"
TASK_SEGMENTATION = "segmentation"


@dataclass(frozen=True)
class MapMethod:
    """A way to explain a CLIP image embedding as a map over the image.

    Attributes:
        name: the identifier users type (``--methods``, ``saliency(method=...)``).
        label: short human-readable name for figures and tables.
        family: ``gradient`` (pixel or activation gradients), ``attention`` (the model's own attention weights) or
            ``training-free`` (an inference-time change of the architecture, e.g. CLIP Surgery).
        needs: what the model must provide: ``gradients``, ``attentions`` (eager attention) or ``none``.
        description: one line, with the paper it follows.
        fn: the map for one target text embedding per image, ``(B, H, W)``, non-negative, any scale.
        dense_fn: one map per class ``(B, C, H, W)`` for open-vocabulary segmentation, when the method has one.
    """

    name: str
    label: str
    family: Literal["gradient", "attention", "training-free"]
    needs: Literal["gradients", "attentions", "none"]
    description: str
    fn: MapFn
    dense_fn: DenseMapFn | None = None


@dataclass(frozen=True)
class Metric:
    """A number the evaluation reports.

    Attributes:
        name: the key in ``results.json``.
        group: the ``--metrics`` group that computes it (a group's metrics share one computation shape).
        task: :data:`TASK_ZERO_SHOT`, :data:`TASK_SALIENCY` or :data:`TASK_SEGMENTATION`.
        higher_is_better: the direction of improvement (summary arrows, best-checkpoint selection).
        description: one line saying what higher means.
        compute: the function that gives it, where it is a function of its group's inputs (see the group's runner).
    """

    name: str
    group: str
    task: str
    higher_is_better: bool
    description: str
    compute: Callable[..., torch.Tensor] | None = None


MAP_METHODS: dict[str, MapMethod] = {}
METRICS: dict[str, Metric] = {}


def register_map_method(method: MapMethod) -> MapMethod:
    """Add `method` to :data:`MAP_METHODS` (its name must be new); returns it."""
    if method.name in MAP_METHODS:
        raise ValueError(f"A map method named {method.name!r} is already registered; choose another name.")
    MAP_METHODS[method.name] = method
    return method


def register_metric(metric: Metric) -> Metric:
    """Add `metric` to :data:`METRICS` (its name must be new); returns it."""
    if metric.name in METRICS:
        raise ValueError(f"A metric named {metric.name!r} is already registered; choose another name.")
    METRICS[metric.name] = metric
    return metric


def get_map_method(name: str) -> MapMethod:
    """The registered map method `name`; the error lists the registered ones."""
    if name not in MAP_METHODS:
        raise ValueError(f"method={name!r} is not a registered map method; choose one of {tuple(MAP_METHODS)}.")
    return MAP_METHODS[name]


def get_metric(name: str) -> Metric:
    """The registered metric `name`; the error lists the registered ones."""
    if name not in METRICS:
        raise ValueError(f"metric={name!r} is not a registered metric; choose one of {tuple(METRICS)}.")
    return METRICS[name]


def metric_groups() -> dict[str, tuple[str, ...]]:
    """``{group: metric names}`` in registration order."""
    groups: dict[str, tuple[str, ...]] = {}
    for metric in METRICS.values():
        groups[metric.group] = (*groups.get(metric.group, ()), metric.name)
    return groups
