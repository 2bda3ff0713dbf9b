"""Network dissection of CLIP vision towers: CLIP-Dissect (label-free) and Network Dissection (with concept masks).

Both methods describe each *unit* (neuron) of chosen encoder blocks with a human concept, so that a base and an AFT
encoder can be compared on how well their units align with concepts.

Units (``unit_kind``): ``residual`` — the D channels of a block's output (``hidden_states[i + 1]`` of
``output_hidden_states``); ``mlp`` — the intermediate neurons of the block's `CLIPMLP`, after the activation
function (the input of ``fc2``). Tokens are batch-first ``(B, 1 + h·w, U)``: the CLS token, then the patch grid
in row-major order.

**CLIP-Dissect** (Oikarinen & Weng, ICLR 2023). One value per image and unit (``summary``: ``cls``, the CLS token as
in the reference code for ViTs, or ``mean`` over the patch tokens) gives the activation matrix A ``(N, U)`` over N
probe images. A *dissector* CLIP gives the image–concept matrix P ``(N, C)``: cosine similarity of L2-normalised
image embeddings and L2-normalised text embeddings of the bare concept words. The published similarity, soft-WPMI,
for unit k and concept m:

    Q = softmax(a · P) over concepts (temperature a)
    B_k = unit k's top-k images, the i-th most activating (i = 0 … k-1) kept with probability
          p_i = p_start - (i / k)(p_start - p_end)
    log p(m | B_k) = Σ_i log(1 + p_i (Q[i, m] - 1) + min_prob)     (probability that every kept image shows m)
    log p(m)       = log mean_k' p(m | B_k')                          (over the layer's units)
    sim(k, m)      = log p(m | B_k) - λ log p(m)

Also available: hard WPMI (the same without the p_i) and cos³ (centred activations and P, cubed, cosine). The unit's
label is its most similar concept. A unit whose activation is constant over the probe set has no top-k images and
gets no label. The share of *labelled* units counts units whose best similarity beats a permutation null: the
``null_quantile`` quantile of the best similarities of ``null_units`` copies of the layer's units with their
activations shuffled across images (same P, same similarity function, each copy in its original's place in the
layer's marginal p(m)), so the threshold means the same thing for every similarity function, vocabulary and probe
set. This null is ours, not the paper's.

**Network Dissection** (Bau et al., CVPR 2017). Each unit's patch-grid activation map is upsampled (bilinear) to the
concept-mask resolution and thresholded at T_k, the unit's top-``quantile`` activation over all grid cells of all
probe images (computed before upsampling). With L_c the pixels of concept c, IoU(k, c) = Σ_x |M_k(x) ∩ L_c(x)| /
Σ_x |M_k(x) ∪ L_c(x)| summed over the probe set; a unit is a *detector* of its best concept when that IoU exceeds
``iou_threshold``. Every image is annotated for every mask column here, so the union counts every image (Broden's
partially annotated categories restrict it to annotated images; point ``mask_columns`` at a Broden copy converted
to one label-map column per category).

All published constants live in the block below.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import nn
from tqdm.auto import tqdm

from ..data import (
    find_image_column,
    images_to_pixels,
    load_image_dataset,
    open_image,
    prepare_dataset,
)
from ..files import atomic_write, read_json, write_json_atomic, write_text_atomic
from ..modeling import encode_images
from .suite import LoadedModel, load_clip
from .zero_shot import class_text_embeddings

logger = logging.getLogger(__name__)

# --- Published constants -------------------------------------------------------------------------------------------
# CLIP-Dissect, defaults of `similarity.soft_wpmi` in the authors' code (github.com/Trustworthy-ML-Lab/CLIP-dissect),
# which are the paper's: temperature a = 10, top-k = 100, λ = 1, inclusion probability 0.998 -> 0.97 by rank.
SOFT_WPMI_TEMPERATURE = 10.0
SOFT_WPMI_TOP_K = 100
SOFT_WPMI_LAMBDA = 1.0
SOFT_WPMI_P_START = 0.998
SOFT_WPMI_P_END = 0.97
MIN_PROB = 1e-7  # keeps log() finite; the reference code's `min_prob`
# CLIP-Dissect's hard WPMI (`similarity.wpmi`): a = 2, top-k = 28, λ = 0.6.
WPMI_TEMPERATURE = 2.0
WPMI_TOP_K = 28
WPMI_LAMBDA = 0.6
COS_CUBED_MIN_NORM = 1e-3  # `similarity.cos_similarity_cubed`'s floor on column norms
CONCEPT_TEMPLATE = "{}"  # CLIP-Dissect embeds the bare concept word, no prompt template
DEFAULT_VOCABULARY_SIZE = 20_000  # CLIP-Dissect's default concept set is the 20k most common English words
# Network Dissection (Bau et al. 2017): top 0.5% activation quantile per unit, detector when IoU > 0.04.
NETDISSECT_QUANTILE = 0.005
NETDISSECT_IOU_THRESHOLD = 0.04
# Ours: the labelled-unit threshold of CLIP-Dissect (permutation null, see the module docstring).
NULL_UNITS = 1000
NULL_QUANTILE = 0.95
# ---------------------------------------------------------------------------------------------------------------------

SCHEMA = "hf_clip_aft.dissect/v1"
UNIT_KINDS = ("residual", "mlp")
SUMMARIES = ("cls", "mean")
METHOD_CLIP_DISSECT = "clip_dissect"
METHOD_NETDISSECT = "network_dissection"
# Memory bound of the soft-WPMI gather: units per chunk times top-k times concepts stays below this many floats.
_GATHER_ELEMENTS = 1 << 25
SimilarityFn = Callable[..., torch.Tensor]


# --- Pure functions: activations ------------------------------------------------------------------------------------


def summarize_tokens(tokens: torch.Tensor, summary: str) -> torch.Tensor:
    """One value per image and unit ``(B, U)`` from token activations ``(B, 1 + h·w, U)``: the CLS token (``cls``) or
    the mean over the patch tokens (``mean``)."""
    if summary == "cls":
        return tokens[:, 0]
    if summary == "mean":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"summary={summary!r} is not one of {SUMMARIES}.")


def patch_grid(tokens: torch.Tensor) -> torch.Tensor:
    """Spatial activation maps ``(B, U, h, w)`` from token activations ``(B, 1 + h·w, U)`` of a square patch grid."""
    patches = tokens[:, 1:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens do not form a square grid; expected CLS + h·w tokens.")
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def constant_units(activations: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Boolean ``(U,)``: units whose activation ``(N, U)`` does not vary over the N images (range at most `rtol`
    times the largest magnitude). Their top-k images are ties, so they carry no concept."""
    spread = activations.amax(dim=0) - activations.amin(dim=0)
    return spread <= rtol * activations.abs().amax(dim=0)


