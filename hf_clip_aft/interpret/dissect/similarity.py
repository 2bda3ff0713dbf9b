"""CLIP-Dissect's similarity functions (soft-WPMI, WPMI, cos³) and the permutation null of the labelled-unit test.

Pure functions of the activation matrix A ``(N, U)`` and the image–concept matrix P ``(N, C)``; they run on P's
device. The concept probabilities and log-probabilities are float64: a unit's log p(m | B_k) sums top-k log terms
of a few nats each, and float32's error there (about 1e-4 nats) swaps near-synonym concepts
(``test_float32_log_probabilities_would_change_labels``). Memory: P and its softmax, ``N x C`` floats (4 + 8 bytes
each), and two ``U x C`` float64 terms per layer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .constants import (
    COS_CUBED_MIN_NORM,
    MIN_PROB,
    NULL_QUANTILE,
    NULL_UNITS,
    SOFT_WPMI_LAMBDA,
    SOFT_WPMI_P_END,
    SOFT_WPMI_P_START,
    SOFT_WPMI_TEMPERATURE,
    SOFT_WPMI_TOP_K,
    WPMI_LAMBDA,
    WPMI_TEMPERATURE,
    WPMI_TOP_K,
)

logger = logging.getLogger(__name__)

# Memory bound of the soft-WPMI gather: units per chunk times top-k times concepts stays below this many floats.
_GATHER_ELEMENTS = 1 << 23
# A similarity within this share of the cap log U is saturated: float rounding no longer orders such units.
_CAP_RTOL = 1e-6
SimilarityFn = Callable[..., torch.Tensor]


def constant_units(activations: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Boolean ``(U,)``: units whose activation ``(N, U)`` does not vary over the N images (range at most `rtol`
    times the largest magnitude). Their top-k images are ties, so they carry no concept."""
    spread = activations.amax(dim=0) - activations.amin(dim=0)
    return spread <= rtol * activations.abs().amax(dim=0)


def image_concept_similarity(image_embeds: torch.Tensor, concept_embeds: torch.Tensor) -> torch.Tensor:
    """P ``(N, C)``: cosine similarity of image embeddings ``(N, D)`` and concept text embeddings ``(C, D)``."""
    return F.normalize(image_embeds.float(), dim=-1) @ F.normalize(concept_embeds.float(), dim=-1).T


def rank_weights(top_k: int, p_start: float = SOFT_WPMI_P_START, p_end: float = SOFT_WPMI_P_END) -> torch.Tensor:
    """Soft-WPMI's probability ``(top_k,)`` that the i-th most activating image belongs to the unit's example set:
    ``p_start - (i / top_k)(p_start - p_end)``, linear in the rank i = 0 … top_k - 1."""
    return p_start - torch.arange(top_k, dtype=torch.float64) / top_k * (p_start - p_end)


def _effective_top_k(top_k: int, num_images: int) -> int:
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be at least 1.")
    if top_k > num_images:
        logger.warning("top_k=%d exceeds the %d probe images; using top_k=%d.", top_k, num_images, num_images)
    return min(top_k, num_images)


