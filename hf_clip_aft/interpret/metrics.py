"""Pure metrics on saliency maps: sparsity and localisation against object masks.

Every function takes maps of shape ``(B, H, W)`` (non-negative importance per pixel, any scale: every metric here is
invariant to a positive rescaling of a map) and returns one value per image, shape ``(B,)``, as float32. Masks are
boolean ``(B, H, W)``, True on the object.
"""

from __future__ import annotations

import torch


def _check_maps(maps: torch.Tensor, masks: torch.Tensor | None = None) -> None:
    if maps.dim() != 3:
        raise ValueError(f"Saliency maps must have shape (B, H, W); got {tuple(maps.shape)}. Add a batch dimension.")
    if masks is not None and masks.shape != maps.shape:
        raise ValueError(
            f"Masks of shape {tuple(masks.shape)} do not match maps of shape {tuple(maps.shape)}; resize the masks "
            "like the images (resize + centre crop) first."
        )


def gini_index(maps: torch.Tensor) -> torch.Tensor:
    """Sparsity of each map: the Gini index of its absolute values (Hurley & Rickard, 2009), in [0, 1).

    Higher means sparser: the importance concentrates on fewer pixels. A uniform map scores 0; a map with all its
    mass on one of n pixels scores 1 − 1/n. An all-zero map scores 0 (it is uniform). With the values sorted in
    ascending order ``v_(1) ≤ … ≤ v_(n)``: ``G = 1 − 2 Σ_k (v_(k) / ||v||₁) · (n − k + ½) / n``.
    """
    _check_maps(maps)
    values = maps.detach().flatten(1).abs().float().sort(dim=1).values
    n = values.shape[1]
    total = values.sum(dim=1, keepdim=True)
    weights = (n - torch.arange(1, n + 1, device=values.device, dtype=values.dtype) + 0.5) / n
    gini = 1 - 2 * (values / total.clamp(min=torch.finfo(values.dtype).tiny) * weights).sum(dim=1)
    return torch.where(total.squeeze(1) > 0, gini, torch.zeros_like(gini))


def top_fraction_mask(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean ``(B, H, W)``: the ``round(fraction · H · W)`` highest-valued pixels of each map.

    Ties are broken by a stable sort (first pixel in row-major order first), so the result is deterministic.
    """
    _check_maps(maps)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must lie in [0, 1] (a share of the pixels, e.g. 0.2 for 20%).")
    flat = maps.detach().flatten(1)
    count = round(fraction * flat.shape[1])
    order = flat.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return (ranks < count).view_as(maps)


def pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """1.0 where the map's maximum falls on the object mask, else 0.0 (Zhang et al., 2018; no tolerance margin).

    Higher is better (the mean over images is the pointing accuracy). Ties go to the first maximum in row-major
    order. An image whose mask is empty scores 0.
    """
    _check_maps(maps, masks)
    peak = maps.detach().flatten(1).argmax(dim=1, keepdim=True)
    return masks.flatten(1).gather(1, peak).squeeze(1).float()


def energy_pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the map's mass that lies on the object mask, in [0, 1] (Wang et al., 2020, Score-CAM).

    Higher is better: 1 means every bit of importance is on the object. Negative values are clipped to 0 first; an
    all-zero map scores 0.
    """
    _check_maps(maps, masks)
    mass = maps.detach().float().clamp(min=0).flatten(1)
    inside = (mass * masks.flatten(1).float()).sum(dim=1)
    total = mass.sum(dim=1)
    return torch.where(total > 0, inside / total.clamp(min=torch.finfo(mass.dtype).tiny), torch.zeros_like(total))


def top_fraction_iou(maps: torch.Tensor, masks: torch.Tensor, fraction: float = 0.2) -> torch.Tensor:
    """Intersection over union between the top `fraction` of pixels of each map and the object mask, in [0, 1].

    Higher is better. `fraction` is a share of the image's pixels (0.2 keeps the top 20%). When the object covers
    a share of the image different from `fraction`, even a perfect map scores below 1; compare models at equal
    `fraction`.
    """
    _check_maps(maps, masks)
    selected = top_fraction_mask(maps, fraction).flatten(1)
    target = masks.flatten(1).bool()
    intersection = (selected & target).sum(dim=1).float()
    union = (selected | target).sum(dim=1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.zeros_like(union))
