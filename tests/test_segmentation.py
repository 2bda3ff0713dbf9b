"""Open-vocabulary segmentation metrics on hand-made masks (predictions, confusion matrix, mean IoU), the evaluation's
segmentation group, and the gradient vs training-free comparison of one evaluation run."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from hf_clip_aft.cli import run_command
from hf_clip_aft.data import load_processor
from hf_clip_aft.interpret.batches import open_mask
from hf_clip_aft.interpret.registry import (
    MAP_METHODS,
    TASK_SEGMENTATION,
    BatchContext,
    RunContext,
    get_metric,
    metric_groups,
)
from hf_clip_aft.interpret.results import load_results
from hf_clip_aft.interpret.scorers import SegmentationScorer
from hf_clip_aft.interpret.segmentation import (
    class_iou,
    class_masks_to_tensor,
    confusion_matrix,
    mean_iou,
    segmentation_predictions,
)
from hf_clip_aft.interpret.suite import EvaluationArguments


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


def _naclip_postprocess(seg_logits: torch.Tensor, prob_thd: float, logit_scale: float = 40.0) -> torch.Tensor:
    """NACLIP's ``postprocess_result`` (naclip.py, one query per class), image by image, written out."""
    predictions = []
    for logits in seg_logits:
        seg_probs = torch.softmax(logits * logit_scale, dim=0)
        seg_pred = seg_probs.argmax(0, keepdim=True)
        seg_pred[seg_probs.max(0, keepdim=True)[0] < prob_thd] = 0
        predictions.append(seg_pred[0])
    return torch.stack(predictions)


def test_background_threshold_is_the_papers_probability_rule_and_errors():
    scores = torch.tensor([[0.9, 0.30], [0.1, 0.31]]).view(1, 2, 1, 2)  # class 0: [0.9, 0.30], class 1: [0.1, 0.31]
    assert segmentation_predictions(scores).tolist() == [[[0, 1]]]
    # softmax(40 x scores): pixel 1's best class has probability 1 / (1 + e^-0.4) = 0.60.
    assert segmentation_predictions(scores, background_threshold=0.7, background_class=2).tolist() == [[[0, 2]]]
    assert segmentation_predictions(scores, background_threshold=0.5, background_class=2).tolist() == [[[0, 1]]]
    cosines = torch.rand(3, 5, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.2
    for threshold in (None, 0.1, 0.3):
        expected = _naclip_postprocess(cosines, threshold or 0.0)
        assert torch.equal(segmentation_predictions(cosines, threshold), expected)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([[[3]]]), torch.tensor([[[0]]]), 3)
    with pytest.raises(ValueError, match="do not match"):
        confusion_matrix(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        segmentation_predictions(torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="probability"):
        segmentation_predictions(scores, background_threshold=2.0)


def test_miou_takes_the_arg_max_of_raw_scores_where_min_max_scaling_flips_the_winner():
    """Class 0 spans a wide range, class 1 a narrow one: at the middle pixel class 0 has the higher raw score (0.5
    against 0.44), but after a per-class min-max class 1 wins (0.8 against 0.5). The papers' rule keeps class 0."""
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.40, 0.44, 0.45]]).view(1, 2, 1, 3)
    targets = torch.tensor([[[0, 0, 1]]])
    low, high = scores.amin(dim=(2, 3), keepdim=True), scores.amax(dim=(2, 3), keepdim=True)
    assert segmentation_predictions((scores - low) / (high - low)).tolist() == [[[0, 1, 1]]]  # the flipped winner
    assert segmentation_predictions(scores).tolist() == [[[0, 0, 1]]]
    assert mean_iou(confusion_matrix(segmentation_predictions(scores), targets, 2)).item() == 1.0


def test_miou_is_registered_in_the_segmentation_group():
    metric = get_metric("miou")
    assert (metric.group, metric.task, metric.higher_is_better) == ("segmentation", TASK_SEGMENTATION, True)
    assert metric.compute is mean_iou
    assert "miou" in metric_groups()["segmentation"]


# --- the evaluation's segmentation group (SegmentationScorer) and the gradient vs training-free comparison ---

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "hf_clip_aft", "assets", "tiny-clip")


