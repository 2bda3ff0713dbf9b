"""Interpretability measured during training: map metrics, embedding drift and collapse signs on a held-out set.

AFT can make maps worse: on a base whose embeddings are already bunched together, the FARE loss barely penalises an
encoder that outputs one constant direction, and a run can collapse to it while its loss looks fine. A
:class:`MapMonitor` measures, on a few hundred held-out images, what the evaluation suite would report (map metrics,
zero-shot accuracy) plus two cheap signs of collapse (the spread of the clean embeddings and the share of the
most-predicted class); :class:`MapMonitorCallback` runs it at step 0 (the baseline) and at every evaluation (or
every ``monitor_steps``, without an eval dataset), logs the numbers as ``eval_<metric>`` through the Trainer's
``report_to``, adds them to the metrics that ``metric_for_best_model`` reads (the base being a candidate), warns when
the maps fall below the base's or the encoder heads towards a constant, can stop the run, and ends it with a verdict
(:func:`verdict_text`) in the log, the training record and the card.

Metric names are those of the metric registry (:mod:`hf_clip_aft.interpret.registry`), so
``metric_for_best_model: energy_pointing_game`` works and its direction comes from the registry; two monitor-only
numbers are added: ``embedding_drift`` (mean ‖f(x) − f0(x)‖² on clean images, f0 the frozen base) and
``embedding_spread`` (1 − mean pairwise cosine of the clean embeddings; 0 means every image has one embedding).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from ..data import find_image_column, images_to_pixels, open_image
from ..modeling import embed_fn
from .batches import masks_to_tensor
from .faithfulness import curve_auc, faithfulness_curve
from .metrics import energy_pointing_game, gini_index, pointing_game, top_fraction_iou
from .registry import get_metric
from .saliency import class_similarity, saliency
from .zero_shot import zero_shot_predictions

logger = logging.getLogger(__name__)

# Metrics computed without a mask; with a mask column the localisation metrics are computed instead of these.
MASK_FREE_METRICS = ("gini", "deletion_auc", "insertion_auc")
MASK_METRICS = ("gini", "pointing_game", "energy_pointing_game", "top_k_iou")
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


@dataclass
class MonitorSettings:
    """What the monitor computes; the fields of ``AFTConfig`` with the same names feed it (see the train command).

    Attributes:
        method: the map method (a name of the map-method registry; cheap ``simple_gradient`` by default).
        max_images: held-out images measured (the first of the given set).
        batch_size: images per forward/backward.
        faithfulness_steps: deletion/insertion steps (mask-free metrics).
        iou_fraction: share of top pixels compared with the mask (``top_k_iou``).
        guard_metric: the metric the guard watches; None = the primary map metric (``energy_pointing_game`` with
            masks, else ``deletion_auc``).
        guard_tolerance, guard_patience: see :class:`MapGuard`.
        collapse_ratio: warn when the embedding spread falls below this share of the base's.
        stop_after_collapses: stop training after this many measurements in a row show collapse (the spread below
            `collapse_ratio` × the base's, or one class taking over the predictions); 0 = never stop for it. A
            collapsed encoder has not been seen to recover, and with the base as a candidate nothing is lost by
            stopping; two in a row keeps one noisy measurement from ending a run.
        stop_if_maps_worse: stop training at the first warning (the guard firing, or collapse).
    """

    method: str = "simple_gradient"
    max_images: int = 64
    batch_size: int = 16
    faithfulness_steps: int = 10
    iou_fraction: float = 0.2
    guard_metric: str | None = None
    guard_tolerance: float = 0.02
    guard_patience: int = 2
    collapse_ratio: float = 0.25
    stop_after_collapses: int = 2
    stop_if_maps_worse: bool = False

    def __post_init__(self) -> None:
        for name in ("max_images", "batch_size", "faithfulness_steps", "guard_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.max_images < 2:
            raise ValueError(f"max_images={self.max_images} must be at least 2 (the embedding spread needs pairs).")
        if not 0 < self.iou_fraction < 1:
            raise ValueError(f"iou_fraction={self.iou_fraction} must lie in (0, 1).")
        if not 0 <= self.collapse_ratio < 1:
            raise ValueError(f"collapse_ratio={self.collapse_ratio} must lie in [0, 1).")
        if self.stop_after_collapses < 0:
            raise ValueError(f"stop_after_collapses={self.stop_after_collapses} must be >= 0 (0: never stop).")
        if self.guard_tolerance < 0:
            raise ValueError(f"guard_tolerance={self.guard_tolerance} must be >= 0 (metric units).")


class MapMonitor:
    """Map metrics, zero-shot accuracy and collapse signs of a vision tower on a fixed held-out set.

    Args:
        pixels: ``(N, 3, H, W)`` held-out images in [0, 1] at the model's resolution.
        image_processor: the model's image processor (mean/std normalisation inside the encoder).
        reference_embeds: ``(N, D)`` the frozen base's L2-normalised clean embeddings f0(x).
        masks: ``(N, H, W)`` boolean object masks, or None (mask-free metrics then).
        labels: ``(N,)`` class indices, with `class_embeds`; or None.
        class_embeds: ``(C, D)`` L2-normalised class text embeddings; or None.
        settings: :class:`MonitorSettings`.

    The map explains each image's class prompt when labels and class embeddings are given, else the image's own
    base embedding f0(x) (a label-free target: where does the encoder look to stay close to its base?).
    """

    def __init__(
        self,
        pixels: torch.Tensor,
        image_processor,
        reference_embeds: torch.Tensor,
        masks: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        class_embeds: torch.Tensor | None = None,
        settings: MonitorSettings | None = None,
    ) -> None:
        self.settings = settings or MonitorSettings()
        n = min(len(pixels), self.settings.max_images)
        if n < 2:
            raise ValueError(f"The held-out set has {len(pixels)} images; the monitor needs at least 2.")
        if (labels is None) != (class_embeds is None):
            raise ValueError("Pass labels and class_embeds together (both or neither).")
        self.pixels = pixels[:n]
        self.image_processor = image_processor
        self.reference_embeds = reference_embeds[:n].float()
        self.masks = None if masks is None else masks[:n]
        self.labels = None if labels is None else labels[:n]
        self.class_embeds = class_embeds
        if self.masks is not None and not self.masks.flatten(1).any(dim=1).all():
            raise ValueError("Some held-out masks are empty after the centre crop; drop those images.")
        self.metric_names = MASK_METRICS if self.masks is not None else MASK_FREE_METRICS
        self.primary_metric = "energy_pointing_game" if self.masks is not None else "deletion_auc"

    @property
    def available_metrics(self) -> tuple[str, ...]:
        """The names :meth:`measure` returns, in its order."""
        labelled = () if self.class_embeds is None else ("accuracy", "majority_share")
        return ("embedding_drift", "embedding_spread", *labelled, *self.metric_names)

    @classmethod
    def from_dataset(
        cls,
        model: nn.Module,
        dataset: datasets.Dataset,
        image_processor,
        image_column: str | None = None,
        mask_column: str | None = None,
        label_column: str | None = None,
        class_embeds: torch.Tensor | None = None,
        settings: MonitorSettings | None = None,
    ) -> MapMonitor:
        """Build the monitor from the first ``settings.max_images`` rows of `dataset`, with `model` as the base f0.

        Rows whose image (or mask) does not decode are skipped with a warning, never fatal.
        """
        settings = settings or MonitorSettings()
        image_column = find_image_column(dataset.features, image_column)
        images, masks, labels, skipped = [], [], [], 0
        for row in dataset.select(range(min(len(dataset), settings.max_images))):
            try:
                image = open_image(row[image_column])
                mask = None if mask_column is None else open_image(row[mask_column])
            except (OSError, ValueError) as error:
                skipped += 1
                logger.warning("Map monitor: skipped a held-out image that does not decode (%s).", error)
                continue
            images.append(image)
            masks.append(mask)
            labels.append(None if label_column is None else int(row[label_column]))
        if skipped:
            logger.warning("Map monitor: %d of %d held-out images skipped.", skipped, skipped + len(images))
        pixels = images_to_pixels(images, image_processor)
        mask_tensor = None if mask_column is None else masks_to_tensor(masks, image_processor)
        label_tensor = None if label_column is None else torch.tensor(labels)
        reference = _embed_batched(embed_fn(model, image_processor), pixels, settings.batch_size, _device(model))
        return cls(pixels, image_processor, reference, mask_tensor, label_tensor, class_embeds, settings)

    def measure(self, model: nn.Module) -> dict[str, float]:
        """Every monitored number for `model` (a vision tower, possibly wrapped by peft), as plain floats.

        Deterministic: the map method and the faithfulness curves draw no random numbers for the default method;
        stochastic methods are seeded per call.
        """
        was_training = model.training
        model.eval()
        try:
            return self._measure(model)
        finally:
            model.train(was_training)

    def _measure(self, model: nn.Module) -> dict[str, float]:
        s = self.settings
        device = _device(model)
        embed = embed_fn(model, self.image_processor)
        embeds = _embed_batched(embed, self.pixels, s.batch_size, device)
        out = {
            "embedding_drift": float((embeds - self.reference_embeds).pow(2).sum(dim=-1).mean()),
            "embedding_spread": embedding_spread(embeds),
        }
        if self.class_embeds is not None:
            predictions = zero_shot_predictions(embeds, self.class_embeds.float().cpu())
            out["accuracy"] = float((predictions == self.labels).float().mean())
            out["majority_share"] = majority_share(predictions)
            targets = self.class_embeds.float().cpu()[self.labels]
        else:
            targets = self.reference_embeds
        sums: dict[str, float] = dict.fromkeys(self.metric_names, 0.0)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)  # stochastic map methods (SmoothGrad) see the same noise at every evaluation
        try:
            for start in range(0, len(self.pixels), s.batch_size):
                stop = start + s.batch_size
                pixels = self.pixels[start:stop].to(device)
                text = targets[start:stop].to(device)
                maps = saliency(model, pixels, text, s.method, image_processor=self.image_processor)
                for name, values in self._map_metrics(embed, pixels, text, maps, start, stop).items():
                    sums[name] += float(values.double().sum())
        finally:
            torch.random.set_rng_state(generator_state)
        out.update({name: total / len(self.pixels) for name, total in sums.items()})
        return out

    def _map_metrics(
        self, embed, pixels: torch.Tensor, text: torch.Tensor, maps: torch.Tensor, start: int, stop: int
    ) -> dict[str, torch.Tensor]:
        values = {"gini": gini_index(maps)}
        if self.masks is not None:
            masks = self.masks[start:stop].to(maps.device)
            values["pointing_game"] = pointing_game(maps, masks)
            values["energy_pointing_game"] = energy_pointing_game(maps, masks)
            values["top_k_iou"] = top_fraction_iou(maps, masks, self.settings.iou_fraction)
        else:
            score = partial(class_similarity, embed, text_embeds=text)
            steps = self.settings.faithfulness_steps
            values["deletion_auc"] = curve_auc(faithfulness_curve(score, pixels, maps, "deletion", steps))
            values["insertion_auc"] = curve_auc(faithfulness_curve(score, pixels, maps, "insertion", steps))
        return values


def higher_is_better(metric: str) -> bool:
    """The direction of a monitored metric: the registry's, or the monitor's own for its extra numbers."""
    if metric in MONITOR_ONLY:
        return MONITOR_ONLY[metric]
    return get_metric(metric).higher_is_better


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _embed_batched(embed, pixels: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Embeddings of CPU `pixels` computed on `device` in batches, returned on the CPU."""
    return torch.cat([embed(pixels[i : i + batch_size].to(device)).cpu() for i in range(0, len(pixels), batch_size)])


# Numbers of the trainer's own evaluation on an eval_dataset (the AFT loss with its attack), which
# metric_for_best_model may also name; the monitor does not measure them.
TRAINER_EVAL_METRICS = ("loss", "attack_loss", "cos_sim_adv", "cos_sim_clean")


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
    if summary["exported_is_base"]:
        lines.append(f"AFT did not improve {metric} over the base; the exported weights are the base's.")
    elif exported is None:
        lines.append(f"The exported weights (step {step}) were not measured.")
    elif summary["improved"]:
        lines.append(
            f"The exported weights (step {step}) improve {metric} over the base: {_fmt(base[metric])} → "
            f"{_fmt(exported[metric])}."
        )
    else:
        reason = summary.get("base_not_candidate") or "the base was not a candidate"
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


class MapMonitorCallback(TrainerCallback, ExportableState):
    """Runs a :class:`MapMonitor` during an :class:`~hf_clip_aft.AFTTrainer` run: ``AFTTrainer(...,
    callbacks=[MapMonitorCallback(monitor)])`` (or ``trainer.add_callback`` before ``train``).

    It binds to its trainer when training begins (``AFTTrainer.train`` calls :meth:`bind_trainer`; under any other
    Trainer ``on_train_begin`` raises), checks there that it can run (it has a schedule; ``metric_for_best_model``
    is a number it measures), measures the base at step 0 and logs it (``eval_<metric>`` at step 0: every curve
    starts from its baseline). It measures again at every evaluation of the Trainer (``eval_steps``) and, with
    `monitor_steps`, every `monitor_steps` optimiser steps (it asks the Trainer for an evaluation there). Without an
    ``eval_dataset`` an evaluation is the monitor alone: no attack runs on the monitor's images.

    At each measurement it logs the numbers and the cost, adds them to the evaluation's metrics (so
    ``metric_for_best_model`` may name any of them; ``greater_is_better`` is then set from the metric's direction),
    and checks two things against the base: the guard metric (:class:`MapGuard`) and collapse (the embedding spread
    below ``collapse_ratio`` × the base's, or one class taking over the predictions). Either logs a warning; the run
    stops after ``stop_after_collapses`` collapsed measurements in a row, and at the first warning with
    ``stop_if_maps_worse``.

    The base is a candidate for the best model: when ``metric_for_best_model`` is a monitored number, the best
    metric starts at the base's value, so a checkpoint becomes the best only by beating the base; with
    ``load_best_model_at_end`` and no checkpoint better than the base, the run ends with the base's weights
    restored (and exported). At the end the verdict (:func:`verdict_text`) is logged and goes into the training
    record and the model card (:meth:`summary`).

    The history (base, measurements, warnings, guard counters) is saved in every checkpoint's
    ``trainer_state.json`` and restored on resume, so that a resumed run's record equals an uninterrupted run's.
    Every rank measures the same held-out images with the same weights, so every rank gets the same numbers (the
    best-model choice needs them everywhere); only the main process warns.
    """

    def __init__(self, monitor: MapMonitor, monitor_steps: int | None = None) -> None:
        if monitor_steps is not None and monitor_steps < 1:
            raise ValueError(f"monitor_steps={monitor_steps} must be at least 1 (optimiser steps), or None.")
        self.monitor = monitor
        self.monitor_steps = monitor_steps
        self.trainer = None
        self.history: list[tuple[int, dict[str, float]]] = []
        self.warnings: list[str] = []
        self.guard_fired_steps: list[int] = []
        self.collapsed_in_a_row = 0
        self.exported_step: int | None = None
        self.selection_metric: str | None = None
        self.base_not_candidate: str | None = None
        self._restored = False
        self._last_measured = time.perf_counter()
        guard_metric = monitor.settings.guard_metric or monitor.primary_metric
        self._check_measured(guard_metric, "guard_metric")
        s = monitor.settings
        self.guard = MapGuard(guard_metric, higher_is_better(guard_metric), s.guard_tolerance, s.guard_patience)

    # A trainer may run its evaluations on this callback alone, without an eval_dataset (see AFTTrainer.evaluate).
    measures_without_eval_dataset = True

    @property
    def base(self) -> dict[str, float]:
        return self.history[0][1]

    def _check_measured(self, metric: str, setting: str, trainer_metrics: tuple[str, ...] = ()) -> None:
        """Refuse, before training, a metric that this monitor does not measure, naming what it lacks."""
        available = self.monitor.available_metrics
        if metric in available or metric in trainer_metrics:
            return
        if metric in MASK_METRICS:
            lacks = "object masks, but the held-out set has no mask column (pass monitor_mask_column, or a dataset "
            lacks += "with an Image column named mask/segmentation)"
        elif metric in ("accuracy", "majority_share"):
            lacks = "class labels, but the held-out set has no ClassLabel label column (or the model no text tower)"
        elif metric in MASK_FREE_METRICS:
            lacks = "the mask-free metrics, which are replaced by the localisation metrics when masks are given"
        else:
            lacks = "a number the monitor or the trainer measures"
        raise ValueError(
            f"{setting}={metric!r} needs {lacks}. Measured here: {', '.join((*available, *trainer_metrics))}."
        )

    def bind_trainer(self, trainer) -> None:
        """Attach to `trainer` (an `AFTTrainer`, at the start of ``train``) and check that the monitor can run."""
        self.trainer = trainer
        args = trainer.args
        if args.eval_strategy == "no" and self.monitor_steps is None:
            raise ValueError(
                "The map monitor would never measure: eval_strategy='no' and no monitor_steps. Set monitor_steps "
                "(e.g. 500), or eval_strategy='steps' with eval_steps."
            )
        self.selection_metric, self.base_not_candidate = None, None
        if args.metric_for_best_model:
            name = args.metric_for_best_model.removeprefix("eval_")
            trainer_metrics = TRAINER_EVAL_METRICS if trainer.eval_dataset is not None else ()
            self._check_measured(name, "metric_for_best_model", trainer_metrics)
            if name in self.monitor.available_metrics:
                self.selection_metric = name
                if args.greater_is_better != higher_is_better(name):
                    logger.info("metric_for_best_model=%s: greater_is_better set to %s.", name, higher_is_better(name))
                    args.greater_is_better = higher_is_better(name)
                if not args.load_best_model_at_end:
                    self.base_not_candidate = "load_best_model_at_end is off, so the final weights are exported"
                else:
                    trainer.check_base_restorable()
            else:
                self.base_not_candidate = f"metric_for_best_model={name!r} is not a monitored number"
        else:
            self.base_not_candidate = "no metric_for_best_model selects among the checkpoints"

    def state(self) -> dict[str, Any]:
        """The history, saved in every checkpoint's ``trainer_state.json`` (see :meth:`load_checkpoint_state`)."""
        return {
            "args": {},
            "attributes": {
                "history": [[step, values] for step, values in self.history],
                "warnings": list(self.warnings),
                "guard_fired_steps": list(self.guard_fired_steps),
                "guard_bad_in_a_row": self.guard.bad_in_a_row,
                "collapsed_in_a_row": self.collapsed_in_a_row,
            },
        }

    def load_checkpoint_state(self, saved: dict[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`state` (called by `AFTTrainer` on resume)."""
        attributes = saved["attributes"]
        order = self.monitor.available_metrics  # trainer_state.json sorts the keys; the record keeps this order
        self.history = [(int(step), {k: values[k] for k in order}) for step, values in attributes["history"]]
        self.warnings = list(attributes["warnings"])
        self.guard_fired_steps = [int(step) for step in attributes["guard_fired_steps"]]
        self.guard.bad_in_a_row = int(attributes["guard_bad_in_a_row"])
        self.collapsed_in_a_row = int(attributes["collapsed_in_a_row"])
        self._restored = True

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.trainer is None:
            raise RuntimeError(
                "MapMonitorCallback is not bound to a trainer, so it cannot run: pass it to an AFTTrainer "
                "(AFTTrainer(..., callbacks=[MapMonitorCallback(monitor)]) or trainer.add_callback), whose train() "
                "binds it."
            )
        if state.global_step > 0 and not self._restored:
            raise ValueError(
                f"Resuming at step {state.global_step} from a checkpoint without map-monitor state (the run was not "
                "monitored, or was saved by an older version): the base cannot be measured from resumed weights. "
                "Resume without the monitor, or start a new run with it."
            )
        self._last_measured = time.perf_counter()
        if state.global_step == 0:
            self.history, self.warnings, self.guard_fired_steps = [(0, self.monitor.measure(kwargs["model"]))], [], []
            self.trainer.log({f"eval_{name}": value for name, value in self.base.items()})
            if self.selection_metric:
                state.best_metric = self.base[self.selection_metric]  # a checkpoint must beat the base
                state.best_global_step = 0
        self.trainer.training_evaluation = self.summary()

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor_steps and state.global_step % self.monitor_steps == 0:
            control.should_evaluate = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.trainer is None:
            raise RuntimeError("MapMonitorCallback.on_evaluate before train(): the callback is not bound.")
        since = time.perf_counter() - self._last_measured
        clock = time.perf_counter()
        values = self.monitor.measure(kwargs["model"])
        seconds = time.perf_counter() - clock
        self._last_measured = time.perf_counter()
        if state.is_world_process_zero:
            logger.info(
                "Map monitor, step %d: %d images in %.1f s (%.0f%% of the %.1f s since the last measurement).",
                state.global_step,
                len(self.monitor.pixels),
                seconds,
                100 * seconds / max(since, 1e-9),
                since,
            )
        self.history.append((state.global_step, values))
        logs = {f"eval_{name}": value for name, value in values.items()}
        self.trainer.log({**logs, "eval_monitor_seconds": seconds})
        if metrics is not None:
            metrics.update(logs)
        problems, collapsed = self._problems(values, state.global_step)
        self.collapsed_in_a_row = self.collapsed_in_a_row + 1 if collapsed else 0
        for problem in problems:
            message = f"Step {state.global_step}: {problem}"
            self.warnings.append(message)
            if state.is_world_process_zero:
                logger.warning(message)
        s = self.monitor.settings
        if (problems and s.stop_if_maps_worse) or (
            s.stop_after_collapses and self.collapsed_in_a_row >= s.stop_after_collapses
        ):
            if state.is_world_process_zero:
                logger.warning("Step %d: the map monitor stops the run.", state.global_step)
            control.should_training_stop = True
        self.trainer.training_evaluation = self.summary()

    def _problems(self, values: dict[str, float], step: int) -> tuple[list[str], bool]:
        """The warnings of the measurement at `step`, and whether it shows collapse."""
        base, problems = self.base, []
        name = self.guard.metric
        if self.guard.update(base[name], values[name]):
            self.guard_fired_steps.append(step)
            problems.append(
                f"the maps are worse than the base's: {name} {values[name]:.4f} vs base {base[name]:.4f} for "
                f"{self.guard.bad_in_a_row} evaluations in a row (tolerance {self.guard.tolerance})."
            )
        collapsed = False
        ratio = self.monitor.settings.collapse_ratio
        if values["embedding_spread"] < ratio * base["embedding_spread"]:
            collapsed = True
            problems.append(
                f"the encoder is heading towards a constant output: embedding spread {values['embedding_spread']:.4f}"
                f" vs base {base['embedding_spread']:.4f} (warning below {ratio} × the base's)."
            )
        if "majority_share" in values and values["majority_share"] > max(0.5, 2 * base["majority_share"]):
            collapsed = True
            problems.append(
                f"one class takes over the predictions: {values['majority_share']:.1%} of the held-out images "
                f"(base {base['majority_share']:.1%})."
            )
        return problems, collapsed

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if args.load_best_model_at_end and state.best_model_checkpoint:
            self.exported_step = int(state.best_model_checkpoint.rstrip("/").rsplit("-", 1)[-1])
        elif args.load_best_model_at_end and self.selection_metric:  # no checkpoint beat the base
            self.trainer.restore_base_weights()
            self.exported_step = 0
        else:
            self.exported_step = state.global_step
        if self.exported_step and all(step != self.exported_step for step, _ in self.history):
            self.history.append((self.exported_step, self.monitor.measure(model)))  # the final weights, unmeasured
        summary = self.summary()
        self.trainer.training_evaluation = summary
        if state.is_world_process_zero:
            log = logger.info if summary["improved"] else logger.warning
            log("%s", summary["verdict"])

    def best(self, metric: str) -> tuple[int, dict[str, float]]:
        """The (step, values) of the measurement with the best `metric` after step 0 (the base excluded; the earliest
        of equal values)."""
        measured = self.history[1:] if len(self.history) > 1 else self.history
        sign = 1 if higher_is_better(metric) else -1
        return max(measured, key=lambda item: sign * item[1][metric])

    def summary(self) -> dict[str, Any]:
        """Base, best, final and exported values with the verdict, for the training record and the card (JSON)."""
        metric = self.selection_metric or self.guard.metric
        step, best = self.best(metric)
        exported = next((values for s, values in self.history if s == self.exported_step), None)
        exported_is_base = self.exported_step == 0
        improved = (
            None if exported is None else not exported_is_base and _better(metric, exported[metric], self.base[metric])
        )
        summary = {
            "metric": metric,
            "guard_metric": self.guard.metric,
            "method": self.monitor.settings.method,
            "num_images": len(self.monitor.pixels),
            "base": self.base,
            "best_step": step,
            "best": best,
            "final_step": self.history[-1][0],
            "final": self.history[-1][1],
            "exported_step": self.exported_step,
            "exported": exported,
            "exported_is_base": exported_is_base,
            "improved": improved,
            "base_not_candidate": self.base_not_candidate,
            "warnings": list(self.warnings),
            "guard_fired_steps": list(self.guard_fired_steps),
            "history": [{"step": step, **values} for step, values in self.history],
        }
        summary["verdict"] = verdict_text(summary) if self.exported_step is not None else None
        return summary


def _better(metric: str, value: float, than: float) -> bool:
    return value > than if higher_is_better(metric) else value < than
