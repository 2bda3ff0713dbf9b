"""The evaluation's metrics and the scorers of their groups (``--metrics``), registered in
:mod:`hf_clip_aft.interpret.registry`.

The metrics are registered first, in the order of the summary table's rows; then one :class:`Scorer` per group, in
the order the groups run and are listed. How each group calls its metrics' ``compute``:

- ``zero_shot`` / ``robustness``: per image, 1 where the (clean / attacked) zero-shot prediction is the label.
- ``sparsity``: ``compute(maps)``.
- ``localization``: ``compute(maps, masks, **settings)`` on the images whose object mask is not empty.
- ``faithfulness``: ``compute(score_fn, pixels, maps, steps)``.
- ``roar``: a linear probe on the features of every image (whole-dataset results).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from functools import partial
from typing import Any

import torch
from tqdm.auto import tqdm

from .batches import masks_to_tensor
from .faithfulness import INSERTION_BLUR_SIGMA, curve_auc, faithfulness_curve
from .metrics import energy_pointing_game, gini_index, pointing_game, top_fraction_iou
from .registry import (
    TASK_SALIENCY,
    TASK_ZERO_SHOT,
    BatchContext,
    Metric,
    RunContext,
    Score,
    Scorer,
    register_metric,
    register_scorer,
    result_entry,
)
from .roar import remove_top_pixels, roar_accuracy, split_indices
from .robustness import robust_predictions
from .saliency import class_similarity

logger = logging.getLogger(__name__)


def deletion_auc(score_fn, pixels: torch.Tensor, maps: torch.Tensor, steps: int) -> torch.Tensor:
    """Area ``(B,)`` under the deletion curve (top pixels set to black), in cosine-similarity units; lower is better."""
    return curve_auc(faithfulness_curve(score_fn, pixels, maps, "deletion", steps))


def insertion_auc(score_fn, pixels: torch.Tensor, maps: torch.Tensor, steps: int) -> torch.Tensor:
    """Area ``(B,)`` under the insertion curve (top pixels restored into a blurred copy); higher is better."""
    return curve_auc(faithfulness_curve(score_fn, pixels, maps, "insertion", steps))


def _faithfulness_settings(baseline: str):
    return lambda run: {"steps": run.args.faithfulness_steps, "baseline": baseline}


for _metric in (
    Metric(
        "accuracy",
        "zero_shot",
        TASK_ZERO_SHOT,
        True,
        "zero-shot top-1 accuracy, prompt ensemble",
        settings=lambda run: {"templates": len(run.templates)},
    ),
    Metric(
        "robust_accuracy", "robustness", TASK_ZERO_SHOT, True, "zero-shot top-1 accuracy under L∞ PGD of radius eps/255"
    ),
    Metric("gini", "sparsity", TASK_SALIENCY, True, "Gini index of the map (sparsity; uniform map = 0)", gini_index),
    Metric(
        "pointing_game",
        "localization",
        TASK_SALIENCY,
        True,
        "share of maps whose maximum lies on the object mask",
        pointing_game,
    ),
    Metric(
        "energy_pointing_game",
        "localization",
        TASK_SALIENCY,
        True,
        "share of the map's mass on the object mask",
        energy_pointing_game,
    ),
    Metric(
        "top_k_iou",
        "localization",
        TASK_SALIENCY,
        True,
        "IoU of the map's top-k% pixels with the object mask",
        top_fraction_iou,
        settings=lambda run: {"fraction": run.args.iou_fraction},
    ),
    Metric(
        "deletion_auc",
        "faithfulness",
        TASK_SALIENCY,
        False,
        "AUC of class similarity as top pixels are deleted",
        deletion_auc,
        settings=_faithfulness_settings("black"),
    ),
    Metric(
        "insertion_auc",
        "faithfulness",
        TASK_SALIENCY,
        True,
        "AUC of class similarity as top pixels are inserted",
        insertion_auc,
        settings=_faithfulness_settings(f"blur(sigma={INSERTION_BLUR_SIGMA}px)"),
    ),
    Metric("roar_accuracy", "roar", TASK_SALIENCY, False, "linear-probe accuracy after removing the top-k% pixels"),
):
    register_metric(_metric)


@register_scorer
class ZeroShotScorer(Scorer):
    """Zero-shot top-1 accuracy of the clean images."""

    group = "zero_shot"
    uses_maps = False

    def update(self, batch: BatchContext) -> list[Score]:
        (accuracy,) = self.metrics()
        return [Score(accuracy.name, batch.predictions == batch.labels, accuracy.settings_for(self.run))]


@register_scorer
class SparsityScorer(Scorer):
    """Sparsity of each map."""

    group = "sparsity"

    def update(self, batch: BatchContext) -> list[Score]:
        return [
            Score(metric.name, metric.compute(batch.maps), metric.settings_for(self.run)) for metric in self.metrics()
        ]


@register_scorer
class LocalizationScorer(Scorer):
    """Localisation of each map against the object mask; skipped (with a note) when the dataset has no masks."""

    group = "localization"

    def __init__(self, run: RunContext) -> None:
        super().__init__(run)
        if run.mask_column is None:
            self.notes.append(
                "localization skipped: the dataset has no object-mask column (pass --mask_column to name one)."
            )
            logger.warning(self.notes[-1])

    def update(self, batch: BatchContext) -> list[Score]:
        if batch.mask_images is None:
            return []
        masks = batch.cached(
            "object_masks", lambda: masks_to_tensor(batch.mask_images, batch.image_processor).to(batch.pixels.device)
        )
        keep = masks.flatten(1).any(dim=1)  # an object cropped away leaves nothing to point at
        maps, masks = batch.maps[keep], masks[keep]
        scores = []
        for metric in self.metrics():
            settings = metric.settings_for(self.run)
            scores.append(Score(metric.name, metric.compute(maps, masks, **settings), settings))
        return scores


@register_scorer
class FaithfulnessScorer(Scorer):
    """Deletion and insertion AUCs of the class similarity."""

    group = "faithfulness"

    def update(self, batch: BatchContext) -> list[Score]:
        score = partial(class_similarity, batch.embed, text_embeds=batch.text_embeds)
        steps = self.run.args.faithfulness_steps
        return [
            Score(metric.name, metric.compute(score, batch.pixels, batch.maps, steps), metric.settings_for(self.run))
            for metric in self.metrics()
        ]


@register_scorer
class RoarScorer(Scorer):
    """ROAR: frozen features of the clean and the pixel-removed images, gathered batch by batch, then probed."""

    group = "roar"
    default = False

    def __init__(self, run: RunContext) -> None:
        super().__init__(run)
        self.fractions = list(run.args.roar_fractions)
        self.labels: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.clean: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.removed: dict[tuple[str, str, float], list[torch.Tensor]] = defaultdict(list)

    @torch.no_grad()
    def update(self, batch: BatchContext) -> list[Score]:
        if batch.method == self.run.methods[0]:  # once per batch and model
            self.labels[batch.model_name].append(batch.labels.cpu())
            self.clean[batch.model_name].append(batch.image_embeds.cpu())
        # The processor's mean colour: CLIP's training-set mean, which normalises to 0 (an uninformative fill).
        fill = torch.tensor(batch.image_processor.image_mean)
        for fraction in self.fractions:
            removed = remove_top_pixels(batch.pixels, batch.maps, fraction, fill)
            self.removed[batch.model_name, batch.method, fraction].append(batch.embed(removed).cpu())
        return []

    def results(self) -> list[dict[str, Any]]:
        out = []
        num_classes = len(self.run.class_names)
        for model, chunks in tqdm(self.clean.items(), desc="ROAR probes"):
            labels = torch.cat(self.labels[model])
            train_index, test_index = split_indices(len(labels), seed=self.run.seed)
            counts = {"num_images": len(test_index), "probe_train_images": len(train_index)}
            # Nothing removed: one probe per model, the curve's common starting point for every method.
            clean = roar_accuracy(torch.cat(chunks), labels, num_classes, train_index, test_index)
            for method in self.run.methods:
                out.append(result_entry(model, "roar_accuracy", method, clean, {"fraction": 0.0, **counts}))
                for fraction in self.fractions:
                    features = torch.cat(self.removed[model, method, fraction])
                    value = roar_accuracy(features, labels, num_classes, train_index, test_index)
                    out.append(result_entry(model, "roar_accuracy", method, value, {"fraction": fraction, **counts}))
        return out


@register_scorer
class RobustnessScorer(Scorer):
    """Zero-shot accuracy under the library's L∞ PGD attack, one result per radius."""

    group = "robustness"
    default = False
    uses_maps = False

    def update(self, batch: BatchContext) -> list[Score]:
        args = self.run.args
        scores = []
        for eps in args.robust_eps:
            adversarial = robust_predictions(
                batch.embed,
                batch.model,
                batch.pixels,
                batch.class_embeds,
                eps,
                args.attack_steps,
                args.attack_step_size,
            )
            attack = {"eps": eps, "steps": args.attack_steps, "step_size": args.attack_step_size, "norm": "linf"}
            scores.append(Score("robust_accuracy", adversarial == batch.labels, attack))
        return scores
