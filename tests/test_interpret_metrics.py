"""Pure metric functions of hf_clip_aft.interpret on hand-made maps, masks and curves (no model)."""

import math

import pytest
import torch

from hf_clip_aft.interpret.faithfulness import blur, curve_auc, faithfulness_curve
from hf_clip_aft.interpret.metrics import (
    energy_pointing_game,
    gini_index,
    pointing_game,
    top_fraction_iou,
    top_fraction_mask,
)
from hf_clip_aft.interpret.roar import remove_top_pixels, roar_accuracy, split_indices
from hf_clip_aft.interpret.vit_maps import attention_rollout
from hf_clip_aft.interpret.zero_shot import top1_accuracy


def test_gini_uniform_is_zero_and_one_hot_is_one_minus_one_over_n():
    uniform = torch.full((1, 8, 8), 3.0)
    one_hot = torch.zeros(1, 8, 8)
    one_hot[0, 2, 5] = 7.0
    assert gini_index(uniform).item() == pytest.approx(0.0, abs=1e-6)
    assert gini_index(one_hot).item() == pytest.approx(1 - 1 / 64, abs=1e-6)
    assert gini_index(torch.zeros(1, 4, 4)).item() == 0.0


def test_gini_orders_maps_by_concentration_and_ignores_scale():
    spread = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0)) + 0.5
    concentrated = spread.clone()
    concentrated[0, 4:8, 4:8] *= 50  # same map with most mass moved onto 16 pixels
    assert gini_index(concentrated) > gini_index(spread)
    assert gini_index(10 * spread).item() == pytest.approx(gini_index(spread).item(), abs=1e-6)
    # Gini of a two-valued map, by hand: n=4, values (0, 0, 1, 1) -> 1 - 2 * (0.5*1.5/4 + 0.5*0.5/4) = 0.5
    assert gini_index(torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])).item() == pytest.approx(0.5, abs=1e-6)


def _square_mask(size: int = 8) -> torch.Tensor:
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[0, 2:6, 2:6] = True
    return mask


def test_map_with_all_mass_inside_the_mask_scores_one():
    mask = _square_mask()
    inside = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(1)) * mask
    assert pointing_game(inside, mask).item() == 1.0
    assert energy_pointing_game(inside, mask).item() == pytest.approx(1.0)
    # The top 25% of 64 pixels are 16 pixels: exactly the 4x4 object when the map is its indicator.
    assert top_fraction_iou(mask.float(), mask, fraction=0.25).item() == pytest.approx(1.0)


def test_localisation_penalises_mass_outside_the_mask():
    mask = _square_mask()
    saliency_map = torch.zeros(1, 8, 8)
    saliency_map[0, 3, 3] = 1.0  # inside
    saliency_map[0, 0, 7] = 3.0  # outside, and the peak
    assert pointing_game(saliency_map, mask).item() == 0.0
    assert energy_pointing_game(saliency_map, mask).item() == pytest.approx(0.25)
    # Top 2 pixels {peak outside, pixel inside}: IoU = 1 / (16 + 1).
    assert top_fraction_iou(saliency_map, mask, fraction=2 / 64).item() == pytest.approx(1 / 17)


def test_unannotated_pixels_are_left_out_of_every_localisation_metric():
    """The same map and mask as above, with the outside peak's column unannotated: the map is scored as if the image
    were its 56 annotated pixels."""
    mask = _square_mask()
    saliency_map = torch.zeros(1, 8, 8)
    saliency_map[0, 3, 3] = 1.0  # inside
    saliency_map[0, 0, 7] = 3.0  # outside, the peak, on an unannotated pixel
    annotated = torch.ones(1, 8, 8, dtype=torch.bool)
    annotated[0, :, 7] = False
    assert pointing_game(saliency_map, mask, annotated).item() == 1.0
    assert energy_pointing_game(saliency_map, mask, annotated).item() == pytest.approx(1.0)
    # Top 2 of 56 annotated pixels: the inside pixel and the first zero in row-major order; IoU = 1 / (16 + 1).
    assert top_fraction_mask(saliency_map, 2 / 56, annotated).sum().item() == 2
    assert not top_fraction_mask(saliency_map, 1.0, annotated)[annotated.logical_not()].any()
    assert top_fraction_iou(saliency_map, mask, 2 / 56, annotated).item() == pytest.approx(1 / 17)
    nothing = torch.zeros(1, 8, 8, dtype=torch.bool)  # no annotated pixel: no score
    for metric in (pointing_game, energy_pointing_game, top_fraction_iou):
        assert math.isnan(metric(saliency_map, mask, annotated=nothing).item())
    with pytest.raises(ValueError, match="Annotated-pixel masks"):
        pointing_game(saliency_map, mask, torch.ones(1, 4, 4, dtype=torch.bool))