def log_conditional(
    activations: torch.Tensor, probs: torch.Tensor, top_k: int, weights: torch.Tensor | None
) -> torch.Tensor:
    """``log p(m | B_k)`` ``(U, C)`` (float64) from concept probabilities Q ``(N, C)``; `weights` the inclusion
    probabilities of soft-WPMI (None: WPMI, every top-k image certainly in B_k)."""
    top = torch.topk(activations, k=top_k, dim=0).indices  # (k, U)
    num_units = activations.shape[1]
    chunk = max(1, _GATHER_ELEMENTS // (top_k * probs.shape[1]))
    conditional = []
    for start in tqdm(range(0, num_units, chunk), desc="similarity", leave=False, disable=num_units <= chunk):
        picked = probs[top[:, start : start + chunk]]  # (k, u, C), a copy: changed in place below
        if weights is not None:
            picked.sub_(1).mul_(weights.to(picked).view(-1, 1, 1)).add_(1)
        conditional.append(picked.add_(MIN_PROB).log_().sum(dim=0))
    return torch.cat(conditional)


class LayerMarginal:
    """The layer's ``log p(m) = log mean_k p(m | B_k)`` ``(C,)`` from its conditional term ``(U, C)``, and the same
    with one unit swapped for another (the permutation null), without recomputing the layer's term.

    The swap is a masked logsumexp: the replaced row is left out exactly (never subtracted from the total, which
    cancels catastrophically when that row dominates a concept) and the new unit is added with ``logaddexp``.
    """

    def __init__(self, conditional: torch.Tensor) -> None:
        self.num_units = conditional.shape[0]
        self.conditional = conditional
        self.peak, self.argmax = conditional.max(dim=0)  # (C,)
        scaled = (conditional - self.peak).exp()  # (U, C), the largest term of each concept is 1
        self.total = scaled.sum(dim=0)  # >= 1
        # Σ over every unit but the largest, summed directly: the one case where "total - 1" would cancel.
        self.total_without_peak = scaled.scatter(0, self.argmax.view(1, -1), 0.0).sum(dim=0)

    def log_marginal(self) -> torch.Tensor:
        """``log p(m)`` ``(1, C)`` over the layer's units."""
        return torch.logsumexp(self.conditional, dim=0, keepdim=True) - math.log(self.num_units)

    def log_marginal_swapped(self, replaces: torch.Tensor, conditional: torch.Tensor) -> torch.Tensor:
        """``log p(m)`` ``(V, C)`` with layer unit ``replaces[v]`` swapped for a unit of conditional term
        ``conditional[v]`` ``(V, C)``."""
        own = (self.conditional[replaces] - self.peak).exp()  # (V, C)
        # Without a unit that is not the largest, the largest term (1) stays: total - own >= 1, no cancellation.
        rest = torch.where(replaces.view(-1, 1) == self.argmax, self.total_without_peak, self.total - own)
        others = rest.log() + self.peak  # -inf for a one-unit layer
        return torch.logaddexp(others, conditional) - math.log(self.num_units)


@dataclass
class LayerScores:
    """A layer's similarity ``(U, C)`` (float32), its conditional term ``log p(m | B_k)`` ``(U, C)`` (float64; None
    for cos³) and what scores a swapped-in unit against the same layer (:meth:`swapped`)."""

    similarity: torch.Tensor
    conditional: torch.Tensor | None
    cap: float | None
    _swap: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]

    def swapped(self, activations: torch.Tensor, replaces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Similarity ``(V, C)`` (and conditional term) of units ``(N, V)``, each in place of layer unit
        ``replaces[v]``."""
        return self._swap(activations, replaces)


def _pmi_scores(
    activations: torch.Tensor,
    image_concept: torch.Tensor,
    top_k: int,
    temperature: float,
    lam: float,
    weights: torch.Tensor | None,
) -> LayerScores:
    probs = torch.softmax(temperature * image_concept.double(), dim=1)  # (N, C)
    conditional = log_conditional(activations, probs, top_k, weights)
    marginal = LayerMarginal(conditional)

    def swap(units: torch.Tensor, replaces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        own = log_conditional(units, probs, top_k, weights)
        swapped = own - lam * marginal.log_marginal_swapped(replaces.to(own.device), own)
        return swapped.float(), own

    similarity = (conditional - lam * marginal.log_marginal()).float()
    # With λ = 1, log p(m | B_k) - log mean_k' p(m | B_k') <= log U: a unit that holds a concept's whole mass saturates.
    cap = math.log(conditional.shape[0]) if lam == 1 else None
    return LayerScores(similarity, conditional, cap, swap)


def soft_wpmi_scores(
    activations: torch.Tensor,
    image_concept: torch.Tensor,
    top_k: int = SOFT_WPMI_TOP_K,
    temperature: float = SOFT_WPMI_TEMPERATURE,
    lam: float = SOFT_WPMI_LAMBDA,
    p_start: float = SOFT_WPMI_P_START,
    p_end: float = SOFT_WPMI_P_END,
) -> LayerScores:
    """:func:`soft_wpmi` of a layer with its conditional term and the null's swap (:class:`LayerScores`)."""
    top_k = _effective_top_k(top_k, activations.shape[0])
    weights = rank_weights(top_k, p_start, p_end)
    return _pmi_scores(activations, image_concept, top_k, temperature, lam, weights)


def wpmi_scores(
    activations: torch.Tensor,
    image_concept: torch.Tensor,
    top_k: int = WPMI_TOP_K,
    temperature: float = WPMI_TEMPERATURE,
    lam: float = WPMI_LAMBDA,
) -> LayerScores:
    """:func:`wpmi` of a layer with its conditional term and the null's swap (:class:`LayerScores`)."""
    top_k = _effective_top_k(top_k, activations.shape[0])
    return _pmi_scores(activations, image_concept, top_k, temperature, lam, None)


def _centred_cubed(x: torch.Tensor) -> torch.Tensor:
    x = (x.double() - x.double().mean(dim=0, keepdim=True)) ** 3
    return x / x.norm(dim=0, keepdim=True).clamp_min(COS_CUBED_MIN_NORM)


def cos_cubed_scores(activations: torch.Tensor, image_concept: torch.Tensor) -> LayerScores:
    """:func:`cos_similarity_cubed` of a layer (:class:`LayerScores`; each unit is scored on its own)."""
    concepts = _centred_cubed(image_concept)

    def score(units: torch.Tensor, replaces: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        return (_centred_cubed(units).T @ concepts).float(), None

    return LayerScores(score(activations)[0], None, None, score)


def _similarity(
    scorer: Callable[..., LayerScores],
    activations: torch.Tensor,
    image_concept: torch.Tensor,
    reference: tuple[torch.Tensor, torch.Tensor] | None,
    options: dict,
) -> torch.Tensor:
    layer = activations if reference is None else reference[0]
    scores = scorer(layer, image_concept, **options)
    return scores.similarity if reference is None else scores.swapped(activations, reference[1])[0]


def soft_wpmi(
    activations: torch.Tensor,
    image_concept: torch.Tensor,
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
    **options: float,
) -> torch.Tensor:
    """CLIP-Dissect's soft-WPMI ``(U, C)`` of unit activations ``(N, U)`` and image–concept cosines P ``(N, C)``
    (formula in the package docstring; nats, higher = the concept better describes the unit's top images).
    `options`: :func:`soft_wpmi_scores`'s (``top_k``, ``temperature``, ``lam``, ``p_start``, ``p_end``; default the
    published). `reference`: ``(layer activations (N, U'), replaces (U,))`` to score each unit in place of a layer
    unit (the permutation null); default: `activations` are the layer, as published."""
    return _similarity(soft_wpmi_scores, activations, image_concept, reference, options)


def wpmi(
    activations: torch.Tensor,
    image_concept: torch.Tensor,
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
    **options: float,
) -> torch.Tensor:
    """CLIP-Dissect's hard WPMI ``(U, C)``: soft-WPMI with every top-k image certainly in the example set (nats);
    `options`: :func:`wpmi_scores`'s (``top_k``, ``temperature``, ``lam``)."""
    return _similarity(wpmi_scores, activations, image_concept, reference, options)


def cos_similarity_cubed(
    activations: torch.Tensor,
    image_concept: torch.Tensor,
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """CLIP-Dissect's cos³ ``(U, C)``: cosine over images of the centred, cubed activations ``(N, U)`` and P
    ``(N, C)`` (in [-1, 1]; cubing emphasises the images where both are far from their mean). Each unit is scored
    on its own, so `reference` is not used."""
    return cos_cubed_scores(activations, image_concept).similarity


SIMILARITY_FUNCTIONS: dict[str, SimilarityFn] = {
    "soft_wpmi": soft_wpmi,
    "wpmi": wpmi,
    "cos_cubed": cos_similarity_cubed,
}
# Each similarity's layer scorer (:class:`LayerScores`), what the run and the null use.
LAYER_SCORES: dict[str, Callable[..., LayerScores]] = {
    "soft_wpmi": soft_wpmi_scores,
    "wpmi": wpmi_scores,
    "cos_cubed": cos_cubed_scores,
}
# The similarity functions that rank each unit's top-k images (and so take `top_k`).
TOP_K_FUNCTIONS = ("soft_wpmi", "wpmi")


def _check_similarity(name: str, activations: torch.Tensor, image_concept: torch.Tensor) -> None:
    if name not in SIMILARITY_FUNCTIONS:
        raise ValueError(f"similarity={name!r} is not one of {list(SIMILARITY_FUNCTIONS)}.")
    if activations.shape[0] != image_concept.shape[0]:
        raise ValueError(
            f"activations cover {activations.shape[0]} images but P covers {image_concept.shape[0]}; "
            "compute both on the same probe images."
        )


def layer_scores(
    name: str, activations: torch.Tensor, image_concept: torch.Tensor, top_k: int | None = None
) -> LayerScores:
    """The named similarity of a layer's units ``(N, U)`` against P ``(N, C)``, on P's device
    (:class:`LayerScores`); `top_k` None keeps the published one."""
    _check_similarity(name, activations, image_concept)
    options = {"top_k": top_k} if top_k is not None and name in TOP_K_FUNCTIONS else {}
    return LAYER_SCORES[name](activations.float().to(image_concept.device), image_concept.float(), **options)


def similarity_matrix(
    name: str,
    activations: torch.Tensor,
    image_concept: torch.Tensor,
    top_k: int | None = None,
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The named similarity ``(U, C)`` (see :data:`SIMILARITY_FUNCTIONS`); `top_k` None keeps the published one;
    `reference` ``(layer (N, U'), replaces (U,))`` scores each unit in place of layer unit ``replaces[k]``."""
    _check_similarity(name, activations, image_concept)
    options = {"top_k": top_k} if top_k is not None and name in TOP_K_FUNCTIONS else {}
    if reference is not None:
        options["reference"] = (reference[0].float(), reference[1])
    return SIMILARITY_FUNCTIONS[name](activations.float(), image_concept.float(), **options)


def best_concepts(similarity: torch.Tensor, constant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each unit's best similarity and concept index ``(U,)``; constant units get NaN and -1."""
    values, indices = similarity.max(dim=1)
    return values.masked_fill(constant, math.nan), indices.masked_fill(constant, -1)


@dataclass
class NullTest:
    """The labelled-unit test from a permutation null: a unit is labelled when its best similarity beats
    `threshold`, the null's `quantile` of best similarities. Soft-WPMI (λ = 1) saturates at `cap` = log U; when the
    threshold reaches the cap, the saturated units (the null's and the layer's) are ordered by their conditional
    term log p(m | B_k) at their best concept, and a saturated unit is labelled when it beats `conditional`, the
    same quantile of the null in that order."""

    threshold: float
    cap: float | None = None
    conditional: float | None = None

    def labelled(self, values: torch.Tensor, conditionals: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean ``(U,)`` from best similarities ``(U,)`` (NaN: constant unit, never labelled) and, for a
        saturated threshold, the conditional terms at the best concepts ``(U,)``."""
        above = values.double() > self.threshold  # NaN compares False
        if self.conditional is None or conditionals is None:
            return above
        saturated = values.double() >= self.cap * (1 - _CAP_RTOL)
        return above | (saturated & (conditionals.double().cpu() > self.conditional))


def _saturated_quantile(
    best: torch.Tensor, conditional: torch.Tensor, cap: float, quantile: float
) -> tuple[float, float | None]:
    """The null's `quantile` of best similarities ``(V,)``; when it reaches `cap`, also that quantile in the order
    (similarity, then conditional term), read among the saturated units."""
    threshold = torch.quantile(best, quantile).item()
    saturated = best >= cap * (1 - _CAP_RTOL)
    if threshold < cap * (1 - _CAP_RTOL) or not saturated.any():
        return threshold, None
    position = quantile * (len(best) - 1) - int((~saturated).sum())  # rank among the saturated units
    ordered = conditional[saturated].sort().values
    low = min(max(math.floor(position), 0), len(ordered) - 1)
    high = min(low + 1, len(ordered) - 1)
    fraction = min(max(position - low, 0.0), 1.0)
    return threshold, (ordered[low] + fraction * (ordered[high] - ordered[low])).item()


def null_test(
    scores: LayerScores,
    activations: torch.Tensor,
    num_units: int = NULL_UNITS,
    quantile: float = NULL_QUANTILE,
    generator: torch.Generator | None = None,
) -> NullTest:
    """The labelled-unit test of a layer (:class:`NullTest`) from `num_units` null units, each a non-constant unit
    of `activations` ``(N, U)`` drawn uniformly with replacement, its values shuffled across the images, and scored
    in its original's place in the layer's marginal log p(m) (so that it differs from a real unit only by its
    images). The draws use `generator` on the CPU, so a seed gives the same null on every device."""
    activations = activations.cpu()
    varying = (~constant_units(activations)).nonzero().flatten()
    if len(varying) == 0:
        return NullTest(math.inf)
    chosen = varying[torch.randint(len(varying), (num_units,), generator=generator)]
    order = torch.argsort(torch.rand(activations.shape[0], num_units, generator=generator), dim=0)
    shuffled = activations[:, chosen].gather(0, order)
    device = scores.similarity.device
    similarity, conditional = scores.swapped(shuffled.to(device), chosen.to(device))
    best, index = similarity.double().max(dim=1)
    if scores.cap is None or conditional is None:
        return NullTest(torch.quantile(best, quantile).item())
    at_best = conditional.gather(1, index.view(-1, 1)).flatten()
    threshold, tie_break = _saturated_quantile(best.cpu(), at_best.cpu(), scores.cap, quantile)
    return NullTest(threshold, scores.cap, tie_break)


def null_threshold(
    name: str,
    activations: torch.Tensor,
    image_concept: torch.Tensor,
    top_k: int | None = None,
    num_units: int = NULL_UNITS,
    quantile: float = NULL_QUANTILE,
    generator: torch.Generator | None = None,
) -> float:
    """The null's similarity threshold (:func:`null_test`'s ``threshold``) of a layer ``(N, U)`` against P."""
    scores = layer_scores(name, activations, image_concept, top_k)
    return null_test(scores, activations, num_units, quantile, generator).threshold
