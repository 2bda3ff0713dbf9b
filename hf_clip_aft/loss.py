"""The outer minimisation of AFT: pure loss functions on embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attack import embedding_distance

LOSS_TYPES = ("fare", "tecoa")
TECOA_LOGIT_SCALE = 100.0  # CLIP's trained temperature, fixed as in the TeCoA objective


def fare_loss(embeds: torch.Tensor, target_embeds: torch.Tensor) -> torch.Tensor:
    """``||f(x + δ*) − e0||²`` summed over the embedding, mean over the batch."""
    return embedding_distance(embeds, target_embeds).mean()


def tecoa_loss(embeds: torch.Tensor, text_embeds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the zero-shot logits ``100 · normalize(f(x + δ*)) · Tᵀ`` against the class labels.

    `text_embeds` ``(C, D)`` are the L2-normalised embeddings of the class prompts. The image embedding is always
    normalised here; the official code normalises it only with ``--output_normalize True`` (its README's command,
    matching ``embedding_normalize: true``), see docs/official_parity.md.
    """
    logits = TECOA_LOGIT_SCALE * F.normalize(embeds, dim=-1) @ text_embeds.t()
    return F.cross_entropy(logits, labels)


def mean_cosine_similarity(embeds: torch.Tensor, target_embeds: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between matching rows (a scalar, for logging)."""
    return F.cosine_similarity(embeds, target_embeds, dim=-1).mean()
