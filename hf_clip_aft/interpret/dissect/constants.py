"""The published constants of CLIP-Dissect and Network Dissection, and ours, in one block (units in comments)."""

from __future__ import annotations

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
# Ours: the labelled-unit threshold of CLIP-Dissect (permutation null, see the package docstring).
NULL_UNITS = 1000
NULL_QUANTILE = 0.95
# Ours: bins per unit of the streaming quantile histogram (memory U x bins x 8 bytes; error below one bin width).
QUANTILE_BINS = 2048

UNIT_KINDS = ("residual", "mlp")
SUMMARIES = ("cls", "mean")
METHOD_CLIP_DISSECT = "clip_dissect"
METHOD_NETDISSECT = "network_dissection"