def _class_mask_images() -> list[Image.Image]:
    """Two 96 x 128 class masks (larger than tiny-clip's 64 px, so they are resized and cropped): background 0, a
    class-1 and a class-2 block, and an unannotated (255) band in the first."""
    masks = np.zeros((2, 96, 128), np.uint8)
    masks[0, 20:70, 30:80] = 1
    masks[0, 70:74, 30:80] = 255
    masks[1, 10:60, 50:110] = 2
    return [Image.fromarray(mask) for mask in masks]


def _scorer_batch(method: str, maps: torch.Tensor | None, mask_images, processor) -> BatchContext:
    """A batch of tiny-clip's 64 px images whose `method` dense maps are `maps` (in the batch's cache, as if
    computed)."""
    batch = BatchContext(
        index=0,
        model_name="model",
        model=None,
        image_processor=processor,
        embed=None,
        pixels=torch.zeros(len(mask_images), 3, 64, 64),
        labels=torch.zeros(len(mask_images), dtype=torch.long),
        mask_images=mask_images,
        image_embeds=None,
        class_embeds=torch.zeros(3, 4),
        predictions=None,
        text_embeds=None,
        method=method,
    )
    if maps is not None:
        batch._cache["dense_maps", method] = maps
    return batch


def _score(methods, maps_by_method, mask_images, processor, threshold=None):
    args = EvaluationArguments(models=["model"], dataset="d", segmentation_background_threshold=threshold)
    run = RunContext(args, methods, ["background", "cat", "dog"], "mask", (), 0)
    scorer = SegmentationScorer(run)
    for method in methods:
        assert scorer.update(_scorer_batch(method, maps_by_method.get(method), mask_images, processor)) == []
    return scorer, {(r["model"], r["method"]): r for r in scorer.results()}


def test_segmentation_scorer_perfect_inverted_thresholded_and_skipped_methods():
    processor = load_processor(TINY).image_processor
    images = _class_mask_images()
    targets = class_masks_to_tensor(images, processor)
    assert targets.shape == (2, 64, 64) and set(targets.unique().tolist()) == {0, 1, 2, 255}  # nearest: no blends
    perfect = _one_hot_maps(targets)
    scorer, results = _score(["clip_surgery", "simple_gradient"], {"clip_surgery": perfect}, images, processor)
    (entry,) = results.values()  # simple_gradient has no dense maps: skipped, with a note
    assert entry["method"] == "clip_surgery" and entry["metric"] == "miou" and entry["task"] == TASK_SEGMENTATION
    assert entry["value"] == 1.0
    assert entry["settings"] == {"background_threshold": None, "num_images": 2}
    assert any("segmentation skipped for simple_gradient" in note for note in scorer.notes)
    _, results = _score(["naclip"], {"naclip": 1 - perfect}, images, processor)
    assert results["model", "naclip"]["value"] == 0.0
    # Threshold: a pixel is background when its best class probability, softmax(40 x score), is below 0.5. The
    # background's own prompt scores -0.1 everywhere and loses every arg-max; on background pixels classes 1 and 2
    # tie at 0 (probability 0.49 each), on object pixels the true class scores 0.3 (probability ~1).
    scores = 0.3 * perfect
    scores[:, 0] = -0.1
    _, results = _score(["sclip"], {"sclip": scores}, images, processor)
    assert results["model", "sclip"]["value"] < 1.0
    _, results = _score(["sclip"], {"sclip": scores}, images, processor, threshold=0.5)
    assert results["model", "sclip"]["value"] == 1.0
    assert results["model", "sclip"]["settings"]["background_threshold"] == 0.5
    with pytest.raises(ValueError, match="not a class mask"):
        class_masks_to_tensor([Image.new("RGB", (8, 8), (255, 0, 0))], processor)


def test_palette_masks_are_read_as_their_class_indices(tmp_path):
    """Pascal VOC stores class masks as palette PNGs: the evaluation reads the indices, not the palette's colours."""
    mask = Image.fromarray(np.array([[0, 1], [2, 255]], np.uint8).repeat(32, 0).repeat(32, 1), mode="L").convert("P")
    mask.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [224, 224, 192] * 253)
    mask.save(tmp_path / "mask.png")
    opened = open_mask({"bytes": None, "path": str(tmp_path / "mask.png")})
    assert opened.mode == "P"
    labels = class_masks_to_tensor([opened], load_processor(TINY).image_processor)
    assert labels[0, ::32, ::32].tolist() == [[0, 1], [2, 255]]


