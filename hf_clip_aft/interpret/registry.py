"""Registries of map methods and metrics: adding a method or a metric is one entry here, read by every consumer.

The command line's choices, the summary table, the saliency grid, the model card and the app all list what these
registries hold, in registration order; nothing else keeps a list of method or metric names.

Three registries: :data:`MAP_METHODS` (:class:`MapMethod`), :data:`METRICS` (:class:`Metric`) and :data:`SCORERS`,
one :class:`Scorer` subclass per metric group (``--metrics`` name), which turns the evaluation's batches
(:class:`BatchContext`) into that group's results. A new group is one registered scorer plus its metrics; the
evaluation loop (:mod:`hf_clip_aft.interpret.suite`) stays as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

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
        dense_fn: raw scores per class ``(B, C, H, W)`` for open-vocabulary segmentation (the per-pixel arg-max is
            the prediction, so no per-class rescaling), when the method has one.
        default: whether ``--methods all`` includes the method (the gradient and attention maps do; the
            training-free maps are opt-in: ``--methods all training-free``); every consumer that lists
            :data:`MAP_METHODS` directly (the app) shows it either way.
    """

    name: str
    label: str
    family: Literal["gradient", "attention", "training-free"]
    needs: Literal["gradients", "attentions", "none"]
    description: str
    fn: MapFn
    dense_fn: DenseMapFn | None = None
    default: bool = True


@dataclass(frozen=True)
class Metric:
    """A number the evaluation reports.

    Attributes:
        name: the key in ``results.json``.
        group: the ``--metrics`` group that computes it (a group's metrics share one computation shape).
        task: :data:`TASK_ZERO_SHOT`, :data:`TASK_SALIENCY` or :data:`TASK_SEGMENTATION`.
        higher_is_better: the direction of improvement (summary arrows, best-checkpoint selection).
        description: one line saying what higher means.
        compute: the function that gives it, where it is a function of its group's inputs (each group's scorer
            documents the call); None where the scorer computes it (e.g. an attack, a probe).
        settings: the result settings this metric depends on, from the run (:class:`RunContext`, whose ``args``
            are the :class:`hf_clip_aft.interpret.EvaluationArguments`): ``run -> {name: value}``. A scorer records
            them with each result and, where the group says so, passes them to `compute` as keywords.
    """

    name: str
    group: str
    task: str
    higher_is_better: bool
    description: str
    compute: Callable[..., torch.Tensor] | None = None
    settings: Callable[[RunContext], dict[str, Any]] | None = None

    def settings_for(self, run: RunContext) -> dict[str, Any]:
        """The settings of this metric's results in `run` (empty when it has none)."""
        return {} if self.settings is None else self.settings(run)


@dataclass
class RunContext:
    """What a scorer knows before the first batch: the run's arguments, the maps asked for and the dataset.

    Attributes:
        args: the run's :class:`hf_clip_aft.interpret.EvaluationArguments` (a group's own settings are its fields).
        methods: the map methods evaluated, in order (empty when no requested group uses maps).
        class_names: the dataset's classes; class index ``i`` is ``class_names[i]``.
        mask_column: the dataset's mask column, or None when it has none.
        templates: the prompt templates of the class text embeddings.
        seed: the run's seed (data splits of dataset-level scorers).
    """

    args: Any
    methods: list[str]
    class_names: list[str]
    mask_column: str | None
    templates: tuple[str, ...]
    seed: int


