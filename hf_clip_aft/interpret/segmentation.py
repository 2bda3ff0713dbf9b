"""Open-vocabulary semantic segmentation from per-class dense scores: per-pixel predictions and mean IoU.

The protocol of training-free segmentation papers (SCLIP, NACLIP; CLIP Surgery), in pure functions: raw per-class
scores ``(B, C, H, W)`` (:func:`hf_clip_aft.interpret.surgery.dense_scores`) -> the arg-max class of every pixel,
with an optional background rule (:func:`segmentation_predictions`) -> a confusion matrix against the ground-truth
class masks, summed over the data set (:func:`confusion_matrix`) -> the mean intersection over union
(:func:`mean_iou`). The evaluation's ``segmentation`` metric group (``--metrics segmentation``, metric ``miou``) is
:class:`hf_clip_aft.interpret.scorers.SegmentationScorer`.

Decision rule. NACLIP and SCLIP label each pixel by the arg-max of its raw cosine scores (their
``postprocess_result``: ``softmax(logit_scale · scores)`` over the classes, arg-max, and the pixels whose highest
probability is below ``prob_thd`` set to class 0, with ``logit_scale`` 40); the arg-max is that of the raw scores.
The min-max scaling per class of the display maps (:func:`~hf_clip_aft.interpret.surgery.dense_maps`) is not used:
it changes which class wins a pixel. CLIP Surgery's code has no segmentation; its scores (the feature-surgery
similarities over the dataset's classes, the paper's multi-class rule) go through the same rule.

Protocol of the evaluation: one centre-crop window per image at the model's resolution (the processor's resize of
the short side and centre crop, masks resized with nearest neighbour), no sliding window, no PAMR. The papers use
mmseg's sliding window (224-pixel crops, stride 112) on the short side resized to 336 or 448 pixels, with PAMR
refinement in NACLIP, over the whole image; the numbers differ, so compare mIoU only between runs of the same
protocol.

Class masks: single-channel images whose pixel values are the dataset's class indices (``class_names[i]`` is value
i; Pascal VOC's palette PNGs are read as their indices) and :data:`IGNORE_INDEX` for unannotated pixels. The
``localization`` group reads the same column as object masks (0 = background, 255 = unannotated, any other value =
object), so a dataset whose class 0 is the background (Pascal VOC's convention) serves both groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

IGNORE_INDEX = 255  # the label of unannotated pixels (object borders in Pascal VOC), left out of every count
LOGIT_SCALE = 40.0  # NACLIP's and SCLIP's logit_scale: the class probabilities are softmax(40 · scores)


def segmentation_predictions(
    scores: torch.Tensor,
    background_threshold: float | None = None,
    background_class: int = 0,
    logit_scale: float = LOGIT_SCALE,
) -> torch.Tensor:
    """The predicted class ``(B, H, W)`` (int64) of every pixel: the arg-max over raw class scores ``(B, C, H, W)``
    (e.g. cosine similarities, :func:`~hf_clip_aft.interpret.surgery.dense_scores`).

    Background rule (NACLIP's and SCLIP's): with `background_threshold` set, the class probabilities are
    ``softmax(logit_scale · scores)`` over the C classes, and every pixel whose highest probability is below the
    threshold (in [0, 1]; the papers use 0.1 on datasets with a background class) is labelled `background_class`;
    the background, if it is one of the C classes, also competes through its own prompt. Without a threshold: the
    plain arg-max. Ties go to the lowest class index.
    """
    if scores.dim() != 4:
        raise ValueError(f"Class scores must have shape (B, C, H, W); got {tuple(scores.shape)}.")
    predictions = scores.argmax(dim=1)
    if background_threshold is not None:
        if not 0.0 <= background_threshold <= 1.0:
            raise ValueError(
                f"background_threshold={background_threshold} is a class probability and must lie in [0, 1] "
                "(NACLIP and SCLIP use 0.1)."
            )
        probabilities = torch.softmax(logit_scale * scores.float(), dim=1)
        low = probabilities.amax(dim=1) < background_threshold
        predictions = torch.where(low, background_class, predictions)
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
        labels.append(Image.fromarray(np.repeat(array.astype(np.uint8)[..., None], 3, axis=-1)))  # RGB, as processed
    out = image_processor(
        images=labels, do_normalize=False, do_rescale=False, resample=Image.Resampling.NEAREST, return_tensors="pt"
    )
    return out["pixel_values"][:, 0].round().long()