@pytest.fixture(scope="module")
def segmentation_dataset(tmp_path_factory):
    """An imagefolder with a label column and a class-mask column (VOC convention: class 0 the background): coloured
    squares on black, their masks holding the square's class index inside and 0 outside, and one empty scene."""
    root = tmp_path_factory.mktemp("segmentation") / "data"
    split = root / "train"
    split.mkdir(parents=True)
    rows = ["file_name,mask_file_name,label"]
    # Classes in sorted order: background 0, blue 1, red 2.
    scenes = [("red", 2, (255, 0, 0)), ("blue", 1, (0, 0, 255))] * 2 + [("background", 0, None)]
    for i, (name, index, colour) in enumerate(scenes):
        image = np.zeros((80, 80, 3), np.uint8)
        mask = np.zeros((80, 80), np.uint8)
        if colour is not None:
            image[20:50, 10 + 5 * i : 40 + 5 * i] = colour
            mask[20:50, 10 + 5 * i : 40 + 5 * i] = index
        Image.fromarray(image).save(split / f"{i}.png")
        Image.fromarray(mask).save(split / f"{i}_mask.png")
        rows.append(f"{i}.png,{i}_mask.png,{name}")
    (split / "metadata.csv").write_text("\n".join(rows) + "\n")
    return str(root)


def test_evaluate_command_gives_the_gradient_vs_training_free_table(tmp_path, segmentation_dataset, aft_stand_in):
    output = tmp_path / "eval"
    argv = ["--models", TINY, aft_stand_in, "--dataset", segmentation_dataset, "--split", "train"]
    argv += ["--methods", "simple_gradient", "clip_surgery", "--metrics", "localization", "segmentation"]
    argv += ["--batch_size", "3", "--device", "cpu", "--grid_images", "2", "--output", str(output)]
    run_command("evaluate", argv)
    results = load_results(output)
    assert results["settings"]["num_classes"] == 3 and results["settings"]["mask_column"] == "mask"
    values = {(r["model"], r["metric"], r["method"]): r for r in results["results"]}
    for model in (TINY, aft_stand_in):
        miou = values[model, "miou", "clip_surgery"]
        assert 0.0 <= miou["value"] <= 1.0 and miou["settings"]["num_images"] == 5
        assert (model, "miou", "simple_gradient") not in values  # no dense maps: skipped with a note
        for method in ("simple_gradient", "clip_surgery"):
            # The empty scene has no object to localise: 4 images.
            assert values[model, "energy_pointing_game", method]["settings"]["num_images"] == 4
    assert any("segmentation skipped for simple_gradient" in note for note in results["settings"]["notes"])
    summary = (output / "summary.md").read_text()
    section = summary[summary.index("## Gradient vs training-free maps: energy_pointing_game ↑") :]
    assert "| model | simple_gradient (gradient) | clip_surgery (training-free) |" in section
    energy = values[aft_stand_in, "energy_pointing_game", "clip_surgery"]["value"]
    assert (
        f"| `tiny-clip-aft` | {values[aft_stand_in, 'energy_pointing_game', 'simple_gradient']['value']:.4f}" in section
    )
    assert f"{energy:.4f} |" in section and "| Δ (`tiny-clip-aft` − `tiny-clip`) | " in section
    assert "| miou ↑ | clip_surgery |" in summary  # the main table as before, with the new metric's rows
    # The grid: the image, then {simple_gradient, clip_surgery} x {base, AFT}.
    assert Image.open(output / "saliency_grid.png").size[0] == 96 * (1 + 2 * 2)


def test_methods_all_keeps_the_six_gradient_and_attention_maps():
    six = ["simple_gradient", "smoothgrad", "integrated_gradients", "gradcam", "attention", "rollout"]
    assert EvaluationArguments(models=["m"], dataset="d").saliency_methods() == six
    everything = EvaluationArguments(models=["m"], dataset="d", methods=["all", "training-free"]).saliency_methods()
    assert everything == [*six, "clip_surgery", "naclip", "sclip", "patch_similarity"]
    selected = EvaluationArguments(models=["m"], dataset="d", methods=["gradcam", "training-free", "gradcam"])
    assert selected.saliency_methods() == ["gradcam", "clip_surgery", "naclip", "sclip", "patch_similarity"]
    assert all(not method.default for method in MAP_METHODS.values() if method.family == "training-free")
    with pytest.raises(ValueError, match="selectors"):
        EvaluationArguments(models=["m"], dataset="d", methods=["surgery"]).check()
