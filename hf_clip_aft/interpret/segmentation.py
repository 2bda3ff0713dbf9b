"""Open-vocabulary semantic segmentation from per-class dense maps: per-pixel predictions and mean IoU.

The protocol of training-free segmentation papers (CLIP Surgery, SCLIP, NACLIP), in pure functions: per-class maps
``(B, C, H, W)`` (e.g. :func:`hf_clip_aft.interpret.surgery.dense_maps`) -> the arg-max class of every pixel, with
an optional background rule (:func:`segmentation_predictions`) -> a confusion matrix against the ground-truth class
masks, summed over the data set (:func:`confusion_matrix`) -> the mean intersection over union (:func:`mean_iou`).

The papers evaluate with mmseg's sliding window (224-pixel crops, stride 112) on the short side resized to 336 or
448 pixels, with PAMR refinement in NACLIP; a single forward pass at the model's resolution gives other numbers, so
compare mIoU only between runs of the same protocol.
"""

from __future__ import annotations

import torch

from .registry import TASK_SEGMENTATION, Metric, register_metric

IGNORE_INDEX = 255  # the label of unannotated pixels (object borders in Pascal VOC), left out of every count


def segmentation_predictions(
    maps: torch.Tensor, background_threshold: float | None = None, background_class: int = 0
) -> torch.Tensor:
    """The predicted class ``(B, H, W)`` (int64) of every pixel: the arg-max over the class maps ``(B, C, H, W)``.

    Background rule. Either give the background its own channel (e.g. channel 0 the prompt "background", as in
    Pascal VOC's 21 classes) and leave `background_threshold` at None: plain arg-max. Or set `background_threshold`:
    every pixel whose highest class score is below it is labelled `background_class` instead (for maps min-max
    normalised per class, e.g. :func:`~hf_clip_aft.interpret.surgery.dense_maps`, the threshold is in [0, 1]
    units). `background_class` is a label value, which may lie outside the C channels (e.g. C for "none of these").
    Ties go to the lowest class index.
    """
    if maps.dim() != 4:
        raise ValueError(f"Class maps must have shape (B, C, H, W); got {tuple(maps.shape)}.")
    scores, predictions = maps.max(dim=1)
    if background_threshold is not None:
        predictions = torch.where(scores < background_threshold, background_class, predictions)
    return predictions


def confusion_matrix(
    predictions: torch.Tensor, targets: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Pixel counts ``(K, K)`` (int64): entry ``[t, p]`` counts pixels of true class t predicted as p.

    Pixels labelled `ignore_index` in `targets` are left out. Sum the matrices of every batch to evaluate a data set.

    Args:
        predictions: ``(B, H, W)`` predicted labels in ``[0, num_classes)``.
        targets: ``(B, H, W)`` ground-truth labels in ``[0, num_classes)`` or `ignore_index`.
        num_classes: K, the number of labels (background included, when it is a label).
        ignore_index: the label of unannotated pixels.
    """
    if predictions.shape != targets.shape:
        raise ValueError(
            f"Predictions of shape {tuple(predictions.shape)} do not match targets of shape {tuple(targets.shape)}; "
            "resize the masks like the images (nearest neighbour) first."
        )
    keep = targets != ignore_index
    truth, predicted = targets[keep].long(), predictions[keep].long()
    for name, labels in (("targets", truth), ("predictions", predicted)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"{name} hold labels outside [0, {num_classes}) (found {labels.min().item()}..{labels.max().item()});"
                f" pass num_classes covering every label, or mark unannotated pixels with {ignore_index}."
            )
    counts = torch.bincount(truth * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def class_iou(confusion: torch.Tensor) -> torch.Tensor:
    """IoU ``(K,)`` (float64) of each class from a confusion matrix ``[true, predicted]``: TP / (TP + FP + FN).

    A class absent from both the ground truth and the predictions has no IoU: NaN.
    """
    confusion = confusion.double()
    hits = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - hits
    return torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, float("nan")))


def mean_iou(confusion: torch.Tensor) -> torch.Tensor:
    """Mean IoU (0-dim float64, in [0, 1], higher is better) over the classes present in the ground truth or the
    predictions of a confusion matrix ``[true, predicted]``; classes absent from both are excluded (NaN when no
    class is present)."""
    return class_iou(confusion).nanmean()


register_metric(
    Metric(
        name="miou",
        group="segmentation",
        task=TASK_SEGMENTATION,
        higher_is_better=True,
        description="mean IoU of the arg-max class maps against the class masks (classes seen in either), in [0, 1]",
        compute=mean_iou,
    )
)
