"""The inner maximisation: budgets, penalties, strength and determinism."""

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml

from hf_clip_aft import AFTConfig, adversarial_perturbation
from hf_clip_aft.attack import (
    ExampleRandomness,
    _draw,
    embedding_distance,
    group_normalize,
    group_norms,
    group_project,
    inner_objective,
    norm_penalty,
)
from hf_clip_aft.config import OFFICIAL_SETTINGS
from hf_clip_aft.modeling import encode_images, frozen_parameters

ROOT = Path(__file__).resolve().parents[1]

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def settings(**overrides):
    base = {
        "attack_eps": 4.0,
        "attack_step_size": 1.0,
        "attack_steps": 10,
        "attack_eta": 1.0,
        "noise_sigma": 1.0,
        "attack_norm": "huber",
    }
    return SimpleNamespace(**{**base, **overrides})


@pytest.fixture
def setup(tiny_vision):
    torch.manual_seed(1)
    pixels = torch.rand(4, 3, 64, 64)
    pixels[0, :, :8] = 0.0  # pixels at the range's edges: the projection must keep x + δ in [0, 1]
    pixels[1, :, :8] = 1.0

    def embed(x):
        return encode_images(tiny_vision, x, MEAN, STD)

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
    penalty = 0.25 * (3**0.5) * 2 / 255  # every pixel has colour-norm √3 · 2/255
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


# --- the official code's rules (github.com/peterant330/CLIP_AFT), written here from its description ---


def block_norm_map(t, size):
    """Every element replaced by the L2 norm of its size × size block in its channel (unfold/fold, not reshapes)."""
    b, c, h, w = t.shape
    cols = F.unfold(t.pow(2).reshape(b * c, 1, h, w), size, stride=size)
    sums = cols.sum(dim=1, keepdim=True).expand_as(cols)
    return F.fold(sums, (h, w), size, stride=size).reshape(b, c, h, w).sqrt()


def official_group_project(delta, eps, size):
    norms = block_norm_map(delta, size)
    return delta * torch.where(norms > eps, eps / norms, 1.0)


def official_pgd(embed, x, e0, norm, eps, eps2, steps, alpha, size=None, momentum=0.9):
    """The official PGD step by step (pgd_train.py:27-66, start from adversarial_training_clip.py:279)."""
    normalize = {
        "huber": torch.sign,
        "l2": lambda g: g / torch.linalg.vector_norm(g.flatten(1), dim=1).clamp(min=1e-12).view(-1, 1, 1, 1),
        "elastic": lambda g: g / torch.linalg.vector_norm(g.flatten(1), dim=1).clamp(min=1e-12).view(-1, 1, 1, 1),
        "group": lambda g: g / block_norm_map(g, size),
    }[norm]
    delta = torch.zeros_like(x).uniform_(-eps, eps)
    velocity = torch.zeros_like(x)
    for _ in range(steps):
        noisy = (x + torch.randn_like(x) / 255).clamp(0, 1)
        delta.requires_grad_(True)
        loss = (embed(noisy + delta) - e0).pow(2).sum(dim=1).mean()
        if norm == "elastic":
            loss = loss - 0.25 / eps2 * (delta.abs() - eps).square().clamp(0).sum(dim=[1, 2, 3]).mean()
        elif norm == "huber":
            loss = loss - eps2 / eps * torch.linalg.norm(delta, dim=1).mean()
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            velocity = normalize(momentum * velocity + normalize(grad))
            delta = delta + alpha * velocity
            if norm == "huber":
                delta = delta.clamp(-eps, eps)
            elif norm == "l2":
                delta = torch.renorm(delta, p=2, dim=0, maxnorm=eps)
            elif norm == "group":
                delta = official_group_project(delta, eps, size)
            delta = (x + delta).clamp(0, 1) - x
    return x + delta


def test_group_projection_by_hand():
    delta = torch.zeros(1, 2, 2, 4)
    delta[0, 0, :, :2] = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # block norm 5 > 1: scaled by 1/5
    delta[0, 0, :, 2:] = torch.tensor([[0.1, 0.2], [0.2, 0.1]])  # block norm √0.1 < 1: untouched
    delta[0, 1, :, :2] = 1.0  # the other channel: block norm 2, scaled by 1/2 on its own
    expected = delta.clone()
    expected[0, 0, :, :2] = torch.tensor([[0.6, 0.0], [0.0, 0.8]])
    expected[0, 1, :, :2] = 0.5
    assert torch.allclose(group_project(delta, 1.0, 2), expected)
    assert torch.allclose(group_norms(delta, 2)[0, :, 0], torch.tensor([[5.0, 0.1**0.5], [2.0, 0.0]]))


