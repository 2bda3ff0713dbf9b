"""The inner maximisation of AFT: PGD on the embedding distance, with randomised smoothing and a norm penalty.

All budgets are given **in units of 1/255** (``attack_eps=4`` means ε = 4/255 in pixel space [0, 1]), as the
community writes them. The function is pure: it reads the budgets from any object with the attributes below (an
:class:`~hf_clip_aft.AFTConfig` or a `types.SimpleNamespace`), touches no model parameter, and returns detached
adversarial pixels. Freezing the parameters during the attack is the caller's business
(:func:`hf_clip_aft.modeling.frozen_parameters`), because only the caller knows which module holds them.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .modeling import EmbedFn

ATTACK_NORMS = ("huber", "linf", "l2", "elastic")
# The step only uses the gradient's direction, so the objective is scaled before differentiating. Under fp16 autocast
# the backward's activation gradients are otherwise subnormal (a random ViT-B/16: at most 3.1e-5 at batch 1, 3.1e-6
# at batch 8, below fp16's smallest normal 6.1e-5; benchmarks/fp16_attack_gradient.py) and lose their low bits; 2^16
# lifts them into the normal range with ~2^15 headroom below fp16's maximum. A power of two, so fp32 and bf16 steps
# are bit-identical with or without it.
OBJECTIVE_SCALE = 2.0**16


class AttackSettings(Protocol):
    attack_eps: float  # radius ε, in units of 1/255
    attack_step_size: float  # PGD step α, in units of 1/255
    attack_steps: int  # number of PGD steps K
    attack_eta: float  # penalty scale η, in units of 1/255
    noise_sigma: float  # std σ of the smoothing noise, in units of 1/255
    attack_norm: str  # one of ATTACK_NORMS


def embedding_distance(embeds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance per example, ``||e - e0||²`` summed over the embedding: shape ``(B,)``."""
    return (embeds - target).pow(2).sum(dim=-1)


def norm_penalty(delta: torch.Tensor, norm: str, eps: float, eta: float) -> torch.Tensor:
    """The penalty P(δ) subtracted from the inner objective (ε, η in pixel units, i.e. already divided by 255).

    - ``huber``: ``(η/ε) · mean over batch and pixels of ||δ_pixel||₂`` (L2 over the colour channels);
    - ``elastic``: ``(1/(4η)) · Σ (|δ| − ε)₊²`` per image, mean over the batch;
    - ``linf`` and ``l2``: 0 (the budget is a hard projection instead).
    """
    if norm == "huber":
        return (eta / eps) * torch.linalg.vector_norm(delta, dim=1).mean()
    if norm == "elastic":
        excess = (delta.abs() - eps).clamp(min=0)
        return (excess.pow(2).flatten(1).sum(dim=1) / (4 * eta)).mean()
    return delta.new_zeros(())


def inner_objective(
    embed_fn: EmbedFn,
    pixels: torch.Tensor,
    delta: torch.Tensor,
    target_embeds: torch.Tensor,
    norm: str,
    eps: float,
    eta: float,
) -> torch.Tensor:
    """L_in(δ) = mean over the batch of ``||f(pixels + δ) − e0||²`` minus the norm penalty (a scalar)."""
    return embedding_distance(embed_fn(pixels + delta), target_embeds).mean() - norm_penalty(delta, norm, eps, eta)


def _l2_renorm(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Scale each image's δ down to L2 norm ``radius`` when it is larger."""
    norms = torch.linalg.vector_norm(delta.flatten(1), dim=1).view(-1, 1, 1, 1)
    return delta * (radius / norms.clamp(min=1e-12)).clamp(max=1.0)


def _project(delta: torch.Tensor, pixels: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    if norm == "l2":
        delta = _l2_renorm(delta, eps)
    elif norm != "elastic":  # elastic is penalty-only: no box projection
        delta = delta.clamp(-eps, eps)
    return (pixels + delta).clamp(0, 1) - pixels


def adversarial_perturbation(
    embed_fn: EmbedFn,
    pixels: torch.Tensor,
    target_embeds: torch.Tensor,
    config: AttackSettings,
) -> torch.Tensor:
    """Adversarial pixels ``x + δ*`` (detached, in [0, 1]) that push ``embed_fn`` away from `target_embeds`.

    K = ``config.attack_steps`` steps of size α from a uniform random start in the ε-ball. At each step a fresh
    Gaussian sample z ~ N(0, σ²) smooths the clean image (x̃ = clamp(x + z, 0, 1)), the ascent direction is the
    gradient of ``||f(x̃ + δ) − e0||² − P(δ)`` (signed for the box norms, L2-normalised per image for ``l2``), and δ
    is projected back into the budget and the image range. The returned image carries no smoothing noise.

    Args:
        embed_fn: ``pixels -> embeddings``; its parameters should be frozen by the caller.
        pixels: clean images ``(B, 3, H, W)`` in [0, 1].
        target_embeds: the frozen reference embeddings e0 ``(B, D)``.
        config: budgets in units of 1/255 (see :class:`AttackSettings`).
    """
    if config.attack_norm not in ATTACK_NORMS:
        raise ValueError(f"attack_norm={config.attack_norm!r} is not one of {ATTACK_NORMS}.")
    norm = config.attack_norm
    eps, alpha = config.attack_eps / 255, config.attack_step_size / 255
    eta, sigma = config.attack_eta / 255, config.noise_sigma / 255
    pixels = pixels.detach()
    target_embeds = target_embeds.detach()
    if config.attack_steps == 0 or eps == 0:
        return pixels.clone()

    delta = torch.empty_like(pixels).uniform_(-eps, eps)
    if norm == "l2":
        delta = _l2_renorm(delta, eps)
    delta = (pixels + delta).clamp(0, 1) - pixels

    for _ in range(config.attack_steps):
        smoothed = (pixels + sigma * torch.randn_like(pixels)).clamp(0, 1) if sigma > 0 else pixels
        delta.requires_grad_(True)
        with torch.enable_grad():
            objective = inner_objective(embed_fn, smoothed, delta, target_embeds, norm, eps, eta)
            (grad,) = torch.autograd.grad(objective * OBJECTIVE_SCALE, delta)
        with torch.no_grad():
            if norm == "l2":
                grad_norm = torch.linalg.vector_norm(grad.flatten(1), dim=1).view(-1, 1, 1, 1)
                step = grad / grad_norm.clamp(min=1e-12)
            else:
                step = grad.sign()
            delta = _project(delta + alpha * step, pixels, norm, eps)
    return (pixels + delta).detach()
