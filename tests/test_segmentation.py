"""Open-vocabulary segmentation metrics on hand-made masks: predictions, confusion matrix, mean IoU."""

import math

import pytest
import torch

from hf_clip_aft.interpret.registry import TASK_SEGMENTATION, get_metric, metric_groups
from hf_clip_aft.interpret.segmentation import class_iou, confusion_matrix, mean_iou, segmentation_predictions


def _masks() -> torch.Tensor:
    """Two 4 x 4 label masks with classes 0 (background), 1 and 2, and an unannotated (255) border pixel."""
    masks = torch.zeros(2, 4, 4, dtype=torch.long)
    masks[0, :2, :2] = 1
    masks[0, 2:, 2:] = 2
    masks[1, :, :2] = 2
    masks[1, 0, 3] = 255
    return masks


def _one_hot_maps(masks: torch.Tensor, classes: int = 3) -> torch.Tensor:
    """Class maps (B, C, H, W) that score 1 on each pixel's true class (0 on unannotated pixels)."""
    return torch.stack([(masks == c).float() for c in range(classes)], dim=1)


def test_perfect_maps_score_one_and_inverted_maps_zero():
    masks = _masks()
    perfect = segmentation_predictions(_one_hot_maps(masks))
    assert mean_iou(confusion_matrix(perfect, masks, 3)).item() == 1.0
    inverted = segmentation_predictions(1 - _one_hot_maps(masks))  # every pixel's true class scores lowest
    confusion = confusion_matrix(inverted, masks, 3)
    assert confusion.diagonal().sum() == 0
    assert mean_iou(confusion).item() == 0.0


def test_confusion_matrix_by_hand_and_iou_of_absent_classes():
    targets = torch.tensor([[[0, 0, 1, 255]]])
    predictions = torch.tensor([[[0, 1, 1, 3]]])
    confusion = confusion_matrix(predictions, targets, 4)
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[0, 0], expected[0, 1], expected[1, 1] = 1, 1, 1
    assert torch.equal(confusion, expected)  # the 255 pixel (predicted 3) is not counted
    iou = class_iou(confusion)
    assert iou[:2].tolist() == [0.5, 0.5]
    assert math.isnan(iou[2]) and math.isnan(iou[3])  # absent from both: excluded from the mean
    assert mean_iou(confusion).item() == 0.5
    # Summing batches' matrices equals one matrix over all pixels.
    halves = confusion_matrix(predictions[..., :2], targets[..., :2], 4) + confusion_matrix(
        predictions[..., 2:], targets[..., 2:], 4
    )
    assert torch.equal(halves, confusion)


def test_background_threshold_and_errors():
    maps = torch.tensor([[0.9, 0.2], [0.1, 0.3]]).view(1, 2, 1, 2)  # class 0: [0.9, 0.2], class 1: [0.1, 0.3]
    assert segmentation_predictions(maps).tolist() == [[[0, 1]]]
    assert segmentation_predictions(maps, background_threshold=0.5, background_class=2).tolist() == [[[0, 2]]]
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([[[3]]]), torch.tensor([[[0]]]), 3)
    with pytest.raises(ValueError, match="do not match"):
        confusion_matrix(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        segmentation_predictions(torch.rand(2, 4, 4))


def test_miou_is_registered_in_the_segmentation_group():
    metric = get_metric("miou")
    assert (metric.group, metric.task, metric.higher_is_better) == ("segmentation", TASK_SEGMENTATION, True)
    assert metric.compute is mean_iou
    assert "miou" in metric_groups()["segmentation"]
