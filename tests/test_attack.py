"""The inner maximisation: budgets, penalties, strength and determinism."""

from types import SimpleNamespace

import pytest
import torch

from hf_clip_aft import adversarial_perturbation
from hf_clip_aft.attack import embedding_distance, inner_objective, norm_penalty
from hf_clip_aft.modeling import encode_images, frozen_parameters

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def settings(**overrides):
    base = dict(attack_eps=4.0, attack_step_size=1.0, attack_steps=10, attack_eta=1.0, noise_sigma=1.0,
                attack_norm="huber")
    return SimpleNamespace(**{**base, **overrides})


@pytest.fixture
def setup(tiny_vision):
    torch.manual_seed(1)
    pixels = torch.rand(4, 3, 64, 64)
    pixels[0, :, :8] = 0.0  # pixels at the range's edges: the projection must keep x + δ in [0, 1]
    pixels[1, :, :8] = 1.0
    embed = lambda x: encode_images(tiny_vision, x, MEAN, STD)  # noqa: E731
    with torch.no_grad():
        target = embed(pixels)
    return tiny_vision, embed, pixels, target


@pytest.mark.parametrize("norm", ["huber", "linf", "l2", "elastic"])
def test_budget_and_image_range(setup, norm):
    model, embed, pixels, target = setup
    eps = 4 / 255 if norm != "l2" else 64 / 255
    with frozen_parameters(model):
        adv = adversarial_perturbation(embed, pixels, target, settings(attack_norm=norm, attack_eps=eps * 255))
    delta = adv - pixels
    assert not adv.requires_grad
    assert adv.min() >= 0 and adv.max() <= 1
    if norm in ("huber", "linf"):
        assert delta.abs().max() <= eps + 1e-6
    elif norm == "l2":
        assert torch.linalg.vector_norm(delta.flatten(1), dim=1).max() <= eps + 1e-5
    else:  # elastic: a penalty, not a box; it must still have moved the image
        assert delta.abs().max() > 0


@pytest.mark.parametrize("norm", ["huber", "linf", "l2"])
def test_attack_beats_random_noise_of_the_same_size(setup, norm):
    model, embed, pixels, target = setup
    eps = 4 / 255 if norm != "l2" else 64 / 255
    cfg = settings(attack_norm=norm, attack_eps=eps * 255, noise_sigma=0.0)
    with frozen_parameters(model):
        adv = adversarial_perturbation(embed, pixels, target, cfg)
    delta = adv - pixels
    # Random perturbations with the same per-image size as the attack's.
    noise = torch.randn_like(pixels)
    noise = noise / torch.linalg.vector_norm(noise.flatten(1), dim=1).view(-1, 1, 1, 1)
    noise = noise * torch.linalg.vector_norm(delta.flatten(1), dim=1).view(-1, 1, 1, 1)
    noise = (pixels + noise).clamp(0, 1) - pixels
    with torch.no_grad():
        attacked = embedding_distance(embed(adv), target)
        random = embedding_distance(embed(pixels + noise), target)
    assert (attacked > random).all()
    assert attacked.mean() > 3 * random.mean()


def test_huber_penalty_matches_the_formula():
    delta = torch.zeros(2, 3, 2, 2)
    delta[0, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0])  # one pixel with colour-norm 5
    delta[1, 0, 1, 1] = -2.0  # one pixel with colour-norm 2
    eps, eta = 4.0, 1.0
    # (η/ε) · mean over 2 images × 4 pixels of the colour norms = 0.25 · 7 / 8
    assert norm_penalty(delta, "huber", eps, eta).item() == pytest.approx(0.25 * 7 / 8)


def test_elastic_penalty_matches_the_formula():
    eps, eta = 1.0, 0.5
    delta = torch.zeros(2, 3, 2, 2)
    delta[0, 0, 0, 0] = 3.0  # excess 2 -> 4
    delta[0, 1, 1, 0] = -1.5  # excess 0.5 -> 0.25
    delta[1, 2, 0, 1] = 0.9  # inside the budget -> 0
    # per image Σ excess² / (4η): [4.25 / 2, 0], mean over the batch
    assert norm_penalty(delta, "elastic", eps, eta).item() == pytest.approx((4.25 / 2 + 0) / 2)
    assert norm_penalty(delta, "linf", eps, eta).item() == 0


def test_inner_objective_subtracts_the_penalty(setup):
    _, embed, pixels, target = setup
    delta = torch.full_like(pixels, 2 / 255)
    with torch.no_grad():
        value = inner_objective(embed, pixels, delta, target, "huber", 4 / 255, 1 / 255)
        distance = embedding_distance(embed(pixels + delta), target).mean()
    penalty = 0.25 * (3 ** 0.5) * 2 / 255  # every pixel has colour-norm √3 · 2/255
    assert value.item() == pytest.approx(distance.item() - penalty, rel=1e-5)


def test_zero_budget_returns_the_clean_image(setup):
    _, embed, pixels, target = setup
    adv = adversarial_perturbation(embed, pixels, target, settings(attack_eps=0.0))
    assert torch.equal(adv, pixels)
    with torch.no_grad():
        assert embedding_distance(embed(adv), target).max().item() == 0


def test_fixed_seed_without_noise_is_deterministic(setup):
    model, embed, pixels, target = setup
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        with frozen_parameters(model):
            runs.append(adversarial_perturbation(embed, pixels, target, settings(noise_sigma=0.0)))
    assert torch.equal(runs[0], runs[1])


def test_attack_leaves_weights_without_gradients(setup):
    model, embed, pixels, target = setup
    with frozen_parameters(model):
        adversarial_perturbation(embed, pixels, target, settings(attack_steps=2))
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored after the block


def test_unknown_norm_is_refused(setup):
    _, embed, pixels, target = setup
    with pytest.raises(ValueError, match="attack_norm='l3'"):
        adversarial_perturbation(embed, pixels, target, settings(attack_norm="l3"))