@dataclass
class BatchContext:
    """One batch as one model sees it, handed to every scorer: inputs, the model's outputs and (per method) maps.

    The loop builds one per (batch, model) and, for scorers that use maps, sets :attr:`method` and :attr:`maps` for
    each map method in turn before calling them.

    Attributes:
        index: the batch's position in the dataset (0, 1, …).
        model_name: the model's name as given (results' ``model``).
        model: the `CLIPModel` under evaluation (eval mode, eager attention).
        image_processor: its image processor.
        embed: its pixel-space encoder, ``pixels -> (B, D)`` L2-normalised image embeddings.
        pixels: ``(B, 3, H, W)`` in [0, 1] at the model's resolution.
        labels: ``(B,)`` int64 class indices.
        mask_images: the dataset's mask column for these images as PIL images (object masks, or per-pixel class
            indices for segmentation), None when the dataset has no mask column.
        image_embeds: ``(B, D)`` the clean images' embeddings.
        class_embeds: ``(C, D)`` L2-normalised class text embeddings (prompt ensemble).
        predictions: ``(B,)`` zero-shot predicted classes.
        text_embeds: ``(B, D)`` each image's target text embedding (the label's or the prediction's class).
        method_options: the options every map method receives (``saliency(..., **method_options)``).
        method: the current map method (None outside the map stage).
        maps: ``(B, H, W)`` the current method's maps for `text_embeds` (None outside the map stage).
    """

    index: int
    model_name: str
    model: nn.Module
    image_processor: Any
    embed: Callable[[torch.Tensor], torch.Tensor]
    pixels: torch.Tensor
    labels: torch.Tensor
    mask_images: list[Any] | None
    image_embeds: torch.Tensor
    class_embeds: torch.Tensor
    predictions: torch.Tensor
    text_embeds: torch.Tensor
    method_options: Mapping[str, Any] = field(default_factory=dict)
    method: str | None = None
    maps: torch.Tensor | None = None
    _cache: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False)

    def cached(self, key: Any, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()`` once per batch and model for `key`, shared by every scorer (e.g. resized masks)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def dense_maps(self, method: str | None = None) -> torch.Tensor:
        """``(B, C, H, W)``: the raw scores of every class of :attr:`class_embeds` by `method`'s ``dense_fn``
        (default: the current method), computed on first use and shared by the scorers. Raises if the method has no
        dense maps."""
        method = method or self.method
        map_method = get_map_method(method)
        if map_method.dense_fn is None:
            raise ValueError(f"Map method {method!r} has no dense (per-class) maps; choose one with a dense_fn.")
        return self.cached(
            ("dense_maps", method),
            lambda: map_method.dense_fn(
                self.model,
                self.pixels,
                self.class_embeds,
                image_processor=self.image_processor,
                **self.method_options,
            ),
        )


@dataclass(frozen=True)
class Score:
    """Per-image values of one metric for one batch, ``(B,)``; the suite averages them over the dataset."""

    metric: str
    values: torch.Tensor
    settings: dict[str, Any] = field(default_factory=dict)


class Scorer:
    """The scoring step of one metric group: fed every batch, then asked for its results.

    Subclass it, set the class attributes, and register the class with :func:`register_scorer`; the suite creates
    one instance per run (``Scorer(run)``) for each requested group, in registration order.

    Two ways to report, and a scorer may use both:
    - :meth:`update` returns :class:`Score` objects: per-image values that the suite averages over the dataset into
      one result per (model, metric, method, settings), with ``num_images`` added (accuracy, Gini, AUCs…).
    - :meth:`results` returns whole-dataset results after the last batch (a probe trained on every image, a
      confusion matrix summed over the dataset); build each with :func:`result_entry`.

    Class attributes:
        group: the ``--metrics`` name; the group's metrics are the registered :class:`Metric` with this group.
        default: whether ``--metrics all`` includes the group (heavy protocols are opt-in).
        uses_maps: True: :meth:`update` runs once per (batch, model, map method), with ``batch.method`` and
            ``batch.maps`` set, and requesting the group evaluates the map methods; False: once per (batch, model),
            before any map is computed (so a scorer drawing random numbers, e.g. PGD starts, draws them first).
    """

    group: ClassVar[str]
    default: ClassVar[bool] = True
    uses_maps: ClassVar[bool] = True

    def __init__(self, run: RunContext) -> None:
        self.run = run
        self.notes: list[str] = []  # lines for the results' ``settings.notes`` (e.g. why a metric was skipped)

    def metrics(self) -> list[Metric]:
        """The registered metrics of this scorer's group, in registration order."""
        return [get_metric(name) for name in metric_groups().get(self.group, ())]

    def update(self, batch: BatchContext) -> list[Score]:
        """Score one batch; return per-image values to average (none by default)."""
        return []

    def results(self) -> list[dict[str, Any]]:
        """Whole-dataset results after the last batch (none by default)."""
        return []


def result_entry(model: str, metric: str, method: str | None, value: float, settings: dict[str, Any]) -> dict[str, Any]:
    """One entry of a results file's ``results`` list; its ``task`` is the registered metric's."""
    return {
        "model": model,
        "task": get_metric(metric).task,
        "metric": metric,
        "method": method,
        "value": value,
        "settings": settings,
    }


MAP_METHODS: dict[str, MapMethod] = {}
METRICS: dict[str, Metric] = {}
SCORERS: dict[str, type[Scorer]] = {}


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


def register_scorer(scorer: type[Scorer]) -> type[Scorer]:
    """Add the metric group `scorer` (a :class:`Scorer` subclass) to :data:`SCORERS`; usable as a class decorator."""
    if not (isinstance(scorer, type) and issubclass(scorer, Scorer)):
        raise TypeError(f"{scorer!r} is not a Scorer subclass; subclass hf_clip_aft.interpret.registry.Scorer.")
    if scorer.group in SCORERS:
        raise ValueError(f"A scorer for the metric group {scorer.group!r} is already registered; choose another name.")
    SCORERS[scorer.group] = scorer
    return scorer


def get_scorer(group: str) -> type[Scorer]:
    """The registered scorer of metric group `group`; the error lists the registered groups."""
    if group not in SCORERS:
        raise ValueError(f"metric group {group!r} has no registered scorer; choose one of {tuple(SCORERS)}.")
    return SCORERS[group]
