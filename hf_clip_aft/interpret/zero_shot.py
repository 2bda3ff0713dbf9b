"""Zero-shot classification with a CLIP model: prompt-ensemble class embeddings, predictions, top-1 accuracy.

The class embedding is the prompt ensemble of Radford et al. (2021): the text embedding of every template filled
with the class name, each L2-normalised, averaged, and normalised again. Images are classified by the largest
cosine similarity to the class embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

# The 7-template ensemble OpenAI selected for ImageNet (CLIP's prompt-engineering notebook): a standard, short
# ensemble that scores close to the full 80-template one.
PROMPT_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
SINGLE_TEMPLATE = ("a photo of a {}.",)


@torch.no_grad()
def class_text_embeddings(
    model: nn.Module,
    tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str] = PROMPT_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """L2-normalised prompt-ensemble embeddings ``(C, D)`` (float32, on the model's device) of `class_names`.

    Args:
        model: a `CLIPModel` (its text tower and projection are used).
        tokenizer: the model's tokenizer (``CLIPProcessor.tokenizer``).
        class_names: one name per class, in label order.
        templates: prompt templates, each with one ``{}`` for the class name.
        batch_size: prompts per forward pass.
    """
    if not class_names:
        raise ValueError("class_names is empty; zero-shot classification needs at least one class.")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise ValueError(f"Every template needs exactly one '{{}}' for the class name; got {list(templates)!r}.")
    device = next(model.parameters()).device
    prompts = [template.format(name) for name in class_names for template in templates]
    embeds = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="class prompts", leave=False):
        tokens = tokenizer(prompts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
        tokens = {key: value.to(device) for key, value in tokens.items()}
        embeds.append(F.normalize(model.get_text_features(**tokens).pooler_output.float(), dim=-1))
    per_template = torch.cat(embeds).view(len(class_names), len(templates), -1)
    return F.normalize(per_template.mean(dim=1), dim=-1)


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
