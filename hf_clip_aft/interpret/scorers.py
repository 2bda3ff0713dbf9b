"""The evaluation's metrics and the scorers of their groups (``--metrics``), registered in
:mod:`hf_clip_aft.interpret.registry`.

The metrics are registered first, in the order of the summary table's rows; then one :class:`Scorer` per group, in
the order the groups run and are listed. How each group calls its metrics' ``compute``:

- ``zero_shot`` / ``robustness``: per image, 1 where the (clean / attacked) zero-shot prediction is the label.
- ``sparsity``: ``compute(maps)``.
- ``localization``: ``compute(maps, masks, annotated=annotated, **settings)`` on the images whose object mask is
  not empty (``annotated``: False on unannotated pixels, mask value 255).
- ``faithfulness``: ``compute(score_fn, pixels, maps, steps)``.
- ``roar``: a linear probe on the features of every image (whole-dataset results).
- ``segmentation``: ``compute(confusion)`` on the confusion counts of the whole dataset (whole-dataset results).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from functools import partial
from typing import Any

import torch
from tqdm.auto import tqdm

from .batches import localisation_masks, scorable_masks
from .faithfulness import INSERTION_BLUR_SIGMA, curve_auc, faithfulness_curve
from .metrics import energy_pointing_game, gini_index, pointing_game, top_fraction_iou
from .registry import (
    TASK_SALIENCY,
    TASK_SEGMENTATION,
    TASK_ZERO_SHOT,
    BatchContext,
    Metric,
    RunContext,
    Score,
    Scorer,
    get_map_method,
    register_metric,
    register_scorer,
    result_entry,
)
from .roar import remove_top_pixels, roar_accuracy, split_indices
from .robustness import robust_predictions
from .saliency import class_similarity
from .segmentation import class_masks_to_tensor, confusion_matrix, mean_iou, segmentation_predictions

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
    Metric(
        "miou",
        "segmentation",
        TASK_SEGMENTATION,
        True,
        "mean IoU of the raw-score arg-max classes against the class masks (classes seen in either), in [0, 1]",
        mean_iou,
        settings=lambda run: {"background_threshold": run.args.segmentation_background_threshold},
    ),
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
    """Localisation of each map against the object mask, over the annotated pixels (:func:`localisation_masks`:
    255 is unannotated); skipped (with a note) when the dataset has no masks. An image with no annotated pixel, or
    no object pixel, in the model's crop is skipped and counted in a note."""

    group = "localization"

    def __init__(self, run: RunContext) -> None:
        super().__init__(run)
        # (model, reason) -> images skipped; counted once per batch and model, at the first map method.
        self.skipped: dict[tuple[str, str], int] = defaultdict(int)
        self.seen: dict[str, int] = defaultdict(int)
        if run.mask_column is None:
            self.notes.append(
                "localization skipped: the dataset has no object-mask column (pass --mask_column to name one)."
            )
            logger.warning(self.notes[-1])

    def update(self, batch: BatchContext) -> list[Score]:
        if batch.mask_images is None:
            return []
        masks, annotated = batch.cached(
            "object_masks",
            lambda: torch.stack(localisation_masks(batch.mask_images, batch.image_processor)).to(batch.pixels.device),
        )
        keep, skipped = scorable_masks(masks, annotated)
        if batch.method == self.run.methods[0]:
            self.seen[batch.model_name] += len(keep)
            for why, count in skipped.items():
                self.skipped[batch.model_name, why] += count
        maps, masks, annotated = batch.maps[keep], masks[keep], annotated[keep]
        scores = []
        for metric in self.metrics():
            settings = metric.settings_for(self.run)
            values = metric.compute(maps, masks, annotated=annotated, **settings)
            scores.append(Score(metric.name, values, settings))
        return scores

    def results(self) -> list[dict[str, Any]]:
        for model, seen in self.seen.items():
            reasons = [f"{self.skipped[model, why]} with {why}" for why in ("no annotated pixel", "no object pixel")]
            if any(self.skipped[model, why] for why in ("no annotated pixel", "no object pixel")):
                self.notes.append(
                    f"localization: {model}: images skipped out of {seen}: {', '.join(reasons)} in the model's crop "
                    "(mask value 255 = unannotated, 0 = background, any other value = object; binary masks that "
                    "store the object as 255 must store it as 1)."
                )
                logger.warning(self.notes[-1])
        return []


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


@register_scorer
class SegmentationScorer(Scorer):
    """Open-vocabulary segmentation (``--metrics segmentation``, opt-in): for every model and every map method with
    per-class dense maps, the confusion counts of :func:`segmentation_predictions` of ``batch.dense_maps()`` (the raw
    scores of every dataset class; arg-max of the raw scores, NACLIP's and SCLIP's rule) against the class masks
    (:func:`class_masks_to_tensor`), summed over the dataset; after the last batch, ``miou`` = :func:`mean_iou` of
    the sums. Methods without dense maps, and datasets without a mask column, are skipped with a note. The
    background rule is the run's ``segmentation_background_threshold``.
    """

    group = "segmentation"
    default = False

    def __init__(self, run: RunContext) -> None:
        super().__init__(run)
        self.threshold = run.args.segmentation_background_threshold
        self.confusion: dict[tuple[str, str], torch.Tensor] = {}
        self.num_images: dict[tuple[str, str], int] = {}
        if run.mask_column is None:
            self.notes.append(
                "segmentation skipped: the dataset has no class-mask column (pass --mask_column naming one whose "
                "pixels are class indices)."
            )
        without = [method for method in run.methods if get_map_method(method).dense_fn is None]
        if without and run.mask_column is not None:
            self.notes.append(
                f"segmentation skipped for {', '.join(without)}: no per-class dense maps (methods with them: "
                f"{', '.join(name for name in run.methods if name not in without) or 'none requested'})."
            )

    def update(self, batch: BatchContext) -> list[Score]:
        if batch.mask_images is None or get_map_method(batch.method).dense_fn is None:
            return []
        targets = batch.cached(
            "class_masks",
            lambda: class_masks_to_tensor(batch.mask_images, batch.image_processor).to(batch.pixels.device),
        )
        predictions = segmentation_predictions(batch.dense_maps(), self.threshold)
        counts = confusion_matrix(predictions, targets, len(self.run.class_names)).cpu()
        key = batch.model_name, batch.method
        self.confusion[key] = self.confusion[key] + counts if key in self.confusion else counts
        self.num_images[key] = self.num_images.get(key, 0) + len(targets)
        return []

    def results(self) -> list[dict[str, Any]]:
        (miou,) = self.metrics()
        settings = miou.settings_for(self.run)
        out = []
        for (model, method), confusion in self.confusion.items():
            if confusion.sum() == 0:  # every pixel unannotated: no class to average over
                self.notes.append(f"segmentation: no annotated pixel for {model} / {method}; miou not reported.")
                continue
            value = miou.compute(confusion).item()
            out.append(
                result_entry(
                    model, miou.name, method, value, {**settings, "num_images": self.num_images[(model, method)]}
                )
            )
        return out
