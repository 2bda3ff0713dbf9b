"""Faithfulness of saliency maps: deletion and insertion curves (Petsiuk et al., 2018, RISE) and their AUC.

A faithful map ranks first the pixels the score depends on most. Deletion replaces the top-ranked pixels of the
image with a baseline, a growing share at a time, and tracks the score: the faster it falls, the more faithful the
map (**lower deletion AUC is better**). Insertion starts from the baseline and puts the top-ranked pixels back:
the faster the score rises, the better (**higher insertion AUC is better**). Following RISE, deletion fills with
black and insertion starts from a blurred copy of the image (:func:`blur`). The score is the cosine similarity of
the image embedding to the class prompt's text embedding (see :func:`hf_clip_aft.interpret.saliency.class_similarity`).

Tied pixels are removed in a seeded random order (:func:`deletion_ranks`), not in row-major order: upsampled
Grad-CAM maps have up to 80% tied pixels (ReLU zeros, flat bilinear regions), and a row-major order would let the
image's layout, not the map, decide which of them go first (it moved deletion AUCs by up to 0.010).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # pixels (B, 3, H, W) in [0, 1] -> scores (B,)
FAITHFULNESS_MODES = ("deletion", "insertion")
INSERTION_BLUR_SIGMA = 5.0  # pixels: the blurred start of insertion curves, as in RISE
TIE_BREAK_SEED = 0  # the default seed of the random order among tied pixels, fixed so curves are reproducible


def blur(pixels: torch.Tensor, sigma: float = INSERTION_BLUR_SIGMA) -> torch.Tensor:
    """Gaussian blur of each channel, `sigma` in pixels (kernel of ``2·⌈3σ⌉ + 1`` taps, reflected borders)."""
    if sigma <= 0:
        raise ValueError(f"sigma={sigma} must be positive (in pixels).")
    radius = min(int(3 * sigma + 0.999), min(pixels.shape[-2:]) - 1)
    taps = torch.arange(-radius, radius + 1, device=pixels.device, dtype=pixels.dtype)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = pixels.shape[1]
    # Separable filter: one horizontal then one vertical pass, each a depthwise convolution.
    out = F.pad(pixels, (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def deletion_ranks(maps: torch.Tensor, seed: int = TIE_BREAK_SEED) -> torch.Tensor:
    """The position ``(B, H · W)`` (0 = first) at which each pixel is deleted or inserted: by decreasing map value,
    ties in a random order drawn from `seed` (one permutation per image, on the CPU so every device agrees).

    Pixels with different values keep their order whatever the seed; only the order among equal values changes.
    """
    if maps.dim() != 3:
        raise ValueError(f"Saliency maps must have shape (B, H, W); got {tuple(maps.shape)}. Add a batch dimension.")
    flat = maps.detach().flatten(1)
    generator = torch.Generator().manual_seed(seed)
    shuffle = torch.rand(flat.shape, generator=generator).argsort(dim=1).to(flat.device)
    # A stable sort of the shuffled values: equal values keep their (random) shuffled order.
    order = shuffle.gather(1, flat.gather(1, shuffle).argsort(dim=1, descending=True, stable=True))
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


@torch.no_grad()
def faithfulness_curve(
    score_fn: ScoreFn,
    pixels: torch.Tensor,
    maps: torch.Tensor,
    mode: str = "deletion",
    steps: int = 20,
    baseline: torch.Tensor | None = None,
    seed: int = TIE_BREAK_SEED,
) -> torch.Tensor:
    """Scores ``(B, steps + 1)`` after deleting (or inserting) the top ``s / steps`` share of pixels, s = 0..steps.

    Step s changes the ``round(s / steps · H · W)`` highest-ranked pixels. Pixels with equal map values go in a
    random order drawn from `seed` (:func:`deletion_ranks`), so a map's ties cannot favour the image's top rows;
    the default seed is fixed, so the curve is deterministic.

    Args:
        score_fn: ``pixels -> (B,)`` scores (e.g. the class similarity).
        pixels: ``(B, 3, H, W)`` in [0, 1].
        maps: ``(B, H, W)`` saliency; higher ranks a pixel earlier.
        mode: ``deletion`` (pixels -> baseline) or ``insertion`` (baseline -> pixels).
        steps: number of equal shares the pixels are deleted or inserted in.
        baseline: ``(B, 3, H, W)`` fill; by default black for deletion and :func:`blur` of the image for insertion.
        seed: seed of the random order among tied pixels.
    """
    if mode not in FAITHFULNESS_MODES:
        raise ValueError(f"mode={mode!r} is not one of {FAITHFULNESS_MODES}.")
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1.")
    if baseline is None:
        baseline = torch.zeros_like(pixels) if mode == "deletion" else blur(pixels)
    ranks = deletion_ranks(maps, seed).view_as(maps).unsqueeze(1)
    scores = []
    for step in range(steps + 1):
        selected = ranks < round(step / steps * ranks[0].numel())
        if mode == "deletion":
            images = torch.where(selected, baseline, pixels)
        else:
            images = torch.where(selected, pixels, baseline)
        scores.append(score_fn(images).float())
    return torch.stack(scores, dim=1)


def curve_auc(curves: torch.Tensor) -> torch.Tensor:
    """Area under each curve ``(B, S)`` sampled at S equally spaced points of [0, 1] (trapezoidal rule): ``(B,)``.

    The area is in the curve's own units (for deletion/insertion: cosine similarity); with the x axis normalised
    to [0, 1] it is the curve's mean height.
    """
    if curves.dim() != 2 or curves.shape[1] < 2:
        raise ValueError(f"curves must have shape (B, S) with S >= 2 points; got {tuple(curves.shape)}.")
    return torch.trapezoid(curves.float(), dx=1.0 / (curves.shape[1] - 1), dim=1)
