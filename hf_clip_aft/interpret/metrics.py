"""Pure metrics on saliency maps: sparsity and localisation against object masks.

Every function takes maps of shape ``(B, H, W)`` (non-negative importance per pixel, any scale: every metric here is
invariant to a positive rescaling of a map) and returns one value per image, shape ``(B,)``, as float32. Masks are
boolean ``(B, H, W)``, True on the object.

Unannotated pixels. The localisation metrics take an optional boolean ``annotated`` ``(B, H, W)`` (False where the
mask says nothing, e.g. Pascal VOC's 255 border label): those pixels are left out, as if the image were only its
annotated pixels. The peak, the mass, the top fraction and the IoU are all taken over the annotated pixels; an
image with no annotated pixel has no score (NaN), and callers skip it (the evaluation counts it in a note).
"""

from __future__ import annotations

import torch


def _check_maps(maps: torch.Tensor, masks: torch.Tensor | None = None, annotated: torch.Tensor | None = None) -> None:
    if maps.dim() != 3:
        raise ValueError(f"Saliency maps must have shape (B, H, W); got {tuple(maps.shape)}. Add a batch dimension.")
    for name, other in (("Masks", masks), ("Annotated-pixel masks", annotated)):
        if other is not None and other.shape != maps.shape:
            raise ValueError(
                f"{name} of shape {tuple(other.shape)} do not match maps of shape {tuple(maps.shape)}; resize the "
                "masks like the images (resize + centre crop) first."
            )


def _annotated(maps: torch.Tensor, annotated: torch.Tensor | None) -> torch.Tensor:
    """``(B, N)`` boolean: the annotated pixels (all of them when `annotated` is None)."""
    if annotated is None:
        return torch.ones(maps.shape[0], maps[0].numel(), dtype=torch.bool, device=maps.device)
    return annotated.flatten(1).bool().to(maps.device)


def _unscored(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`values` with NaN for the images that have no annotated pixel."""
    return torch.where(valid.any(dim=1), values, torch.full_like(values, float("nan")))


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


def top_fraction_mask(maps: torch.Tensor, fraction: float, annotated: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean ``(B, H, W)``: the ``round(fraction · n)`` highest-valued pixels of each map, among its n annotated
    pixels (all H · W when `annotated` is None).

    Ties are broken by a stable sort (first pixel in row-major order first), so the result is deterministic.
    """
    _check_maps(maps, annotated=annotated)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must lie in [0, 1] (a share of the pixels, e.g. 0.2 for 20%).")
    valid = _annotated(maps, annotated)
    flat = maps.detach().flatten(1).float().masked_fill(~valid, float("-inf"))
    counts = (fraction * valid.sum(dim=1, keepdim=True)).round()
    order = flat.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ((ranks < counts) & valid).view_as(maps)


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, annotated: torch.Tensor | None = None) -> torch.Tensor:
    """1.0 where the map's maximum falls on the object mask, else 0.0 (Zhang et al., 2018; no tolerance margin).

    Higher is better (the mean over images is the pointing accuracy). The maximum is taken over the `annotated`
    pixels (NaN when there is none); ties go to the first maximum in row-major order. An image whose mask is empty
    scores 0.
    """
    _check_maps(maps, masks, annotated)
    valid = _annotated(maps, annotated)
    peak = maps.detach().flatten(1).float().masked_fill(~valid, float("-inf")).argmax(dim=1, keepdim=True)
    return _unscored(masks.flatten(1).gather(1, peak).squeeze(1).float(), valid)


def energy_pointing_game(
    maps: torch.Tensor, masks: torch.Tensor, annotated: torch.Tensor | None = None
) -> torch.Tensor:
    """Share of the map's mass that lies on the object mask, in [0, 1] (Wang et al., 2020, Score-CAM).

    Higher is better: 1 means every bit of importance is on the object. Negative values are clipped to 0 first;
    only the mass on `annotated` pixels counts (NaN when there is none); an all-zero map scores 0.
    """
    _check_maps(maps, masks, annotated)
    valid = _annotated(maps, annotated)
    mass = maps.detach().float().clamp(min=0).flatten(1) * valid
    inside = (mass * masks.flatten(1).float()).sum(dim=1)
    total = mass.sum(dim=1)
    share = torch.where(total > 0, inside / total.clamp(min=torch.finfo(mass.dtype).tiny), torch.zeros_like(total))
    return _unscored(share, valid)


def top_fraction_iou(
    maps: torch.Tensor, masks: torch.Tensor, fraction: float = 0.2, annotated: torch.Tensor | None = None
) -> torch.Tensor:
    """Intersection over union between the top `fraction` of pixels of each map and the object mask, in [0, 1].

    Higher is better. `fraction` is a share of the image's (annotated) pixels (0.2 keeps the top 20%); both sets
    are restricted to the `annotated` pixels (NaN when there is none). When the object covers a share of the image
    different from `fraction`, even a perfect map scores below 1; compare models at equal `fraction`.
    """
    _check_maps(maps, masks, annotated)
    valid = _annotated(maps, annotated)
    selected = top_fraction_mask(maps, fraction, annotated).flatten(1)
    target = masks.flatten(1).bool() & valid
    intersection = (selected & target).sum(dim=1).float()
    union = (selected | target).sum(dim=1).float()
    return _unscored(torch.where(union > 0, intersection / union.clamp(min=1), torch.zeros_like(union)), valid)
