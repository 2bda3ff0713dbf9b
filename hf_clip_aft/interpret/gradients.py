"""Pixel-gradient attributions: Simple Gradient, SmoothGrad and Integrated Gradients.

Each returns raw per-channel attributions ``(B, 3, H, W)`` of a score ``pixels -> (B,)`` with respect to the pixels
in [0, 1] (the model's mean/std normalisation is inside the score, see :mod:`hf_clip_aft.modeling`), so that the
gradients are in score units per unit of pixel intensity. :func:`hf_clip_aft.interpret.saliency.saliency` reduces
them over the colour channels. The images of a batch must not interact inside the score (true of CLIP in eval
mode: LayerNorm is per token), because the gradient of the summed scores is taken.
"""

from __future__ import annotations

import torch

from .faithfulness import ScoreFn


def input_gradients(score_fn: ScoreFn, pixels: torch.Tensor) -> torch.Tensor:
    """Simple Gradient (Simonyan et al., 2014): ``∂ score / ∂ pixels``, shape ``(B, 3, H, W)``."""
    inputs = pixels.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(score_fn(inputs).sum(), inputs)
    return grad


def smoothgrad(score_fn: ScoreFn, pixels: torch.Tensor, samples: int = 25, noise: float = 0.15) -> torch.Tensor:
    """SmoothGrad (Smilkov et al., 2017): the mean gradient over `samples` noisy copies ``x + N(0, σ²)``.

    ``σ = noise · (max − min)`` of each image's pixels, the paper's parameterisation (it recommends 10–20%). The
    raw gradients are averaged; the channel reduction then takes absolute values. Draws from torch's global RNG
    (seed it for reproducible maps).
    """
    if samples < 1:
        raise ValueError(f"samples={samples} must be at least 1.")
    flat = pixels.detach().flatten(1)
    sigma = (noise * (flat.max(dim=1).values - flat.min(dim=1).values)).view(-1, 1, 1, 1)
    total = torch.zeros_like(pixels)
    for _ in range(samples):
        total += input_gradients(score_fn, pixels + sigma * torch.randn_like(pixels))
    return total / samples


def integrated_gradients(
    score_fn: ScoreFn,
    pixels: torch.Tensor,
    steps: int = 32,
    baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrated Gradients (Sundararajan et al., 2017) from a black baseline, by the midpoint Riemann sum.

    ``(x − x') · (1/m) Σ_k ∇score(x' + (k − ½)/m · (x − x'))`` for k = 1..m. The attributions sum (over channels
    and pixels) to approximately ``score(x) − score(x')`` (completeness), closer as `steps` grows.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1.")
    pixels = pixels.detach()
    baseline = torch.zeros_like(pixels) if baseline is None else baseline.detach()
    total = torch.zeros_like(pixels)
    for k in range(steps):
        alpha = (k + 0.5) / steps
        total += input_gradients(score_fn, baseline + alpha * (pixels - baseline))
    return (pixels - baseline) * total / steps
