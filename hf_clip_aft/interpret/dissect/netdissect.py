"""Network Dissection's math: per-unit activation thresholds in bounded memory, the IoU tally, IoU.

Pure functions and accumulators over batches of unit maps ``(B, U, h, w)``; memory depends on the units, bins and
labels, never on the number of probe images N, so a probe set the size of Broden streams through.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .constants import NETDISSECT_QUANTILE, QUANTILE_BINS


class QuantileSketch:
    """Each unit's activation histogram, streamed batch by batch, from which its upper quantile is read.

    `bins` equal-width bins per unit, sized by the first batch's range; when a later value falls outside, the
    range grows by merging neighbouring bins (the width doubles as often as needed to cover the values seen, the
    edges stay aligned), so the counts stay exact and the memory is ``units x bins`` int64 whatever the number of
    values. A quantile is read by spreading each bin's count evenly over the bin: its error against the exact
    (``torch.quantile``) value is below one bin width, :attr:`width`, at most ``2 x range / (bins - 2)`` for a
    unit whose values span ``range``.
    """

    def __init__(self, num_units: int, bins: int = QUANTILE_BINS, device: torch.device | str | None = None) -> None:
        if bins < 2:
            raise ValueError(f"bins={bins} must be at least 2.")
        self.bins = bins
        self.counts = torch.zeros(num_units, bins, dtype=torch.int64, device=device)
        self.low: torch.Tensor | None = None  # (U,) lower edge of bin 0
        self.width: torch.Tensor | None = None  # (U,) bin width
        self.largest: torch.Tensor | None = None  # (U,) the largest value seen
        self.count = 0  # values per unit so far

    def update(self, maps: torch.Tensor) -> None:
        """Add unit maps ``(B, U, h, w)`` (or values ``(B, U)``)."""
        values = maps.transpose(0, 1).reshape(maps.shape[1], -1).to(self.counts.device, torch.float64)
        if values.shape[1] == 0:
            return
        smallest, largest = values.amin(dim=1), values.amax(dim=1)
        if self.low is None:
            span = largest - smallest
            # A constant first batch still needs a positive width; later batches widen it as they must.
            floor = torch.maximum(largest.abs(), torch.ones_like(largest)) * 1e-12
            self.low, self.largest = smallest, largest
            self.width = torch.maximum(span, floor) / self.bins * (1 + 1e-9)
        self._grow(smallest, largest)
        self.largest = torch.maximum(self.largest, largest)
        index = ((values - self.low.view(-1, 1)) / self.width.view(-1, 1)).floor().long().clamp_(0, self.bins - 1)
        self.counts.scatter_add_(1, index, torch.ones_like(index))
        self.count += values.shape[1]

    def _grow(self, smallest: torch.Tensor, largest: torch.Tensor) -> None:
        """Widen the range of the units whose new values fall outside it (merging 2**s bins into one), just enough
        to cover every value seen (not the old range's empty top)."""
        grow = (smallest < self.low) | (largest >= self.low + self.bins * self.width)
        if not grow.any():
            return
        low, width = self.low[grow], self.width[grow]
        below = ((low - torch.minimum(low, smallest[grow])) / width).ceil()  # old bins added below: an integer
        needed = torch.maximum(self.largest[grow], largest[grow]) - low + below * width  # from the new low edge
        shift = torch.log2(needed / (self.bins * width)).ceil().clamp_min(0)
        shift += (self.bins * width * 2**shift <= needed).double()  # the top edge excludes its value
        factor = (2**shift).long()
        new_index = (torch.arange(self.bins, device=low.device) + below.long().view(-1, 1)) // factor.view(-1, 1)
        new_index.clamp_(max=self.bins - 1)  # only empty bins above the largest value land past the top
        merged = torch.zeros_like(self.counts[grow]).scatter_add_(1, new_index, self.counts[grow])
        self.counts[grow] = merged
        self.low[grow] = low - below * width
        self.width[grow] = width * factor.double()

    def quantile(self, quantile: float) -> torch.Tensor:
        """The value ``(U,)`` below which a share `quantile` of each unit's values lie (``torch.quantile``'s
        linear interpolation between order statistics), to within one bin width."""
        if self.count == 0 or self.low is None:
            raise ValueError("The sketch holds no values; update it with activation maps first.")
        position = (self.count - 1) * quantile
        ranks = torch.tensor([math.floor(position), math.ceil(position)], device=self.counts.device)
        cumulative = self.counts.cumsum(dim=1)  # (U, bins)
        values = []
        for rank in ranks:
            bin_index = torch.searchsorted(cumulative, rank.expand(len(cumulative), 1).contiguous(), right=True)
            before = (cumulative.gather(1, bin_index) - self.counts.gather(1, bin_index)).flatten()
            inside = self.counts.gather(1, bin_index).flatten()
            offset = (rank - before + 0.5) / inside  # evenly spread within the bin
            values.append(self.low + self.width * (bin_index.flatten() + offset))
        return values[0] + (position - math.floor(position)) * (values[1] - values[0])


def quantile_thresholds(
    maps: torch.Tensor, quantile: float = NETDISSECT_QUANTILE, bins: int = QUANTILE_BINS
) -> torch.Tensor:
    """T ``(U,)``: each unit's top-`quantile` activation over every grid cell of every map ``(N, U, h, w)``, read
    from a :class:`QuantileSketch` fed 256 images at a time (error below one bin width of ``torch.quantile`` at
    ``1 - quantile``)."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile={quantile} must lie in (0, 1).")
    sketch = QuantileSketch(maps.shape[1], bins, maps.device)
    for start in range(0, maps.shape[0], 256):
        sketch.update(maps[start : start + 256])
    return sketch.quantile(1 - quantile).float()


def unit_masks(maps: torch.Tensor, thresholds: torch.Tensor, size: int) -> torch.Tensor:
    """``(U, size * size)`` boolean: one image's unit maps ``(U, h, w)`` upsampled bilinearly to ``size x size``
    and thresholded at ``thresholds`` ``(U,)``."""
    upsampled = F.interpolate(maps[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]
    return (upsampled > thresholds.view(-1, 1, 1).to(upsampled)).flatten(1)


class ConceptTally:
    """Network Dissection's counts for one category, added image by image: intersections ``(U, L)``, each unit's
    active pixels ``(U,)`` over the images annotated in the category, and each label's pixels ``(L,)``. Labels
    are ids 0 … L-1 (0: unlabelled, not a concept); L grows with the ids seen. The intersections are scatter-adds
    over the labelled pixels, never a one-hot product."""

    def __init__(self, num_units: int, num_labels: int = 1, device: torch.device | str | None = None) -> None:
        self.intersections = torch.zeros(num_units, num_labels, dtype=torch.float64, device=device)
        self.active = torch.zeros(num_units, dtype=torch.float64, device=device)
        self.labelled = torch.zeros(num_labels, dtype=torch.float64, device=device)

    def _ensure(self, num_labels: int) -> None:
        extra = num_labels - self.labelled.shape[0]
        if extra > 0:
            self.intersections = F.pad(self.intersections, (0, extra))
            self.labelled = F.pad(self.labelled, (0, extra))

    def update(self, masks: torch.Tensor, channels: torch.Tensor) -> None:
        """Add one annotated image: unit masks ``(U, P)`` (boolean over its P pixels) and its label channels
        ``(K, P)`` (a pixel may carry one label per channel; 0 = none)."""
        channels = channels.to(masks.device).long()
        self._ensure(int(channels.max()) + 1)
        num_labels = self.labelled.shape[0]
        self.active += masks.sum(dim=1)
        for labels in channels:
            keep = labels > 0
            if not keep.any():
                continue
            ids = labels[keep]
            self.labelled += torch.bincount(ids, minlength=num_labels)
            unit, pixel = masks[:, keep].nonzero(as_tuple=True)
            flat = self.intersections.view(-1)
            flat.index_add_(0, unit * num_labels + ids[pixel], torch.ones_like(unit, dtype=flat.dtype))

    def iou(self) -> torch.Tensor:
        """IoU ``(U, L)`` of the counts so far (:func:`dissection_iou`)."""
        return dissection_iou(self.intersections, self.active, self.labelled)


def dissection_tally(
    maps: torch.Tensor, thresholds: torch.Tensor, labels: torch.Tensor, num_labels: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Network Dissection's counts over a probe set whose every image is annotated, image by image.

    Args:
        maps: ``(N, U, h, w)`` unit activation maps.
        thresholds: ``(U,)`` from :func:`quantile_thresholds`.
        labels: ``(N, H, W)`` integer concept labels (0 = unlabelled), square (H = W); maps are upsampled
            bilinearly to ``(H, W)``.
        num_labels: label ids run from 0 to num_labels - 1.

    Returns:
        intersections ``(U, L)``, active pixels per unit ``(U,)``, labelled pixels per concept ``(L,)`` (pixels).
    """
    if maps.shape[0] != labels.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps but {labels.shape[0]} label maps; give one label map per image.")
    if labels.shape[1] != labels.shape[2]:
        raise ValueError(f"label maps of {tuple(labels.shape[1:])} pixels are not square; crop them like the images.")
    if int(labels.max()) >= num_labels:
        raise ValueError(f"label id {int(labels.max())} is out of range for num_labels={num_labels}.")
    tally = ConceptTally(maps.shape[1], num_labels, maps.device)
    for image_maps, label_map in zip(maps, labels):
        tally.update(unit_masks(image_maps, thresholds, labels.shape[1]), label_map.flatten()[None])
    return tally.intersections, tally.active, tally.labelled


def dissection_iou(intersections: torch.Tensor, active: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """IoU ``(U, L)`` from :func:`dissection_tally`'s counts (0 where a unit and a concept never occur)."""
    union = active.view(-1, 1) + labelled.view(1, -1) - intersections
    return torch.where(union > 0, intersections / union.clamp_min(1), torch.zeros_like(union)).float()
