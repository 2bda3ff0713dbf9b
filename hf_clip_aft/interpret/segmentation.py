"""Open-vocabulary semantic segmentation from per-class dense maps: per-pixel predictions and mean IoU.

The protocol of training-free segmentation papers (CLIP Surgery, SCLIP, NACLIP), in pure functions: per-class maps
``(B, C, H, W)`` (e.g. :func:`hf_clip_aft.interpret.surgery.dense_maps`) -> the arg-max class of every pixel, with
an optional background rule (:func:`segmentation_predictions`) -> a confusion matrix against the ground-truth class
masks, summed over the data set (:func:`confusion_matrix`) -> the mean intersection over union (:func:`mean_iou`).
The evaluation's ``segmentation`` metric group (``--metrics segmentation``, metric ``miou``) is
:class:`hf_clip_aft.interpret.scorers.SegmentationScorer`.

Protocol of the evaluation: one centre-crop window per image at the model's resolution (the processor's resize of
the short side and centre crop, masks resized with nearest neighbour), no sliding window, no PAMR. The papers use
mmseg's sliding window (224-pixel crops, stride 112) on the short side resized to 336 or 448 pixels, with PAMR
refinement in NACLIP, over the whole image; the numbers differ, so compare mIoU only between runs of the same
protocol.

Class masks: single-channel images whose pixel values are the dataset's class indices (``class_names[i]`` is value
i; Pascal VOC's palette PNGs are read as their indices) and :data:`IGNORE_INDEX` for unannotated pixels. The
``localization`` group reads the same column as object masks (non-zero = object), so a dataset whose class 0 is the
background (Pascal VOC's convention) serves both groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

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


def background_predictions(maps: torch.Tensor, background_threshold: float | None = None) -> torch.Tensor:
    """The evaluation's background rule: predicted labels ``(B, H, W)`` of class maps ``(B, C, H, W)``.

    Without a threshold: the plain arg-max over every class (a background class, if the dataset has one, competes
    through its own prompt). With `background_threshold`: class 0 is the background; it is not a prompt but the
    answer for every pixel whose highest score among classes 1..C-1 is below the threshold.
    """
    if background_threshold is None:
        return segmentation_predictions(maps)
    if maps.dim() != 4 or maps.shape[1] < 2:
        raise ValueError(
            f"A background threshold needs class maps (B, C, H, W) with C >= 2 (class 0 the background); got "
            f"{tuple(maps.shape)}."
        )
    # Arg-max over classes 1.. (channel j is label j + 1); below the threshold the label -1 + 1 = 0, the background.
    return segmentation_predictions(maps[:, 1:], background_threshold, background_class=-1) + 1


def class_masks_to_tensor(masks: Sequence[Image.Image], image_processor) -> torch.Tensor:
    """Class-index masks ``(B, H, W)`` (int64) resized and centre-cropped like the images, with nearest-neighbour
    resampling so that no label is blended into another; the :data:`IGNORE_INDEX` pixels stay ignored.

    Each mask is a single-channel image whose values are class indices (mode ``L``, ``P`` read as palette indices,
    ``I``; or grey RGB, all channels equal), all in [0, 255].
    """
    labels = []
    for i, mask in enumerate(masks):
        array = np.asarray(mask)
        if array.ndim == 3 and (array == array[..., :1]).all():
            array = array[..., 0]  # a grey-level mask stored as RGB
        if array.ndim != 2 or array.min() < 0 or array.max() > 255:
            raise ValueError(
                f"Mask {i} (mode {mask.mode}, shape {array.shape}, values {array.min()}..{array.max()}) is not a class "
                f"mask: segmentation needs single-channel masks of class indices in [0, 255] ({IGNORE_INDEX}: "
                "unannotated); convert colour-coded masks to indices first."
            )
        labels.append(Image.fromarray(array.astype(np.uint8)).convert("RGB"))
    out = image_processor(
        images=labels, do_normalize=False, do_rescale=False, resample=Image.Resampling.NEAREST, return_tensors="pt"
    )
    return out["pixel_values"][:, 0].round().long()
