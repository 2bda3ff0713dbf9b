"""Zero-shot classification with a CLIP model: prompt-ensemble class embeddings, predictions, top-1 accuracy.

The class embedding is the prompt ensemble of Radford et al. (2021): the text embedding of every template filled
with the class name, each L2-normalised, averaged, and normalised again. Images are classified by the largest
cosine similarity to the class embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Re-exported: the prompt ensemble is the evaluation's, built where the CLIP classes are known.
from ..modeling import PROMPT_TEMPLATES, class_text_embeddings  # noqa: F401

SINGLE_TEMPLATE = ("a photo of a {}.",)


def zero_shot_predictions(image_embeds: torch.Tensor, class_embeds: torch.Tensor) -> torch.Tensor:
    """Predicted class ``(B,)``: the class embedding ``(C, D)`` most similar to each image embedding ``(B, D)``."""
    return (image_embeds.float() @ class_embeds.float().t()).argmax(dim=-1)


def top1_accuracy(predictions: torch.Tensor, references: torch.Tensor) -> float:
    """Share of predictions equal to the reference label, in [0, 1]; higher is better."""
    if predictions.shape != references.shape or predictions.numel() == 0:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} and references {tuple(references.shape)} must have the same "
            "non-empty shape."
        )
    return (predictions == references).double().mean().item()


@dataclass(frozen=True)
class ZeroShotDataset:
    """A labelled image dataset for zero-shot evaluation: Hub id (or local folder), config, split, label column."""

    name: str
    path: str
    config: str | None = None
    split: str = "test"
    label_column: str = "label"


# Zero-shot transfer suite of the robust-CLIP line of work the paper follows (TeCoA, FARE; CLIP-benchmark style):
# ImageNet-1k plus 14 transfer datasets. Hub ids point at community Parquet copies with a ClassLabel column; they
# are not exercised offline: check each id, split and column on the Hub before a long run.
ZERO_SHOT_PRESETS: dict[str, tuple[ZeroShotDataset, ...]] = {
    "aft-zero-shot-15": (
        ZeroShotDataset("imagenet-1k", "ILSVRC/imagenet-1k", split="validation"),
        ZeroShotDataset("cifar10", "uoft-cs/cifar10"),
        ZeroShotDataset("cifar100", "uoft-cs/cifar100", label_column="fine_label"),
        ZeroShotDataset("stl10", "tanganke/stl10"),
        ZeroShotDataset("caltech101", "flwrlabs/caltech101", split="train"),
        ZeroShotDataset("stanford-cars", "tanganke/stanford_cars"),
        ZeroShotDataset("oxford-flowers", "Donghyun99/Oxford-Flower-102"),
        ZeroShotDataset("fgvc-aircraft", "Donghyun99/FGVC-Aircraft"),
        ZeroShotDataset("oxford-pets", "Donghyun99/Oxford-IIIT-Pet"),
        ZeroShotDataset("dtd", "tanganke/dtd"),
        ZeroShotDataset("eurosat", "tanganke/eurosat"),
        ZeroShotDataset("pcam", "tanganke/pcam"),
        ZeroShotDataset("sun397", "tanganke/sun397"),
        ZeroShotDataset("imagenet-r", "axiong/imagenet-r"),
        ZeroShotDataset("imagenet-sketch", "songweig/imagenet_sketch", split="train"),
    ),
}


def zero_shot_preset(name: str) -> tuple[ZeroShotDataset, ...]:
    """The datasets of a named preset (see :data:`ZERO_SHOT_PRESETS`)."""
    if name not in ZERO_SHOT_PRESETS:
        raise ValueError(f"Unknown zero-shot preset {name!r}; choose one of {sorted(ZERO_SHOT_PRESETS)}.")
    return ZERO_SHOT_PRESETS[name]