def test_top_fraction_mask_keeps_the_highest_pixels_and_breaks_ties_in_order():
    maps = torch.tensor([[[0.1, 0.9], [0.5, 0.3]]])
    assert top_fraction_mask(maps, 0.5).tolist() == [[[False, True], [True, False]]]
    ties = torch.ones(1, 2, 2)
    assert top_fraction_mask(ties, 0.25).tolist() == [[[True, False], [False, False]]]
    with pytest.raises(ValueError, match="fraction"):
        top_fraction_mask(maps, 1.5)


def test_metrics_reject_masks_of_another_shape():
    with pytest.raises(ValueError, match="do not match"):
        pointing_game(torch.rand(1, 8, 8), torch.ones(1, 4, 4, dtype=torch.bool))


def test_curve_auc_by_hand():
    curves = torch.tensor([[2.0, 2.0, 2.0], [0.0, 0.5, 1.0]])
    assert curve_auc(curves).tolist() == pytest.approx([2.0, 0.5])


def test_oracle_ordering_beats_random_ordering_on_deletion_and_insertion():
    """A linear score Σ w·x: deleting the pixels with the largest contribution w·x first is optimal."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(4, 3, 16, 16, generator=generator)
    weights = torch.rand(1, 3, 16, 16, generator=generator) ** 4  # a few pixels dominate the score

    def score(x):
        return (weights * x).flatten(1).sum(dim=1)

    maps = {"oracle": (weights * pixels).sum(dim=1), "random": torch.rand(4, 16, 16, generator=generator)}
    black = torch.zeros_like(pixels)
    deletion = {name: faithfulness_curve(score, pixels, m, "deletion", 16) for name, m in maps.items()}
    insertion = {name: faithfulness_curve(score, pixels, m, "insertion", 16, black) for name, m in maps.items()}
    assert (curve_auc(deletion["oracle"]) < curve_auc(deletion["random"])).all()
    assert (curve_auc(insertion["oracle"]) > curve_auc(insertion["random"])).all()
    # Both curves run between the clean score and the baseline's score (0 for black).
    assert torch.allclose(deletion["oracle"][:, 0], score(pixels))
    assert torch.allclose(deletion["oracle"][:, -1], torch.zeros(4))
    assert torch.allclose(insertion["oracle"][:, -1], score(pixels))


def test_blur_keeps_a_constant_image_and_smooths_an_impulse():
    constant = torch.full((1, 3, 20, 20), 0.4)
    assert torch.allclose(blur(constant, sigma=2.0), constant, atol=1e-6)
    impulse = torch.zeros(1, 1, 21, 21)
    impulse[0, 0, 10, 10] = 1.0
    blurred = blur(impulse, sigma=2.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert blurred.max().item() < 0.1


def test_attention_rollout_rows_are_distributions():
    generator = torch.Generator().manual_seed(0)
    attentions = [torch.rand(2, 3, 5, 5, generator=generator).softmax(dim=-1) for _ in range(4)]
    rollout = attention_rollout(attentions)
    assert rollout.shape == (2, 5, 5)
    assert torch.allclose(rollout.sum(dim=-1), torch.ones(2, 5))
    assert (rollout >= 0).all()
    # Attention that only looks at itself leaves every token with itself: the identity.
    identity = [torch.eye(5).expand(2, 3, 5, 5)] * 3
    assert torch.allclose(attention_rollout(identity), torch.eye(5).expand(2, 5, 5))


def test_remove_top_pixels_fills_exactly_the_top_share():
    pixels = torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(2, 10, 10, generator=torch.Generator().manual_seed(1))
    fill = torch.tensor([0.1, 0.2, 0.3])
    removed = remove_top_pixels(pixels, maps, 0.3, fill)
    changed = (removed != pixels).any(dim=1)
    assert changed.sum(dim=(1, 2)).tolist() == [30, 30]
    assert torch.equal(changed, top_fraction_mask(maps, 0.3))
    assert torch.allclose(removed[0, :, changed[0]], fill.view(3, 1).expand(3, 30))


def test_roar_probe_learns_separable_features_and_fails_on_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    centres = torch.randn(4, 8, generator=generator) * 3
    features = centres[labels] + 0.1 * torch.randn(40, 8, generator=generator)
    train, test = split_indices(40, seed=0)
    assert sorted(torch.cat([train, test]).tolist()) == list(range(40))
    assert roar_accuracy(features, labels, 4, train, test) == 1.0
    noise = torch.randn(40, 8, generator=generator)
    assert roar_accuracy(noise, labels, 4, train, test) < 0.75


def test_top1_accuracy():
    assert top1_accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])) == 0.75
    with pytest.raises(ValueError, match="same"):
        top1_accuracy(torch.tensor([0, 1]), torch.tensor([0]))
    assert math.isclose(top1_accuracy(torch.tensor([3]), torch.tensor([3])), 1.0)
