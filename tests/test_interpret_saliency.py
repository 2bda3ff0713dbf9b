"""Saliency methods, zero-shot and robustness on the shipped tiny CLIP (64x64 images, 16x16 patches, 2 blocks)."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from hf_clip_aft.interpret.gradients import input_gradients, integrated_gradients, smoothgrad
from hf_clip_aft.interpret.robustness import robust_predictions
from hf_clip_aft.interpret.saliency import SALIENCY_METHODS, class_similarity, reduce_channels, saliency, upsample
from hf_clip_aft.interpret.suite import load_clip
from hf_clip_aft.interpret.surgery import empty_prompt_embedding
from hf_clip_aft.interpret.vit_maps import attention_weights, gradcam_grid
from hf_clip_aft.interpret.zero_shot import class_text_embeddings, zero_shot_predictions

TINY = "hf_clip_aft/assets/tiny-clip"


@pytest.fixture(scope="module")
def tiny():
    return load_clip(TINY, "cpu")


@pytest.fixture(scope="module")
def tiny64():
    """The tiny model in float64, for finite differences (the embedding itself is returned in float32)."""
    loaded = load_clip(TINY, "cpu")
    loaded.model.double()
    return loaded


def _inputs(dtype=torch.float32, batch=2):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch, 3, 64, 64, generator=generator, dtype=dtype)
    text = F.normalize(torch.randn(batch, 16, generator=generator, dtype=dtype), dim=-1)
    return pixels, text


def test_simple_gradient_matches_finite_differences(tiny64):
    pixels, text = _inputs(torch.float64)
    score = partial(class_similarity, tiny64.embed, text_embeds=text)
    grad = input_gradients(score, pixels)
    h = 1e-3
    # Along a random direction (all pixels at once) ...
    direction = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        numeric = (score(pixels + h * direction) - score(pixels - h * direction)) / (2 * h)
    assert torch.allclose(numeric.double(), (grad * direction).flatten(1).sum(dim=1), rtol=1e-2)
    # ... and pixel by pixel, at the three largest gradients of image 0.
    for index in grad[0].flatten().abs().argsort(descending=True)[:3]:
        bump = torch.zeros(pixels[0].numel(), dtype=torch.float64)
        bump[index] = h
        bump = bump.view_as(pixels[0])
        with torch.no_grad():
            numeric = (score(pixels + bump) - score(pixels - bump))[0] / (2 * h)
        assert numeric.item() == pytest.approx(grad[0].flatten()[index].item(), rel=2e-2)
    # The map is the largest |gradient| over the colour channels (Simonyan et al.).
    maps = saliency(tiny64.model, pixels, text, "simple_gradient", image_processor=tiny64.processor.image_processor)
    assert torch.allclose(maps, grad.abs().amax(dim=1).float())


def test_channel_reductions():
    attributions = torch.tensor([[[[1.0]], [[-3.0]], [[2.0]]]])  # one pixel, three channels
    assert reduce_channels(attributions, "max_abs").item() == 3.0
    assert reduce_channels(attributions, "sum_abs").item() == 6.0
    with pytest.raises(ValueError, match="channel_reduction"):
        reduce_channels(attributions, "mean")


def test_integrated_gradients_are_complete(tiny64):
    pixels, text = _inputs(torch.float64)
    score = partial(class_similarity, tiny64.embed, text_embeds=text)
    attributions = integrated_gradients(score, pixels, steps=32)
    with torch.no_grad():
        gap = score(pixels) - score(torch.zeros_like(pixels))
    assert torch.allclose(attributions.flatten(1).sum(dim=1), gap.double(), rtol=2e-2, atol=1e-4)


def test_smoothgrad_without_noise_is_the_gradient_and_is_seeded(tiny):
    pixels, text = _inputs()
    score = partial(class_similarity, tiny.embed, text_embeds=text)
    assert torch.allclose(smoothgrad(score, pixels, samples=3, noise=0.0), input_gradients(score, pixels), atol=1e-7)
    torch.manual_seed(5)
    first = smoothgrad(score, pixels, samples=2)
    torch.manual_seed(5)
    assert torch.equal(first, smoothgrad(score, pixels, samples=2))


def test_gradcam_is_the_patch_grid_upsampled_to_the_image(tiny):
    pixels, text = _inputs()
    score = partial(class_similarity, tiny.embed, text_embeds=text)
    grid = gradcam_grid(score, tiny.model, pixels)
    assert grid.shape == (2, 4, 4)  # 64 / 16 patches a side
    assert (grid >= 0).all() and grid.sum() > 0
    maps = saliency(tiny.model, pixels, text, "gradcam", image_processor=tiny.processor.image_processor)
    assert maps.shape == (2, 64, 64)
    assert torch.allclose(maps, upsample(grid, (64, 64)), atol=1e-7)
    # The explanation depends on the class: another prompt gives another map.
    other = saliency(tiny.model, pixels, -text, "gradcam", image_processor=tiny.processor.image_processor)
    assert not torch.allclose(maps, other)


def test_attention_weights_per_block_are_row_stochastic(tiny):
    pixels, _ = _inputs()
    attentions = attention_weights(tiny.embed, tiny.model, pixels)
    assert len(attentions) == 2
    for weights in attentions:
        assert weights.shape == (2, 2, 17, 17)  # batch, heads, 1 CLS + 16 patches
        assert torch.allclose(weights.sum(dim=-1), torch.ones(2, 2, 17), atol=1e-5)


def test_attention_maps_need_eager_attention():
    model = CLIPModel.from_pretrained(TINY, attn_implementation="sdpa").eval()
    processor = load_clip(TINY, "cpu").processor
    pixels, text = _inputs()
    with pytest.raises(ValueError, match="eager"):
        saliency(model, pixels, text, "rollout", image_processor=processor.image_processor)


def test_every_method_gives_a_non_negative_map_per_image(tiny):
    pixels, text = _inputs(batch=3)
    empty = empty_prompt_embedding(tiny.model, tiny.processor.tokenizer)
    for method in SALIENCY_METHODS:
        maps = saliency(
            tiny.model,
            pixels,
            text[[0, 1, 0]],
            method,
            image_processor=tiny.processor.image_processor,
            smoothgrad_samples=2,
            ig_steps=2,
            empty_prompt_embeds=empty,  # clip_surgery's redundant feature; the other methods ignore it
        )
        assert maps.shape == (3, 64, 64), method
        assert (maps >= 0).all() and torch.isfinite(maps).all(), method
    assert all(p.requires_grad for p in tiny.model.parameters())  # frozen only while the maps are computed
    with pytest.raises(ValueError, match="one target text"):
        saliency(tiny.model, pixels, text[:2], "simple_gradient", image_processor=tiny.processor.image_processor)


def test_class_text_embeddings_and_zero_shot(tiny):
    names = ["cat", "horse", "rocket"]
    embeds = class_text_embeddings(tiny.model, tiny.processor.tokenizer, names)
    assert embeds.shape == (3, 16)
    assert torch.allclose(embeds.norm(dim=-1), torch.ones(3), atol=1e-5)
    # An image embedding equal to a class embedding is classified as that class.
    assert zero_shot_predictions(embeds[[2, 0]], embeds).tolist() == [2, 0]
    with pytest.raises(ValueError, match="exactly one"):
        class_text_embeddings(tiny.model, tiny.processor.tokenizer, names, templates=["a photo"])


def test_robust_predictions_at_zero_budget_are_the_clean_ones(tiny):
    pixels, _ = _inputs(batch=4)
    classes = F.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(3)), dim=-1)
    with torch.no_grad():
        clean = zero_shot_predictions(tiny.embed(pixels), classes)
    assert torch.equal(robust_predictions(tiny.embed, tiny.model, pixels, classes, eps=0), clean)
    assert all(p.requires_grad for p in tiny.model.parameters())  # unfrozen after the attack
