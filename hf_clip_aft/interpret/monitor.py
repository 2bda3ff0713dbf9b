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
``metric_for_best_model: energy_pointing_game`` works and its direction comes from the registry; the monitor adds
``embedding_drift``, ``embedding_spread`` and ``majority_share`` (:mod:`.monitor_metrics`).

The parts, one concern each: :mod:`.monitor_metrics` (the pure numbers, the directions and the guard),
:mod:`.monitor_measure` (:class:`MonitorSettings` and the :class:`MapMonitor` measurement: masks read and scored as
the evaluation suite does, every registered map method), :mod:`.monitor_verdict` (the verdict text), and this module,
the Trainer callback; every name is importable from here.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from .monitor_measure import EMPTY_PROMPT_METHODS, MapMonitor, MonitorSettings, check_method_inputs, needs_empty_prompt
from .monitor_metrics import (
    MASK_FREE_METRICS,
    MASK_METRICS,
    MONITOR_ONLY,
    MapGuard,
    better,
    embedding_spread,
    higher_is_better,
    majority_share,
)
from .monitor_verdict import verdict_text

__all__ = [
    "EMPTY_PROMPT_METHODS",
    "MASK_FREE_METRICS",
    "MASK_METRICS",
    "MONITOR_ONLY",
    "TRAINER_EVAL_METRICS",
    "MapGuard",
    "MapMonitor",
    "MapMonitorCallback",
    "MonitorSettings",
    "check_method_inputs",
    "embedding_spread",
    "higher_is_better",
    "majority_share",
    "needs_empty_prompt",
    "verdict_text",
]

logger = logging.getLogger(__name__)

# Numbers of the trainer's own evaluation on an eval_dataset (the AFT loss with its attack), which
# metric_for_best_model may also name; the monitor does not measure them.
TRAINER_EVAL_METRICS = ("loss", "attack_loss", "cos_sim_adv", "cos_sim_clean")


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
    stops after ``stop_after_collapses`` collapsed measurements in a row (0, the default: never), and at the first
    warning with ``stop_if_maps_worse``. A collapsed measurement never becomes the best model
    (``AFTTrainer._determine_best_metric`` asks :attr:`last_measurement_collapsed`), and a run whose final weights
    are collapsed (without ``load_best_model_at_end``) ends with the base's weights restored instead.

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
        self.collapsed_steps: list[int] = []
        self.last_measurement_collapsed = False  # read by AFTTrainer: such a measurement is never the best
        self.exported_step: int | None = None
        self.export_reason: str | None = None
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
                "collapsed_steps": list(self.collapsed_steps),
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
        self.collapsed_steps = [int(step) for step in attributes.get("collapsed_steps", [])]  # older checkpoints: none
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
            self.collapsed_steps = []
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
        self.last_measurement_collapsed = collapsed
        if collapsed:
            self.collapsed_steps.append(state.global_step)
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
        collapse = self._collapse_problems(values)
        return problems + collapse, bool(collapse)

    def _collapse_problems(self, values: dict[str, float]) -> list[str]:
        """What shows collapse in a measurement against the base's (empty: not collapsed)."""
        base, problems = self.base, []
        ratio = self.monitor.settings.collapse_ratio
        if values["embedding_spread"] < ratio * base["embedding_spread"]:
            problems.append(
                f"the encoder is heading towards a constant output: embedding spread {values['embedding_spread']:.4f}"
                f" vs base {base['embedding_spread']:.4f} (warning below {ratio} × the base's)."
            )
        limit = self.monitor.settings.majority_limit
        if "majority_share" in values and values["majority_share"] > max(limit, 2 * base["majority_share"]):
            problems.append(
                f"one class takes over the predictions: {values['majority_share']:.1%} of the held-out images "
                f"(base {base['majority_share']:.1%})."
            )
        return problems

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.export_reason = None
        if args.load_best_model_at_end and state.best_model_checkpoint:
            self.exported_step = int(state.best_model_checkpoint.rstrip("/").rsplit("-", 1)[-1])
        elif args.load_best_model_at_end and self.selection_metric:  # no checkpoint beat the base
            metric = self.selection_metric
            ruled_out = [
                step
                for step, values in self.history[1:]
                if step in self.collapsed_steps and better(metric, values[metric], self.base[metric])
            ]
            if ruled_out:
                self.export_reason = (
                    f"no checkpoint beat the base without collapsing (better but collapsed: step "
                    f"{', '.join(map(str, ruled_out))})"
                )
            self.trainer.restore_base_weights(*([self.export_reason] if ruled_out else []))
            self.exported_step = 0
        else:
            self.exported_step = state.global_step
        if self.exported_step and all(step != self.exported_step for step, _ in self.history):
            values = self.monitor.measure(model)  # the final weights, unmeasured
            self.history.append((self.exported_step, values))
            if self._collapse_problems(values):
                self.collapsed_steps.append(self.exported_step)
        if self.exported_step in self.collapsed_steps:  # never hand back a collapsed encoder when the base is there
            reason = f"the final weights (step {self.exported_step}) had collapsed"
            if self.trainer.can_restore_base:
                self.trainer.restore_base_weights(reason)
                self.exported_step, self.export_reason = 0, reason
            else:
                self.export_reason = f"{reason}, and the base cannot be restored under FSDP/DeepSpeed"
        summary = self.summary()
        self.trainer.training_evaluation = summary
        if state.is_world_process_zero:
            log = logger.info if summary["improved"] else logger.warning
            log("%s", summary["verdict"])

    def best(self, metric: str) -> tuple[int, dict[str, float]]:
        """The (step, values) of the measurement with the best `metric` after step 0 (the base excluded, and the
        collapsed measurements; the earliest of equal values); the base's when every later measurement collapsed."""
        measured = [item for item in self.history[1:] if item[0] not in self.collapsed_steps] or self.history[:1]
        sign = 1 if higher_is_better(metric) else -1
        return max(measured, key=lambda item: sign * item[1][metric])

    def summary(self) -> dict[str, Any]:
        """Base, best, final and exported values with the verdict, for the training record and the card (JSON)."""
        metric = self.selection_metric or self.guard.metric
        step, best = self.best(metric)
        exported = next((values for s, values in self.history if s == self.exported_step), None)
        exported_is_base = self.exported_step == 0
        improved = (
            None if exported is None else not exported_is_base and better(metric, exported[metric], self.base[metric])
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
            "collapsed_steps": list(self.collapsed_steps),
            "export_reason": self.export_reason,
            "history": [{"step": step, **values} for step, values in self.history],
        }
        summary["verdict"] = verdict_text(summary) if self.exported_step is not None else None
        return summary