def test_group_projection_equals_the_official_formula_at_224_px():
    torch.manual_seed(0)
    eps = 4 / 255
    # A block of 196 values U(0, a) has an L2 norm near 8a: with a = s·ε/8, s ~ U(0, 2) per block, blocks land on
    # both sides of ε.
    scale = (2 * torch.rand(2, 3, 16, 16)).repeat_interleave(14, dim=2).repeat_interleave(14, dim=3)
    delta = torch.rand(2, 3, 224, 224) * eps / 8 * scale
    projected = group_project(delta, eps, 14)
    assert torch.allclose(projected, official_group_project(delta, eps, 14), rtol=1e-6, atol=0)
    assert group_norms(projected, 14).max() <= eps * (1 + 1e-6)
    inside = block_norm_map(delta, 14) <= eps
    assert 0 < inside.float().mean() < 1
    assert torch.equal(projected[inside], delta[inside])
    assert torch.allclose(group_norms(group_normalize(delta, 14), 14), torch.ones(2, 3, 16, 16))


@pytest.mark.parametrize(
    "norm, overrides",
    [
        ("group", {"attack_group_size": 16}),
        ("elastic", {"elastic_rule": "official"}),
        ("huber", {"attack_momentum": 0.9}),
        ("l2", {"attack_momentum": 0.9, "attack_eps": 64.0}),
    ],
)
def test_official_rules_equal_the_official_pgd(setup, norm, overrides):
    model, embed, pixels, target = setup
    cfg = settings(attack_norm=norm, attack_steps=2, clamp_random_start=False, **overrides)
    with frozen_parameters(model):
        torch.manual_seed(7)
        ours = adversarial_perturbation(embed, pixels, target, cfg)
        torch.manual_seed(7)
        theirs = official_pgd(embed, pixels, target, norm, cfg.attack_eps / 255, 1 / 255, 2, 1 / 255, size=16)
    assert (ours - pixels).abs().max() > 0
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)


def test_official_elastic_penalty_matches_the_formula():
    eps, eta = 1.0, 0.5
    delta = torch.zeros(2, 3, 2, 2)
    delta[0, 0, 0, 0] = 3.0  # (3 − 1)² = 4
    delta[0, 1, 1, 0] = -1.5  # (1.5 − 1)² = 0.25
    delta[1, 2, 0, 1] = 0.9  # inside the box, penalised too: (0.9 − 1)² = 0.01
    # every zero is |0 − 1|² = 1: image 0 has 10, image 1 has 11; per image Σ / (4η), mean over the batch
    expected = ((4 + 0.25 + 10) / 2 + (0.01 + 11) / 2) / 2
    assert norm_penalty(delta, "elastic", eps, eta, "official").item() == pytest.approx(expected)


@pytest.mark.parametrize("clamp", [True, False])
def test_official_random_start_is_not_clamped(setup, clamp):
    model, embed, pixels, target = setup
    inputs = []

    def record(x):
        inputs.append(x.detach().clone())
        return embed(x)

    torch.manual_seed(3)
    drawn = torch.empty_like(pixels).uniform_(-4 / 255, 4 / 255)
    torch.manual_seed(3)
    with frozen_parameters(model):
        adversarial_perturbation(
            record, pixels, target, settings(attack_steps=1, noise_sigma=0.0, clamp_random_start=clamp)
        )
    if clamp:
        assert torch.equal(inputs[0], (pixels + drawn).clamp(0, 1))
    else:
        assert torch.equal(inputs[0], pixels + drawn)
        assert inputs[0].min() < 0 and inputs[0].max() > 1  # the fixture has pixels at 0 and 1