# --- Pure functions: CLIP-Dissect similarities ----------------------------------------------------------------------


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
        logger.warning(
            "top_k=%d exceeds the %d probe images; using top_k=%d.",
            top_k,
            num_images,
            num_images,
        )
    return min(top_k, num_images)


def _log_conditional(
    activations: torch.Tensor, probs: torch.Tensor, top_k: int, weights: torch.Tensor | None
) -> torch.Tensor:
    """``log p(m | B_k)`` ``(U, C)`` from concept probabilities Q ``(N, C)``; `weights` the inclusion
    probabilities of soft-WPMI (None: WPMI, every top-k image certainly in B_k)."""
    top = torch.topk(activations, k=top_k, dim=0).indices  # (k, U)
    num_units = activations.shape[1]
    chunk = max(1, _GATHER_ELEMENTS // (top_k * probs.shape[1]))
    conditional = []
    for start in tqdm(range(0, num_units, chunk), desc="similarity", leave=False, disable=num_units <= chunk):
        picked = probs[top[:, start : start + chunk]]  # (k, u, C)
        if weights is not None:
            picked = 1 + weights.to(picked).view(-1, 1, 1) * (picked - 1)
        conditional.append(torch.log(picked + MIN_PROB).sum(dim=0))
    return torch.cat(conditional)


def _pointwise_mutual_information(
    activations: torch.Tensor,
    image_concept: torch.Tensor,
    top_k: int,
    temperature: float,
    lam: float,
    weights: torch.Tensor | None,
    reference: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """``log p(m | B_k) - λ log p(m)`` ``(U, C)``. p(m) averages over these units, or with ``reference = (layer
    (N, U'), replaces (U,))`` over the layer's units with unit ``replaces[k]`` swapped for unit k of `activations`."""
    probs = torch.softmax(temperature * image_concept.double(), dim=1)  # (N, C)
    conditional = _log_conditional(activations, probs, top_k, weights)
    if reference is None:
        marginal = torch.logsumexp(conditional, dim=0, keepdim=True) - math.log(conditional.shape[0])
    else:
        layer, replaces = reference
        base = _log_conditional(layer, probs, top_k, weights)  # (U', C)
        total = torch.logsumexp(base, dim=0, keepdim=True)
        # log(Σ_layer - p_replaced + p_k), shifted by the largest term so that exp() stays finite
        shift = torch.maximum(total, conditional)
        swapped = (total - shift).exp() - (base[replaces] - shift).exp() + (conditional - shift).exp()
        marginal = swapped.clamp_min(torch.finfo(torch.float64).tiny).log() + shift - math.log(base.shape[0])
    return (conditional - lam * marginal).float()


def soft_wpmi(
    activations: torch.Tensor,
    image_concept: torch.Tensor,
    top_k: int = SOFT_WPMI_TOP_K,
    temperature: float = SOFT_WPMI_TEMPERATURE,
    lam: float = SOFT_WPMI_LAMBDA,
    p_start: float = SOFT_WPMI_P_START,
    p_end: float = SOFT_WPMI_P_END,
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """CLIP-Dissect's soft-WPMI ``(U, C)`` of unit activations ``(N, U)`` and image–concept cosines P ``(N, C)``
    (formula in the module docstring; nats, higher = the concept better describes the unit's top images).
    `reference`: ``(layer activations (N, U'), replaces (U,))`` to score each unit in place of a layer unit (the
    permutation null); default: `activations` are the layer, as published."""
    top_k = _effective_top_k(top_k, activations.shape[0])
    weights = rank_weights(top_k, p_start, p_end)
    return _pointwise_mutual_information(activations, image_concept, top_k, temperature, lam, weights, reference)


def wpmi(
    activations: torch.Tensor,
    image_concept: torch.Tensor,
    top_k: int = WPMI_TOP_K,
    temperature: float = WPMI_TEMPERATURE,
    lam: float = WPMI_LAMBDA,
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """CLIP-Dissect's hard WPMI ``(U, C)``: soft-WPMI with every top-k image certainly in the example set (nats)."""
    top_k = _effective_top_k(top_k, activations.shape[0])
    return _pointwise_mutual_information(activations, image_concept, top_k, temperature, lam, None, reference)


def cos_similarity_cubed(
    activations: torch.Tensor,
    image_concept: torch.Tensor,
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """CLIP-Dissect's cos³ ``(U, C)``: cosine over images of the centred, cubed activations ``(N, U)`` and P
    ``(N, C)`` (in [-1, 1]; cubing emphasises the images where both are far from their mean). Each unit is scored
    on its own, so `reference` is not used."""

    def centred_cubed(x: torch.Tensor) -> torch.Tensor:
        x = (x.double() - x.double().mean(dim=0, keepdim=True)) ** 3
        return x / x.norm(dim=0, keepdim=True).clamp_min(COS_CUBED_MIN_NORM)

    return (centred_cubed(activations).T @ centred_cubed(image_concept)).float()


SIMILARITY_FUNCTIONS: dict[str, SimilarityFn] = {
    "soft_wpmi": soft_wpmi,
    "wpmi": wpmi,
    "cos_cubed": cos_similarity_cubed,
}
# The similarity functions that rank each unit's top-k images (and so take `top_k`).
TOP_K_FUNCTIONS = ("soft_wpmi", "wpmi")


def similarity_matrix(
    name: str,
    activations: torch.Tensor,
    image_concept: torch.Tensor,
    top_k: int | None = None,
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The named similarity ``(U, C)`` (see :data:`SIMILARITY_FUNCTIONS`); `top_k` None keeps the published one;
    `reference` ``(layer (N, U'), replaces (U,))`` scores each unit in place of layer unit ``replaces[k]``."""
    if name not in SIMILARITY_FUNCTIONS:
        raise ValueError(f"similarity={name!r} is not one of {list(SIMILARITY_FUNCTIONS)}.")
    if activations.shape[0] != image_concept.shape[0]:
        raise ValueError(
            f"activations cover {activations.shape[0]} images but P covers {image_concept.shape[0]}; "
            "compute both on the same probe images."
        )
    options = {"top_k": top_k} if top_k is not None and name in TOP_K_FUNCTIONS else {}
    if reference is not None:
        options["reference"] = (reference[0].float(), reference[1])
    return SIMILARITY_FUNCTIONS[name](activations.float(), image_concept.float(), **options)


def null_threshold(
    name: str,
    activations: torch.Tensor,
    image_concept: torch.Tensor,
    top_k: int | None = None,
    num_units: int = NULL_UNITS,
    quantile: float = NULL_QUANTILE,
    generator: torch.Generator | None = None,
) -> float:
    """The labelled-unit threshold: the `quantile` of the best similarities of `num_units` null units, each a
    randomly chosen non-constant unit of `activations` ``(N, U)`` with its values shuffled across the images, scored
    in its original's place in the layer's marginal log p(m) (so that it differs from a real unit only by its
    images)."""
    varying = (~constant_units(activations)).nonzero().flatten()
    if len(varying) == 0:
        return math.inf
    chosen = varying[torch.randint(len(varying), (num_units,), generator=generator)]
    order = torch.argsort(torch.rand(activations.shape[0], num_units, generator=generator), dim=0)
    shuffled = activations[:, chosen].gather(0, order)
    # Each null unit takes its original's place in the layer: it differs from a real unit only by its images.
    best = similarity_matrix(name, shuffled, image_concept, top_k, reference=(activations, chosen)).amax(dim=1)
    return torch.quantile(best.double(), quantile).item()


def best_concepts(similarity: torch.Tensor, constant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each unit's best similarity and concept index ``(U,)``; constant units get NaN and -1."""
    values, indices = similarity.max(dim=1)
    return values.masked_fill(constant, math.nan), indices.masked_fill(constant, -1)


# --- Pure functions: Network Dissection -----------------------------------------------------------------------------


def quantile_thresholds(maps: torch.Tensor, quantile: float = NETDISSECT_QUANTILE) -> torch.Tensor:
    """T ``(U,)``: each unit's top-`quantile` activation over every grid cell of every map ``(N, U, h, w)``
    (``numpy.percentile``'s linear interpolation at 1 - quantile), without sorting all values."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile={quantile} must lie in (0, 1).")
    values = maps.transpose(0, 1).reshape(maps.shape[1], -1).float()
    n = values.shape[1]
    position = (n - 1) * (1 - quantile)  # ascending position of the threshold
    low, high = math.floor(position), math.ceil(position)
    top = torch.topk(values, k=n - low, dim=1).values  # descending: index j holds ascending position n - 1 - j
    at_low, at_high = top[:, n - 1 - low], top[:, n - 1 - high]
    return at_low + (position - low) * (at_high - at_low)


def dissection_tally(
    maps: torch.Tensor, thresholds: torch.Tensor, labels: torch.Tensor, num_labels: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Network Dissection's counts over a probe set, image by image.

    Args:
        maps: ``(N, U, h, w)`` unit activation maps.
        thresholds: ``(U,)`` from :func:`quantile_thresholds`.
        labels: ``(N, H, W)`` integer concept labels (0 = unlabelled); maps are upsampled bilinearly to ``(H, W)``.
        num_labels: label ids run from 0 to num_labels - 1.

    Returns:
        intersections ``(U, L)``, active pixels per unit ``(U,)``, labelled pixels per concept ``(L,)`` (pixels).
    """
    if maps.shape[0] != labels.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps but {labels.shape[0]} label maps; give one label map per image.")
    num_units = maps.shape[1]
    intersections = torch.zeros(num_units, num_labels, dtype=torch.float64)
    active = torch.zeros(num_units, dtype=torch.float64)
    labelled = torch.zeros(num_labels, dtype=torch.float64)
    size = tuple(labels.shape[1:])
    for image_maps, label_map in zip(tqdm(maps, desc="tally", leave=False), labels):
        upsampled = F.interpolate(image_maps[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        mask = (upsampled > thresholds.view(-1, 1, 1)).flatten(1).float()  # (U, H·W)
        onehot = F.one_hot(label_map.flatten().long(), num_labels).float()  # (H·W, L)
        intersections += (mask @ onehot).double()
        active += mask.sum(dim=1).double()
        labelled += onehot.sum(dim=0).double()
    intersections[:, 0] = 0  # label 0 is "unlabelled", not a concept
    labelled[0] = 0
    return intersections, active, labelled


def dissection_iou(intersections: torch.Tensor, active: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """IoU ``(U, L)`` from :func:`dissection_tally`'s counts (0 where a unit and a concept never occur)."""
    union = active.view(-1, 1) + labelled.view(1, -1) - intersections
    return torch.where(union > 0, intersections / union.clamp_min(1), torch.zeros_like(union)).float()


# --- Concept vocabularies -------------------------------------------------------------------------------------------


def load_concepts(path: str | os.PathLike) -> list[str]:
    """Concepts from a text file, one per line; blank lines and repeats are dropped, the order is kept."""
    with open(path, encoding="utf-8") as f:
        concepts = list(dict.fromkeys(line.strip() for line in f if line.strip()))
    if not concepts:
        raise ValueError(f"{path} holds no concepts; write one concept per line.")
    return concepts


def default_vocabulary(size: int = DEFAULT_VOCABULARY_SIZE) -> list[str]:
    """The `size` most frequent English words of `wordfreq` that are alphabetic and at least 3 letters long.

    Like CLIP-Dissect's 20k list, it holds every part of speech; give a file for a curated vocabulary.
    """
    try:
        from wordfreq import top_n_list
    except ImportError as error:
        raise ImportError(
            "The default concept vocabulary needs wordfreq: pip install 'hf_clip_aft[dissect]', or pass --concepts "
            "with a file of concepts (one per line)."
        ) from error
    # wordfreq's English list holds ~1/4 short or non-alphabetic tokens; 2x headroom covers them.
    words = [w for w in top_n_list("en", 2 * size + 1000) if w.isalpha() and len(w) >= 3]
    if len(words) < size:
        raise ValueError(f"wordfreq offers only {len(words)} English words that qualify; ask for fewer than {size}.")
    return words[:size]


# --- Model side: hooks on the vision tower --------------------------------------------------------------------------


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder blocks of a CLIP vision tower (`CLIPModel`, `CLIPVisionModel[WithProjection]`)."""
    vision = getattr(model, "vision_model", None)
    layers = getattr(getattr(vision, "encoder", None), "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no vision_model.encoder.layers; pass a transformers CLIP model.")
    return layers


def resolve_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Block indices in [0, num_layers), negatives counted from the end, repeats dropped, order kept."""
    resolved = []
    for layer in layers:
        if not -num_layers <= layer < num_layers:
            raise ValueError(
                f"layer {layer} is out of range for a tower with {num_layers} blocks (0 … {num_layers - 1})."
            )
        resolved.append(layer % num_layers)
    return list(dict.fromkeys(resolved))


@contextmanager
def record_units(model: nn.Module, layers: Sequence[int], unit_kind: str) -> Iterator[dict[int, torch.Tensor]]:
    """Hooks that store, for each forward pass, each block's unit activations ``(B, 1 + h·w, U)`` (float32).

    ``residual``: the block's output (transformers 4.x returns it in a tuple, 5.x as a tensor); ``mlp``: the input
    of the block's ``mlp.fc2``, i.e. the MLP neurons after the activation function. The dict is overwritten by each
    forward; the hooks are removed on exit.
    """
    if unit_kind not in UNIT_KINDS:
        raise ValueError(f"unit_kind={unit_kind!r} is not one of {UNIT_KINDS}.")
    blocks = encoder_layers(model)
    store: dict[int, torch.Tensor] = {}
    handles = []

    def keep(layer: int, value: Any) -> None:
        store[layer] = (value[0] if isinstance(value, tuple) else value).detach().float()

    for layer in resolve_layers(layers, len(blocks)):
        if unit_kind == "residual":
            handle = blocks[layer].register_forward_hook(lambda m, args, out, layer=layer: keep(layer, out))
        else:
            handle = blocks[layer].mlp.fc2.register_forward_pre_hook(lambda m, args, layer=layer: keep(layer, args))
        handles.append(handle)
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def unit_tokens(
    model: nn.Module,
    pixels: torch.Tensor,
    image_processor,
    layers: Sequence[int],
    unit_kind: str,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Token activations ``{layer: (B, 1 + h·w, U)}`` of pixels ``(B, 3, H, W)`` in [0, 1], and the normalised
    image embeddings ``(B, D)`` of the same forward pass."""
    with record_units(model, layers, unit_kind) as store:
        embeds = encode_images(model, pixels, image_processor.image_mean, image_processor.image_std)
        return dict(store), embeds


# --- The run: arguments, data, results ------------------------------------------------------------------------------


@dataclass
class DissectionArguments:
    """Settings of a dissection run (the fields of ``recipes/dissect.py``)."""

    models: list[str] = field(
        default_factory=list,
        metadata={"help": "CLIPModel folders or Hub ids, base model first, AFT model last."},
    )
    probe_dataset: str = field(
        default="",
        metadata={"help": "Probe images: Hub dataset id or local imagefolder."},
    )
    probe_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    split: str = field(default="train", metadata={"help": "Dataset split."})
    image_column: str | None = field(default=None, metadata={"help": "Image column; default: the first Image one."})
    limit: int | None = field(
        default=None,
        metadata={"help": "Use a seeded random subset of this many images."},
    )
    output: str = field(
        default="dissect",
        metadata={"help": "Output folder (results.json, summary.md, figure)."},
    )
    layers: list[int] = field(
        default_factory=lambda: [-1],
        metadata={"help": "Encoder blocks to dissect (0-based; -1 = the last)."},
    )
    unit_kind: Literal["mlp", "residual"] = field(
        default="mlp",
        metadata={"help": "Units: 'mlp' (CLIPMLP neurons after the activation) or 'residual' (block output channels)."},
    )
    summary: Literal["cls", "mean"] = field(
        default="cls",
        metadata={"help": "CLIP-Dissect's value per image: the CLS token or the mean patch token."},
    )
    concepts: str | None = field(
        default=None,
        metadata={
            "help": "Concept file (one per line); default: wordfreq's top English words (pip install [dissect])."
        },
    )
    vocabulary_size: int = field(
        default=DEFAULT_VOCABULARY_SIZE,
        metadata={"help": "Words in the default vocabulary (ignored with a file)."},
    )
    dissector: str | None = field(
        default=None,
        metadata={"help": "CLIP that computes P (image-concept similarity); default: the first model."},
    )
    similarity: Literal["soft_wpmi", "wpmi", "cos_cubed"] = field(
        default="soft_wpmi",
        metadata={"help": "CLIP-Dissect similarity function (published default: soft_wpmi)."},
    )
    top_k: int | None = field(
        default=None,
        metadata={
            "help": f"Top images per unit; default the published ({SOFT_WPMI_TOP_K} soft-WPMI, {WPMI_TOP_K} WPMI)."
        },
    )
    null_units: int = field(
        default=NULL_UNITS,
        metadata={"help": "Shuffled units of the labelled-unit null."},
    )
    null_quantile: float = field(
        default=NULL_QUANTILE,
        metadata={"help": "Quantile of the null's best similarities a label must beat."},
    )
    mask_columns: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Network Dissection: label-map Image columns, one per category (pixel = label id, 0 = none)."
        },
    )
    mask_labels: str | None = field(
        default=None,
        metadata={"help": "JSON file {column: [name of label 0, name of label 1, ...]}; default names 'column=id'."},
    )
    mask_size: int = field(
        default=112,
        metadata={"help": "Side of the label maps after the model's crop (pixels)."},
    )
    quantile: float = field(
        default=NETDISSECT_QUANTILE,
        metadata={"help": "Network Dissection's top activation share."},
    )
    iou_threshold: float = field(
        default=NETDISSECT_IOU_THRESHOLD,
        metadata={"help": "IoU above which a unit detects."},
    )
    batch_size: int = field(default=32, metadata={"help": "Images per forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed of the subset and of the null's shuffles."})
    device: str | None = field(
        default=None,
        metadata={"help": "Torch device; default: accelerate's (GPU if any)."},
    )
    figure_units: int = field(
        default=4,
        metadata={"help": "Units per model in the figure (best labelled units)."},
    )
    figure_images: int = field(
        default=5,
        metadata={"help": "Top images per unit in the figure and results.json."},
    )

    def check(self) -> None:
        """Raise `ValueError` on settings that cannot run, before any model or dataset is loaded."""
        if not self.models:
            raise ValueError("No models given: pass --models BASE [AFT ...] (CLIPModel folders or Hub ids).")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models={self.models} names a model twice; give each model once.")
        if not self.probe_dataset:
            raise ValueError("No probe images: pass --probe_dataset (Hub id or local imagefolder).")
        if not self.layers:
            raise ValueError("No layers given: pass --layers (0-based block indices, -1 = the last).")
        if self.unit_kind not in UNIT_KINDS:
            raise ValueError(f"unit_kind={self.unit_kind!r} is not one of {UNIT_KINDS}.")
        if self.summary not in SUMMARIES:
            raise ValueError(f"summary={self.summary!r} is not one of {SUMMARIES}.")
        if self.similarity not in SIMILARITY_FUNCTIONS:
            raise ValueError(f"similarity={self.similarity!r} is not one of {list(SIMILARITY_FUNCTIONS)}.")
        if not 0 < self.null_quantile < 1 or self.null_units < 1:
            raise ValueError(f"null_quantile={self.null_quantile} must lie in (0, 1), null_units >= 1.")
        if not 0 < self.quantile < 1:
            raise ValueError(f"quantile={self.quantile} must lie in (0, 1) (published: {NETDISSECT_QUANTILE}).")
        if self.mask_labels and not self.mask_columns:
            raise ValueError("mask_labels names label maps but mask_columns is empty; pass --mask_columns too.")


@dataclass
class ProbeData:
    """The probe images: the dataset (undecoded), its image and label-map columns, and the dataset rows used."""

    dataset: datasets.Dataset
    image_column: str
    mask_columns: list[str]
    rows: list[int]


def load_probe_data(args: DissectionArguments) -> ProbeData:
    """Load the probe dataset, resolve its columns and draw the seeded subset of ``args.limit`` images."""
    dataset = load_image_dataset(args.probe_dataset, args.probe_config, split=args.split)
    image_column = find_image_column(dataset.features, args.image_column)
    missing = [c for c in args.mask_columns if not isinstance(dataset.features.get(c), datasets.Image)]
    if missing:
        raise ValueError(
            f"mask_columns {missing} are not Image columns of the dataset; columns: {list(dataset.features)}"
        )
    rows = list(range(len(dataset)))
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"limit={args.limit} must be a positive number of images (or omitted for all).")
        generator = torch.Generator().manual_seed(args.seed)
        rows = sorted(torch.randperm(len(dataset), generator=generator)[: args.limit].tolist())
    dataset = dataset.select(rows)
    for column in [image_column, *args.mask_columns]:
        dataset = prepare_dataset(dataset, column)
    return ProbeData(dataset, image_column, list(args.mask_columns), rows)


def open_label_map(value: Any) -> np.ndarray:
    """Integer label ids ``(H, W)`` of a label-map image (a PIL image, ``{"bytes", "path"}`` dict or path): its pixel
    values, undecoded by any colour conversion (palette indices for 'P' images; for RGB, Broden's R + 256·G)."""
    if isinstance(value, dict):
        value = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
    image = value if isinstance(value, Image.Image) else Image.open(value)
    array = np.asarray(image).astype(np.int64)
    return array[..., 0] + 256 * array[..., 1] if array.ndim == 3 else array


def label_maps_to_tensor(label_maps: Sequence[np.ndarray], image_processor, size: int) -> torch.Tensor:
    """``(B, size, size)`` label ids, resized and centre-cropped like the images (nearest neighbour), then resized
    (nearest) to `size`."""
    encoded = [np.stack([m % 256, (m // 256) % 256, np.zeros_like(m)], axis=-1).astype(np.uint8) for m in label_maps]
    out = (
        image_processor(
            images=[Image.fromarray(e) for e in encoded],
            do_rescale=False,
            do_normalize=False,
            resample=Image.Resampling.NEAREST,
            return_tensors="pt",
        )["pixel_values"]
        .round()
        .long()
    )
    labels = out[:, 0] + 256 * out[:, 1]
    return F.interpolate(labels[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()


def mask_label_names(args: DissectionArguments) -> dict[str, list[str] | None]:
    """Label names per mask column from ``args.mask_labels`` (None: names are made from the ids when they occur)."""
    names: dict[str, list[str] | None] = {column: None for column in args.mask_columns}
    if args.mask_labels:
        with open(args.mask_labels, encoding="utf-8") as f:
            given = json.load(f)
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(
                f"{args.mask_labels} names columns {unknown} that are not in mask_columns {args.mask_columns}."
            )
        names.update(given)
    return names


@dataclass
class _Collected:
    """What one pass over the probe set gathers: per model and layer, the image summaries ``(N, U)`` and (with masks)
    the patch-grid maps ``(N, U, h, w)`` (float16, to halve their memory) and per model and mask column the label
    maps ``(N, S, S)``; and the dissector's image embeddings ``(N, D)``."""

    activations: dict[tuple[str, int], list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    maps: dict[tuple[str, int], list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    labels: dict[tuple[str, str], list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    image_embeds: list[torch.Tensor] = field(default_factory=list)


def collect_activations(
    args: DissectionArguments,
    probe: ProbeData,
    models: list[LoadedModel],
    dissector: LoadedModel,
    device,
) -> tuple[_Collected, dict[str, list[int]]]:
    """One pass over the probe images: unit activations of every model, the dissector's embeddings, label maps.
    Returns them and each model's resolved layer indices."""
    layers = {m.name: resolve_layers(args.layers, len(encoder_layers(m.model))) for m in models}
    out = _Collected()
    for start in tqdm(range(0, len(probe.dataset), args.batch_size), desc="dissect: activations"):
        rows = probe.dataset[start : start + args.batch_size]
        images = [open_image(value) for value in rows[probe.image_column]]
        raw_labels = {column: [open_label_map(value) for value in rows[column]] for column in probe.mask_columns}
        for m in models:
            image_processor = m.processor.image_processor
            tokens, embeds = unit_tokens(
                m.model,
                images_to_pixels(images, image_processor).to(device),
                image_processor,
                layers[m.name],
                args.unit_kind,
            )
            if m is dissector:
                out.image_embeds.append(embeds.cpu())
            for layer, value in tokens.items():
                out.activations[m.name, layer].append(summarize_tokens(value, args.summary).cpu())
                if probe.mask_columns:
                    out.maps[m.name, layer].append(patch_grid(value).half().cpu())
            for column, maps in raw_labels.items():
                out.labels[m.name, column].append(label_maps_to_tensor(maps, image_processor, args.mask_size))
        if all(dissector is not m for m in models):
            pixels = images_to_pixels(images, dissector.processor.image_processor).to(device)
            out.image_embeds.append(dissector.embed(pixels).cpu())
    return out, layers


def _number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def clip_dissect_layer(
    activations: torch.Tensor,
    image_concept: torch.Tensor,
    concepts: Sequence[str],
    rows: Sequence[int],
    args: DissectionArguments,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """CLIP-Dissect of one layer's activations ``(N, U)``: its summary numbers and one record per unit."""
    similarity = similarity_matrix(args.similarity, activations, image_concept, args.top_k)
    constant = constant_units(activations)
    values, indices = best_concepts(similarity, constant)
    generator = torch.Generator().manual_seed(args.seed)  # the same null draws for every model and layer
    threshold = null_threshold(
        args.similarity,
        activations,
        image_concept,
        args.top_k,
        args.null_units,
        args.null_quantile,
        generator,
    )
    labelled = values > threshold  # NaN (constant units) compares False
    top_images = torch.topk(activations, k=min(args.figure_images, activations.shape[0]), dim=0).indices.T
    units = [
        {
            "unit": unit,
            "concept": None if constant[unit] else concepts[indices[unit]],
            "similarity": _number(values[unit].item()),
            "labelled": bool(labelled[unit]),
            "top_images": [rows[i] for i in top_images[unit].tolist()],
        }
        for unit in range(activations.shape[1])
    ]
    varying = values[~constant]
    summary = {
        "num_units": activations.shape[1],
        "constant_units": int(constant.sum()),
        "labelled_fraction": labelled.double().mean().item(),
        "unique_concepts": len({u["concept"] for u in units if u["labelled"]}),
        "mean_best_similarity": varying.double().mean().item() if len(varying) else 0.0,
        "threshold": threshold if math.isfinite(threshold) else 0.0,
    }
    return summary, units


def network_dissection_layer(
    maps: torch.Tensor,
    labels: dict[str, torch.Tensor],
    names: dict[str, list[str] | None],
    args: DissectionArguments,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Network Dissection of one layer's maps ``(N, U, h, w)`` against label maps ``{column: (N, S, S)}``."""
    thresholds = quantile_thresholds(maps, args.quantile)
    ious, concept_names, categories = [], [], []
    for column, label_map in labels.items():
        column_names = names[column]
        num_labels = int(label_map.max()) + 1 if column_names is None else len(column_names)
        if int(label_map.max()) >= num_labels:
            raise ValueError(
                f"{column} holds label id {int(label_map.max())} but {args.mask_labels} names {num_labels}."
            )
        ious.append(dissection_iou(*dissection_tally(maps, thresholds, label_map, num_labels)))
        concept_names += column_names or [f"{column}={i}" for i in range(num_labels)]
        categories += [column] * num_labels
    best, index = torch.cat(ious, dim=1).max(dim=1)
    detector = best > args.iou_threshold
    units = [
        {
            "unit": unit,
            "concept": concept_names[index[unit]],
            "category": categories[index[unit]],
            "iou": best[unit].item(),
            "detector": bool(detector[unit]),
        }
        for unit in range(maps.shape[1])
    ]
    per_category = Counter(u["category"] for u in units if u["detector"])
    summary = {
        "num_units": maps.shape[1],
        "detectors": int(detector.sum()),
        "detector_fraction": detector.double().mean().item(),
        "unique_detector_concepts": len({u["concept"] for u in units if u["detector"]}),
        "mean_best_iou": best.double().mean().item(),
        "detectors_per_category": {column: per_category.get(column, 0) for column in labels},
    }
    return summary, units


def run_dissection(args: DissectionArguments) -> dict[str, Any]:
    """Dissect every model's layers on the probe set and write nothing; return the results (schema
    ``hf_clip_aft.dissect/v1``, see :func:`validate_dissection`)."""
    args.check()
    device = torch.device(args.device) if args.device else PartialState().device
    concepts = load_concepts(args.concepts) if args.concepts else default_vocabulary(args.vocabulary_size)
    names = mask_label_names(args)
    probe = load_probe_data(args)
    models = [load_clip(name, device) for name in args.models]
    dissector_name = args.dissector or args.models[0]
    loaded = {m.name: m for m in models}
    dissector = loaded.get(dissector_name) or load_clip(dissector_name, device)
    collected, layers = collect_activations(args, probe, models, dissector, device)
    text = class_text_embeddings(dissector.model, dissector.processor.tokenizer, concepts, (CONCEPT_TEMPLATE,))
    image_concept = image_concept_similarity(torch.cat(collected.image_embeds), text.cpu())

    entries = []
    for m in tqdm(models, desc="dissect: similarities"):
        for layer in layers[m.name]:
            activations = torch.cat(collected.activations[m.name, layer])
            summary, units = clip_dissect_layer(activations, image_concept, concepts, probe.rows, args)
            entries.append(
                {
                    "model": m.name,
                    "layer": layer,
                    "method": METHOD_CLIP_DISSECT,
                    "summary": summary,
                    "units": units,
                }
            )
            if probe.mask_columns:
                maps = torch.cat(collected.maps[m.name, layer]).float()
                labels = {column: torch.cat(collected.labels[m.name, column]) for column in probe.mask_columns}
                summary, units = network_dissection_layer(maps, labels, names, args)
                entries.append(
                    {
                        "model": m.name,
                        "layer": layer,
                        "method": METHOD_NETDISSECT,
                        "summary": summary,
                        "units": units,
                    }
                )
    top_k = args.top_k or {"soft_wpmi": SOFT_WPMI_TOP_K, "wpmi": WPMI_TOP_K}.get(args.similarity)
    settings = {
        **{k: v for k, v in dataclasses.asdict(args).items() if k not in ("models", "probe_dataset", "probe_config")},
        "dissector": dissector_name,
        "top_k": None if top_k is None else min(top_k, len(probe.rows)),
        "concept_source": args.concepts or f"wordfreq top {args.vocabulary_size} English words",
        "num_concepts": len(concepts),
        "concept_template": CONCEPT_TEMPLATE,
        "device": str(device),
        "constants": {
            "soft_wpmi": {
                "temperature": SOFT_WPMI_TEMPERATURE,
                "lambda": SOFT_WPMI_LAMBDA,
                "p_start": SOFT_WPMI_P_START,
                "p_end": SOFT_WPMI_P_END,
                "min_prob": MIN_PROB,
            },
            "wpmi": {
                "temperature": WPMI_TEMPERATURE,
                "lambda": WPMI_LAMBDA,
                "min_prob": MIN_PROB,
            },
        },
    }
    dataset = {
        "name": args.probe_dataset,
        "config": args.probe_config,
        "split": args.split,
        "num_images": len(probe.rows),
    }
    return {
        "schema": SCHEMA,
        "dataset": dataset,
        "models": list(args.models),
        "settings": settings,
        "layers": entries,
    }


# --- Results file, summary, figure ----------------------------------------------------------------------------------

_SUMMARY_KEYS = {
    METHOD_CLIP_DISSECT: (
        "num_units",
        "constant_units",
        "labelled_fraction",
        "unique_concepts",
        "mean_best_similarity",
        "threshold",
    ),
    METHOD_NETDISSECT: (
        "num_units",
        "detectors",
        "detector_fraction",
        "unique_detector_concepts",
        "mean_best_iou",
        "detectors_per_category",
    ),
}
_UNIT_KEYS = {
    METHOD_CLIP_DISSECT: {"unit", "concept", "similarity", "labelled", "top_images"},
    METHOD_NETDISSECT: {"unit", "concept", "category", "iou", "detector"},
}
SUMMARY_DESCRIPTIONS = {
    "labelled_fraction": "share of units whose best concept beats the permutation null",
    "unique_concepts": "distinct concepts among the labelled units",
    "mean_best_similarity": "mean best similarity over non-constant units",
    "threshold": "the null's similarity threshold",
    "constant_units": "units constant over the probe set (no concept)",
    "detectors": "units whose best IoU exceeds the threshold",
    "detector_fraction": "share of units that are detectors",
    "unique_detector_concepts": "distinct concepts among the detectors",
    "mean_best_iou": "mean best IoU over units",
}


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ValueError(f"Invalid {SCHEMA} results at {where}: {message}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_dissection(results: dict[str, Any]) -> None:
    """Raise `ValueError` naming the first field of `results` that breaks schema ``hf_clip_aft.dissect/v1``::

        {"schema": "hf_clip_aft.dissect/v1",
         "dataset": {"name", "config", "split", "num_images"}, "models": [str, ...], "settings": {...},
         "layers": [{"model": str, "layer": int, "method": "clip_dissect" | "network_dissection",
                     "summary": {numbers, see SUMMARY_DESCRIPTIONS}, "units": [one record per unit]}, ...]}

    A CLIP-Dissect unit is ``{"unit", "concept" (null if constant), "similarity" (nats for (soft-)WPMI, null if
    constant), "labelled", "top_images" (dataset rows)}``; a Network Dissection unit ``{"unit", "concept",
    "category" (the mask column), "iou", "detector"}``.
    """
    _require(isinstance(results, dict), "top level", "expected an object")
    expected = {"schema", "dataset", "models", "settings", "layers"}
    _require(
        set(results) == expected,
        "top level",
        f"keys {sorted(results)} != {sorted(expected)}",
    )
    _require(
        results["schema"] == SCHEMA,
        "schema",
        f"{results['schema']!r} is not {SCHEMA!r}",
    )
    dataset = results["dataset"]
    _require(
        isinstance(dataset, dict) and set(dataset) == {"name", "config", "split", "num_images"},
        "dataset",
        "expected {name, config, split, num_images}",
    )
    models = results["models"]
    _require(
        isinstance(models, list) and models and all(isinstance(m, str) for m in models),
        "models",
        "a non-empty list of strings",
    )
    _require(isinstance(results["settings"], dict), "settings", "expected an object")
    _require(isinstance(results["layers"], list), "layers", "expected a list")
    for i, entry in enumerate(results["layers"]):
        where = f"layers[{i}]"
        _require(
            isinstance(entry, dict) and set(entry) == {"model", "layer", "method", "summary", "units"},
            where,
            "expected the keys model, layer, method, summary, units",
        )
        _require(
            entry["model"] in models,
            f"{where}.model",
            f"{entry['model']!r} is not one of models",
        )
        _require(
            isinstance(entry["layer"], int) and entry["layer"] >= 0,
            f"{where}.layer",
            "a block index >= 0",
        )
        _require(
            entry["method"] in _SUMMARY_KEYS,
            f"{where}.method",
            f"unknown method {entry['method']!r}",
        )
        summary = entry["summary"]
        _require(
            isinstance(summary, dict) and set(summary) == set(_SUMMARY_KEYS[entry["method"]]),
            f"{where}.summary",
            f"expected the keys {_SUMMARY_KEYS[entry['method']]}",
        )
        for key, value in summary.items():
            numbers = value.values() if isinstance(value, dict) else [value]
            _require(
                all(_finite(v) for v in numbers),
                f"{where}.summary.{key}",
                f"{value!r} is not a finite number",
            )
        units = entry["units"]
        _require(
            isinstance(units, list) and len(units) == summary["num_units"],
            f"{where}.units",
            f"expected {summary['num_units']} unit records",
        )
        for j, unit in enumerate(units):
            _require(
                isinstance(unit, dict) and set(unit) == _UNIT_KEYS[entry["method"]],
                f"{where}.units[{j}]",
                f"expected the keys {sorted(_UNIT_KEYS[entry['method']])}",
            )
            _require(
                unit["unit"] == j,
                f"{where}.units[{j}].unit",
                "units must be listed in order",
            )


def load_dissection(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a dissection ``results.json`` (or the one inside a folder)."""
    return read_json(path, validate_dissection)


def _label(model: str) -> str:
    return os.path.basename(os.path.normpath(model)) or model


def _format(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.4g}"


def dissection_summary(results: dict[str, Any]) -> str:
    """A markdown report: per method and layer, one row per summary number, one column per model, and last − first
    (Δ) when there are 2+ models; then each model's most frequent labels per layer."""
    validate_dissection(results)
    models, dataset, settings = (
        results["models"],
        results["dataset"],
        results["settings"],
    )
    table: dict[tuple[str, int, str], dict[str, float]] = {}
    frequent: dict[tuple[str, int, str], list[tuple[str, int]]] = {}
    for entry in results["layers"]:
        for key, value in entry["summary"].items():
            if key == "num_units":
                continue
            for name, number in value.items() if isinstance(value, dict) else [(None, value)]:
                label = key if name is None else f"{key} ({name})"
                table.setdefault((entry["method"], entry["layer"], label), {})[entry["model"]] = number
        flag = "labelled" if entry["method"] == METHOD_CLIP_DISSECT else "detector"
        counts = Counter(u["concept"] for u in entry["units"] if u[flag])
        frequent[entry["method"], entry["layer"], entry["model"]] = counts.most_common(5)
    delta = len(models) > 1
    lines = [
        f"# Network dissection on {dataset['name']} ({dataset['split']}), {dataset['num_images']} images",
        "",
        (
            f"Units: `{settings['unit_kind']}`; CLIP-Dissect similarity `{settings['similarity']}` (top-k "
            f"{settings['top_k']}, {settings['summary']} token), dissector `{settings['dissector']}`, "
            f"{settings['num_concepts']} concepts ({settings['concept_source']}). Labelled: best similarity above the "
            f"{settings['null_quantile']} quantile of {settings['null_units']} shuffled units."
        ),
        "",
        "| method | layer | number | " + " | ".join(f"`{_label(m)}`" for m in models) + (" | Δ |" if delta else " |"),
        "|---|---|---|" + "---|" * (len(models) + delta),
    ]
    for (method, layer, label), values in table.items():
        cells = [_format(values[m]) if m in values else "–" for m in models]
        if delta and models[0] in values and models[-1] in values:
            cells.append(f"{values[models[-1]] - values[models[0]]:+.4g}")
        elif delta:
            cells.append("–")
        lines.append(f"| {method} | {layer} | {label} | " + " | ".join(cells) + " |")
    shown = {label.split(" (")[0] for _, _, label in table}
    lines += [
        "",
        "Numbers: " + "; ".join(f"{k}: {v}" for k, v in SUMMARY_DESCRIPTIONS.items() if k in shown) + ".",
        "",
        "## Most frequent labels",
        "",
    ]
    for (method, layer, model), common in frequent.items():
        text = ", ".join(f"{concept} ({count})" for concept, count in common) or "none"
        lines.append(f"- {method}, layer {layer}, `{_label(model)}`: {text}")
    return "\n".join(lines) + "\n"


def top_images_figure(
    results: dict[str, Any],
    probe: ProbeData,
    path: str,
    units: int = 4,
    images: int = 5,
    cell: int = 80,
) -> None:
    """PNG of each model's `units` best CLIP-Dissect units of its last dissected layer (labelled ones first, then by
    similarity): one row per unit, its label and similarity, then its top `images` probe images."""
    rows = []
    position = {row: i for i, row in enumerate(probe.rows)}
    for model in results["models"]:
        entries = [e for e in results["layers"] if e["model"] == model and e["method"] == METHOD_CLIP_DISSECT]
        entry = entries[-1]
        described = [u for u in entry["units"] if u["concept"] is not None]
        for unit in sorted(described, key=lambda u: (not u["labelled"], -u["similarity"]))[:units]:
            title = f"{_label(model)} L{entry['layer']} u{unit['unit']}: {unit['concept']} ({unit['similarity']:.3g})"
            rows.append((title, unit["labelled"], unit["top_images"][:images]))
    font = ImageFont.load_default(size=12)
    line = font.size + 6
    width = max([images * cell] + [int(font.getlength(title)) + 90 for title, _, _ in rows])
    canvas = Image.new("RGB", (width, max(1, len(rows)) * (cell + line)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (title, labelled, rows_shown) in enumerate(rows):
        y = r * (cell + line)
        draw.text(
            (3, y + 2),
            title + ("" if labelled else " [below null]"),
            fill="black",
            font=font,
        )
        for c, row in enumerate(rows_shown):
            image = open_image(probe.dataset[position[row]][probe.image_column])
            canvas.paste(ImageOps.fit(image, (cell, cell)), (c * cell, y + line))
    atomic_write(path, lambda temporary: canvas.save(temporary, format="PNG", optimize=True))


def dissect_models(args: DissectionArguments) -> dict[str, Any]:
    """Run the dissection and write ``results.json`` (validated), ``summary.md`` and ``top_images.png`` into
    ``args.output``, each atomically; return the results."""
    results = run_dissection(args)
    validate_dissection(results)
    os.makedirs(args.output, exist_ok=True)
    write_json_atomic(os.path.join(args.output, "results.json"), results)
    write_text_atomic(os.path.join(args.output, "summary.md"), dissection_summary(results))
    top_images_figure(
        results,
        load_probe_data(args),
        os.path.join(args.output, "top_images.png"),
        args.figure_units,
        args.figure_images,
    )
    logger.info("Wrote the dissection to %s", args.output)
    return results
