"""Evaluation data: a labelled image dataset (optionally with object masks) read in batches of PIL images.

Images stay PIL images here because each model converts them with its own processor
(:func:`hf_clip_aft.data.images_to_pixels`); masks go through the same resize and centre crop
(:func:`masks_to_tensor`), so that they line up with the pixels a model sees.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from PIL import Image, ImageOps

from ..data import class_names, find_image_column, images_to_pixels, load_image_dataset, open_image, prepare_dataset

# Column names taken as the object mask when no mask column is named (ImageNet-Segmentation style datasets).
MASK_COLUMN_NAMES = ("mask", "segmentation", "annotation")


@dataclass
class EvaluationData:
    """A dataset ready for evaluation, with its resolved columns and class names."""

    dataset: datasets.Dataset
    image_column: str
    label_column: str
    mask_column: str | None
    class_names: list[str]


@dataclass
class Batch:
    images: list[Image.Image]
    labels: torch.Tensor
    masks: list[Image.Image] | None


def find_mask_column(features: datasets.Features, image_column: str, mask_column: str | None) -> str | None:
    """The object-mask column: `mask_column` if given (checked), else the first Image column named one of
    :data:`MASK_COLUMN_NAMES`, else None."""
    if mask_column is not None:
        if mask_column not in features:
            raise ValueError(f"mask_column={mask_column!r} is not a column of the dataset; columns: {list(features)}")
        return mask_column
    for name in MASK_COLUMN_NAMES:
        if name != image_column and isinstance(features.get(name), datasets.Image):
            return name
    return None


def load_evaluation_data(
    name_or_path: str,
    config_name: str | None = None,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    image_column: str | None = None,
    label_column: str = "label",
    mask_column: str | None = None,
) -> EvaluationData:
    """Load a labelled image dataset (Hub id or local imagefolder) and resolve its columns.

    The label column must be a `ClassLabel` or hold the class names as strings (encoded here, in sorted order).
    With `limit`, a seeded random subset of `limit` images is kept (so a small run still spans the classes). The
    mask column is `mask_column` if given, else the first Image column named one of :data:`MASK_COLUMN_NAMES`, else
    none (localisation metrics are then skipped).
    """
    dataset = load_image_dataset(name_or_path, config_name, split=split)
    if isinstance(dataset.features.get(label_column), datasets.Value) and dataset.features[label_column].dtype in (
        "string",
        "large_string",
    ):
        # Class names given as text (e.g. an imagefolder metadata.csv): encode them, classes in sorted order.
        dataset = dataset.class_encode_column(label_column)
    features = dataset.features
    image_column = find_image_column(features, image_column)
    names = class_names(features, label_column)
    mask_column = find_mask_column(features, image_column, mask_column)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit={limit} must be a positive number of images (or omitted for all).")
        dataset = dataset.shuffle(seed=seed).select(range(min(limit, len(dataset))))
    dataset = prepare_dataset(dataset, image_column)
    if mask_column is not None:
        dataset = prepare_dataset(dataset, mask_column)
    return EvaluationData(dataset, image_column, label_column, mask_column, names)


def open_mask(value: Any) -> Image.Image:
    """A mask from what a mask column holds (PIL image, ``{"bytes", "path"}`` dict or path), upright, in its own
    mode: palette indices (Pascal VOC's class masks), 16-bit values and grey levels are kept as they are."""
    if isinstance(value, dict):
        value = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value.get("path")
    image = value if isinstance(value, Image.Image) else Image.open(value)
    image.load()  # decode now, so that a truncated file fails here and not later
    return ImageOps.exif_transpose(image)


def iterate_batches(data: EvaluationData, batch_size: int) -> Iterator[Batch]:
    """Batches of decoded RGB images, integer labels and (if the dataset has them) mask images in their own mode
    (:func:`open_mask`), in dataset order."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    for start in range(0, len(data.dataset), batch_size):
        rows = data.dataset[start : start + batch_size]
        images = [open_image(value) for value in rows[data.image_column]]
        masks = None if data.mask_column is None else [open_mask(value) for value in rows[data.mask_column]]
        yield Batch(images, torch.tensor(rows[data.label_column]), masks)


def masks_to_tensor(masks: Sequence[Image.Image], image_processor) -> torch.Tensor:
    """Boolean ``(B, H, W)`` object masks (any non-zero value is object), resized and cropped like the images."""
    binary = [mask.convert("L").point(lambda v: 255 if v > 0 else 0).convert("RGB") for mask in masks]
    return images_to_pixels(binary, image_processor)[:, 0] > 0.5