def test_bad_group_size_is_refused(setup):
    _, embed, pixels, target = setup
    with pytest.raises(ValueError, match="attack_group_size=24 px does not divide the image size 64×64 px"):
        adversarial_perturbation(embed, pixels, target, settings(attack_norm="group", attack_group_size=24))
    with pytest.raises(ValueError, match="needs attack_group_size"):
        adversarial_perturbation(embed, pixels, target, settings(attack_norm="group"))
    config = AFTConfig(output_dir="unused", attack_norm="group")
    config.resolve_group_size(16, 64)  # the trainer's fill-in: the model's patch size
    assert config.attack_group_size == 16
    config = AFTConfig(output_dir="unused", attack_norm="group", attack_group_size=14)
    with pytest.raises(ValueError, match="attack_group_size=14 px does not divide the image size 64×64 px"):
        config.resolve_group_size(16, 64)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("attack_group_size", 0, "attack_group_size=0 is invalid"),
        ("elastic_rule", "paper", "elastic_rule='paper' is invalid"),
        ("attack_momentum", 1.0, "attack_momentum=1.0 is invalid"),
        ("preset", "offical", "preset='offical' is invalid"),
    ],
)
def test_bad_official_settings_are_refused(name, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        AFTConfig(output_dir="unused", **{name: value})


def test_official_presets_set_exactly_the_documented_values():
    doc = (ROOT / "docs" / "official_parity.md").read_text()
    # The preset table of the doc: one row per setting, "| `name` | `YAML value` | source |".
    documented = {m[1]: yaml.safe_load(m[2]) for m in re.finditer(r"^\| `(\w+)` \| `([^`]*)` \|", doc, re.MULTILINE)}
    assert documented == OFFICIAL_SETTINGS
    fields = {f.name for f in dataclasses.fields(AFTConfig)}
    preset = yaml.safe_load((ROOT / "recipes" / "configs" / "official-vit-b-16.yaml").read_text())
    assert {key: preset.get(key) for key in OFFICIAL_SETTINGS} == OFFICIAL_SETTINGS
    config = AFTConfig(**{key: value for key, value in preset.items() if key in fields})
    assert config.official_differences() == {}
    assert AFTConfig(output_dir="unused").preset == "paper"


def test_weight_decay_on_every_parameter(tiny_vision):
    names = [name for name, _ in tiny_vision.named_parameters()]
    default = [name for name in names if "bias" not in name]
    assert AFTConfig(output_dir="unused").decay_parameter_names(tiny_vision, default) == default
    official = AFTConfig(output_dir="unused", weight_decay_all_parameters=True)
    assert official.decay_parameter_names(tiny_vision, default) == names


def test_example_randomness_does_not_depend_on_the_batch_split(setup):
    """The same example gets the same start and noise alone, in a batch of 4 at any row, or split over two calls."""
    model, embed, pixels, target = setup
    indices = torch.tensor([5, 0, 7, 2])
    randomness = ExampleRandomness(seed=3, epoch=1, indices=indices)
    with frozen_parameters(model):
        whole = adversarial_perturbation(embed, pixels, target, settings(), randomness)
        halves = [
            adversarial_perturbation(
                embed, pixels[part], target[part], settings(), ExampleRandomness(3, 1, indices[part])
            )
            for part in (slice(0, 2), slice(2, 4))
        ]
        reversed_rows = adversarial_perturbation(
            embed, pixels.flip(0), target.flip(0), settings(), ExampleRandomness(3, 1, indices.flip(0))
        )
    # Sign steps: the rows agree exactly unless a float difference between batch sizes flips a gradient's sign.
    torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(reversed_rows.flip(0), whole, rtol=0, atol=1e-6)


def test_example_randomness_is_fresh_per_example_epoch_and_step(setup):
    _, _, pixels, _ = setup
    row = pixels[:1]
    draws = {}
    for seed, epoch, index, draw in [(0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 1), (0, 1, 0, 1), (1, 0, 0, 1)]:
        draws[seed, epoch, index, draw] = _draw(
            row, ExampleRandomness(seed, epoch, [index]), draw, lambda t, g: t.normal_(generator=g)
        )
    values = list(draws.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(values) for b in values[i + 1 :])
    again = _draw(row, ExampleRandomness(0, 1, [0]), 1, lambda t, g: t.normal_(generator=g))
    assert torch.equal(again, draws[0, 1, 0, 1])
    # The random start and the noise are seeded independently of torch's global generator.
    torch.manual_seed(0)
    assert not torch.equal(torch.randn_like(row), draws[0, 0, 0, 1])


def test_example_randomness_needs_one_index_per_row(setup):
    _, embed, pixels, target = setup
    with pytest.raises(ValueError, match="3 example indices for a batch of 4"):
        adversarial_perturbation(embed, pixels, target, settings(), ExampleRandomness(0, 0, [0, 1, 2]))
