"""Network dissection of CLIP vision towers: CLIP-Dissect (label-free) and Network Dissection (with concept masks).

Both methods describe each *unit* (neuron) of chosen encoder blocks with a human concept, so that a base and an AFT
encoder can be compared on how well their units align with concepts. One concern per module:

- :mod:`.constants` — the published constants; :mod:`.arguments` — the run's settings;
- :mod:`.activations` — hooks on the vision tower (``mlp`` / ``residual`` units), token summaries, patch maps;
- :mod:`.similarity` — CLIP-Dissect's similarities and the permutation null (pure functions);
- :mod:`.netdissect` — Network Dissection's streaming thresholds, IoU tally and IoU (pure functions);
- :mod:`.concepts` — concept vocabularies; :mod:`.probe` and :mod:`.broden` — probe images and label maps;
- :mod:`.run` — the run loop; :mod:`.results` — the results schema; :mod:`.summary`, :mod:`.figure` — reports.

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
``null_quantile`` quantile of the best similarities of ``null_units`` null units, each a non-constant unit of the
layer drawn uniformly with replacement, its activations shuffled across images, scored with the same P and
similarity function in its original's place in the layer's marginal p(m) (a masked logsumexp: the original's row
left out, the null unit added with logaddexp), so the threshold means the same thing for every similarity
function, vocabulary and probe set. With λ = 1, soft-WPMI cannot exceed log U (U units in the layer: a unit that
holds all of a concept's mass); when the null's quantile reaches that cap, saturated units are ordered by their
log p(m | B_k). This null is ours, not the paper's.

**Network Dissection** (Bau et al., CVPR 2017). Each unit's patch-grid activation map is upsampled (bilinear) to the
concept-mask resolution and thresholded at T_k, the unit's top-``quantile`` activation over all grid cells of all
probe images (computed before upsampling, from a streaming per-unit histogram whose error is below one bin width).
With L_c the pixels of concept c, IoU(k, c) = Σ_x |M_k(x) ∩ L_c(x)| / Σ_x |M_k(x) ∪ L_c(x)| summed over the probe
images annotated in c's category; a unit is a *detector* of its best concept when that IoU exceeds
``iou_threshold``; a unit whose IoU is 0 for every concept gets no concept. Label-map columns of a `datasets`
dataset annotate every image; a Broden folder (:mod:`.broden`) annotates each image in the categories its index
row lists.
"""

from __future__ import annotations

from .activations import encoder_layers, patch_grid, record_units, resolve_layers, summarize_tokens, unit_tokens
from .arguments import DissectionArguments
from .broden import is_broden, load_broden
from .concepts import default_vocabulary, load_concepts
from .constants import (
    CONCEPT_TEMPLATE,
    COS_CUBED_MIN_NORM,
    DEFAULT_VOCABULARY_SIZE,
    METHOD_CLIP_DISSECT,
    METHOD_NETDISSECT,
    MIN_PROB,
    NETDISSECT_IOU_THRESHOLD,
    NETDISSECT_QUANTILE,
    NULL_QUANTILE,
    NULL_UNITS,
    QUANTILE_BINS,
    SOFT_WPMI_LAMBDA,
    SOFT_WPMI_P_END,
    SOFT_WPMI_P_START,
    SOFT_WPMI_TEMPERATURE,
    SOFT_WPMI_TOP_K,
    SUMMARIES,
    UNIT_KINDS,
    WPMI_LAMBDA,
    WPMI_TEMPERATURE,
    WPMI_TOP_K,
)
from .figure import figure_units, top_images_figure
from .netdissect import (
    ConceptTally,
    QuantileSketch,
    dissection_iou,
    dissection_tally,
    quantile_thresholds,
    unit_masks,
)
from .probe import ProbeData, label_maps_to_tensor, mask_label_names, open_label_map
from .results import SCHEMA, SUMMARY_DESCRIPTIONS, load_dissection, validate_dissection
from .run import (
    clip_dissect_layer,
    describe_detectors,
    dissect_models,
    load_probe_data,
    network_dissection_layer,
    run_dissection,
)
from .similarity import (
    SIMILARITY_FUNCTIONS,
    TOP_K_FUNCTIONS,
    LayerMarginal,
    LayerScores,
    NullTest,
    SimilarityFn,
    best_concepts,
    constant_units,
    cos_similarity_cubed,
    image_concept_similarity,
    layer_scores,
    null_test,
    null_threshold,
    rank_weights,
    similarity_matrix,
    soft_wpmi,
    wpmi,
)
from .summary import dissection_summary, summary_table

__all__ = [
    "CONCEPT_TEMPLATE",
    "COS_CUBED_MIN_NORM",
    "ConceptTally",
    "DEFAULT_VOCABULARY_SIZE",
    "DissectionArguments",
    "LayerMarginal",
    "LayerScores",
    "METHOD_CLIP_DISSECT",
    "METHOD_NETDISSECT",
    "MIN_PROB",
    "NETDISSECT_IOU_THRESHOLD",
    "NETDISSECT_QUANTILE",
    "NULL_QUANTILE",
    "NULL_UNITS",
    "NullTest",
    "ProbeData",
    "QUANTILE_BINS",
    "QuantileSketch",
    "SCHEMA",
    "SIMILARITY_FUNCTIONS",
    "SOFT_WPMI_LAMBDA",
    "SOFT_WPMI_P_END",
    "SOFT_WPMI_P_START",
    "SOFT_WPMI_TEMPERATURE",
    "SOFT_WPMI_TOP_K",
    "SUMMARIES",
    "SUMMARY_DESCRIPTIONS",
    "SimilarityFn",
    "TOP_K_FUNCTIONS",
    "UNIT_KINDS",
    "WPMI_LAMBDA",
    "WPMI_TEMPERATURE",
    "WPMI_TOP_K",
    "best_concepts",
    "clip_dissect_layer",
    "constant_units",
    "cos_similarity_cubed",
    "default_vocabulary",
    "describe_detectors",
    "dissect_models",
    "dissection_iou",
    "dissection_summary",
    "dissection_tally",
    "encoder_layers",
    "figure_units",
    "image_concept_similarity",
    "is_broden",
    "label_maps_to_tensor",
    "layer_scores",
    "load_broden",
    "load_concepts",
    "load_dissection",
    "load_probe_data",
    "mask_label_names",
    "network_dissection_layer",
    "null_test",
    "null_threshold",
    "open_label_map",
    "patch_grid",
    "quantile_thresholds",
    "rank_weights",
    "record_units",
    "resolve_layers",
    "run_dissection",
    "similarity_matrix",
    "summary_table",
    "soft_wpmi",
    "summarize_tokens",
    "top_images_figure",
    "unit_masks",
    "unit_tokens",
    "validate_dissection",
    "wpmi",
]
