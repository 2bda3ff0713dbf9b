"""Adversarial robustness of zero-shot classification under the library's PGD attack.

The attack is :func:`hf_clip_aft.attack.adversarial_perturbation` with an L∞ budget and no smoothing noise or
penalty: K signed-gradient steps that push the image embedding away from its own clean embedding (the label-free
embedding attack of the training loop, as in FARE's evaluation of embedding drift). Robust accuracy is the zero-shot
top-1 accuracy on the attacked images. A label-aware attack on the classification loss would be stronger; this one
measures how far a bounded perturbation moves the embedding across class boundaries.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from ..attack import adversarial_perturbation
from ..modeling import EmbedFn, frozen_parameters
from .zero_shot import zero_shot_predictions


def robust_predictions(
    embed: EmbedFn,
    model: nn.Module,
    pixels: torch.Tensor,
    class_embeds: torch.Tensor,
    eps: float,
    steps: int = 10,
    step_size: float = 1.0,
) -> torch.Tensor:
    """Zero-shot predictions ``(B,)`` on adversarial images within an L∞ ball of radius `eps`.

    Args:
        embed: the pixel-space encoder of `model` (:func:`hf_clip_aft.modeling.embed_fn`).
        model: the module holding the encoder's parameters (frozen during the attack).
        pixels: clean images ``(B, 3, H, W)`` in [0, 1].
        class_embeds: L2-normalised class embeddings ``(C, D)``.
        eps, step_size: budget and PGD step **in units of 1/255** (``eps=4`` is 4/255).
        steps: PGD steps. Starts uniformly at random in the ball (torch's global RNG).
    """
    if eps < 0:
        raise ValueError(f"eps={eps} must be non-negative (in units of 1/255).")
    settings = SimpleNamespace(
        attack_eps=eps,
        attack_step_size=step_size,
        attack_steps=steps,
        attack_eta=0.0,
        noise_sigma=0.0,
        attack_norm="linf",
    )
    with frozen_parameters(model):
        with torch.no_grad():
            clean = embed(pixels)
        adversarial = adversarial_perturbation(embed, pixels, clean, settings)
        with torch.no_grad():
            return zero_shot_predictions(embed(adversarial), class_embeds)
