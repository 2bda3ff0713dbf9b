"""Evaluation data: a labelled image dataset (optionally with object masks) read in batches of PIL images.

Images stay PIL images here because each model converts them with its own processor
(:func:`hf_clip_aft.data.images_to_pixels`); masks go through the same resize and centre crop
(:func:`masks_to_tensor`), so that they line up with the pixels a model sees.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from ..data import class_names as label_names
from ..data import (
    find_image_column,
    images_to_pixels,
    load_image_dataset,
    open_image,
    prepare_dataset,
    read_image,
)
from .segmentation import IGNORE_INDEX

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


def read_class_names(path: str | os.PathLike) -> list[str]:
    """The class names listed in a UTF-8 text file, one per line: line i + 1 names class index i. Each line is
    stripped of surrounding white space; blank lines at the end are ignored; the names are checked
    (:func:`check_class_names`)."""
    try:
        with open(path, encoding="utf-8-sig") as file:
            text = file.read()
    except OSError as error:
        raise ValueError(
            f"class_names={os.fspath(path)!r} cannot be read ({error.strerror}); give a UTF-8 text file with one "
            "class name per line, e.g. recipes/configs/voc2012-classes.txt."
        ) from error
    except UnicodeDecodeError as error:
        raise ValueError(
            f"class_names={os.fspath(path)!r} is not UTF-8 text ({error.reason} at byte {error.start}); save it as "
            "UTF-8."
        ) from error
    names = [line.strip() for line in text.rstrip().splitlines()]
    return check_class_names(names, f"{os.fspath(path)} (line i + 1 names class i)")


def check_class_names(names: Sequence[str], source: str = "class_names") -> list[str]:
    """`names` as a list, refused (ValueError naming `source`) when empty, or when a name is empty or repeated
    (each class index needs its own prompt)."""
    names = list(names)
    if not names:
        raise ValueError(f"{source} names no class; list at least one class name.")
    first: dict[str, int] = {}
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"Class {index} of {source} is {name!r}; every class index needs a non-empty name.")
        if name in first:
            raise ValueError(
                f"{source} names {name!r} twice (classes {first[name]} and {index}); each class needs its own name."
            )
        first[name] = index
    return names


def _holds_text(feature: Any) -> bool:
    """Whether a column's feature is a plain text value (class names written out, as in a metadata.csv)."""
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _row_name(dataset: datasets.Dataset, image_column: str, row: int) -> str:
    """'row N (its image file)', for messages."""
    return f"row {row}{_source(dataset.with_format('arrow')[row][image_column][0].as_py())}"


def with_class_names(
    dataset: datasets.Dataset, label_column: str, names: Sequence[str], image_column: str
) -> datasets.Dataset:
    """`dataset` with its label column a `ClassLabel` of `names` (label i is ``names[i]``), every row checked.

    Integer labels must lie in ``[0, len(names))``; string labels must be one of `names` (exactly as written) and
    become its index; a `ClassLabel` column must already have exactly these names, in this order (another list
    would silently relabel its classes). A row that breaks the rule, or has no label, is an error naming it.
    """
    names = check_class_names(names)
    feature = dataset.features.get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        if feature.names != names:
            index = next((i for i, pair in enumerate(zip(feature.names, names)) if pair[0] != pair[1]), None)
            where = (
                f"class {index} is {feature.names[index]!r} in the column, {names[index]!r} in class_names"
                if index is not None
                else f"the column has {len(feature.names)} classes, class_names {len(names)}"
            )
            raise ValueError(
                f"label_column={label_column!r} is a ClassLabel whose names differ from class_names ({where}). "
                "Omit class_names to use the column's names, or list exactly those names in their order."
            )
        return dataset
    strings = _holds_text(feature)
    if not (strings or (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")))):
        raise ValueError(
            f"label_column={label_column!r} must hold integer class indices or class names to use class_names; got "
            f"{feature!r} (columns: {list(dataset.features)})."
        )
    positions = {name: index for index, name in enumerate(names)}
    values = dataset.with_format("arrow")[label_column].to_pylist()
    for row, value in enumerate(values):
        if value is None:
            raise ValueError(f"The label of {_row_name(dataset, image_column, row)} is missing; give every row one.")
        if strings and value not in positions:
            raise ValueError(
                f"The label {value!r} of {_row_name(dataset, image_column, row)} is not in class_names ({len(names)} "
                f"names: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); a text label must be one of "
                "them, exactly as written."
            )
        if not strings and not 0 <= value < len(names):
            raise ValueError(
                f"The label {value} of {_row_name(dataset, image_column, row)} is outside [0, {len(names)}): "
                f"class_names has {len(names)} names, so integer labels are 0..{len(names) - 1}. Fix that label, or "
                "the class list if it lacks classes."
            )
    indices = [positions[value] for value in values] if strings else values
    # A new column, not a cast: casting rewrites every row, image bytes included.
    feature = datasets.ClassLabel(names=names)
    return dataset.remove_columns(label_column).add_column(label_column, indices, feature=feature)


def load_evaluation_data(
    name_or_path: str,
    config_name: str | None = None,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    image_column: str | None = None,
    label_column: str = "label",
    mask_column: str | None = None,
    class_names: Sequence[str] | None = None,
) -> EvaluationData:
    """Load a labelled image dataset (Hub id or local imagefolder) and resolve its columns.

    The label column must be a `ClassLabel` or hold the class names as strings (encoded here, the classes present
    in sorted order); with `class_names` (label i is ``class_names[i]``), it may also hold integer class indices,
    and string labels take their index in that list (:func:`with_class_names`). Class masks for segmentation hold
    the same indices. With `limit`, a seeded random subset of `limit` images is kept (so a small run still spans
    the classes). The mask column is `mask_column` if given, else the first Image column named one of
    :data:`MASK_COLUMN_NAMES`, else none (localisation metrics are then skipped).
    """
    dataset = load_image_dataset(name_or_path, config_name, split=split)
    image_column = find_image_column(dataset.features, image_column)
    if class_names is not None:
        dataset = with_class_names(dataset, label_column, class_names, image_column)
    elif _holds_text(dataset.features.get(label_column)):
        # Class names given as text (e.g. an imagefolder metadata.csv): encode them, classes in sorted order.
        dataset = dataset.class_encode_column(label_column)
    features = dataset.features
    names = label_names(features, label_column)
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
    mode: palette indices (Pascal VOC's class masks), 16-bit values and grey levels are kept as they are
    (:func:`hf_clip_aft.data.read_image`)."""
    return read_image(value)


def _source(value: Any) -> str:
    """The file behind a column value, for messages ('' for in-memory images)."""
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, (str, os.PathLike)) else None
    return f" ({path})" if path else ""


def check_mask_size(image: Image.Image, mask: Image.Image, row: str) -> None:
    """Raise ValueError naming `row` unless `mask` has the size of its `image` (both upright).

    A mask of another size cannot be aligned with its image: resizing it would score the map against a stretched
    object.
    """
    if mask.size != image.size:
        raise ValueError(
            f"The mask of {row} is {mask.size[0]}x{mask.size[1]} pixels but its image is {image.size[0]}x"
            f"{image.size[1]} (width x height); a mask must have its image's size. Fix or drop that row."
        )


def iterate_batches(data: EvaluationData, batch_size: int) -> Iterator[Batch]:
    """Batches of decoded RGB images, integer labels and (if the dataset has them) mask images in their own mode
    (:func:`open_mask`), in dataset order. A mask whose size differs from its image's is an error naming the row
    (:func:`check_mask_size`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    for start in range(0, len(data.dataset), batch_size):
        rows = data.dataset[start : start + batch_size]
        images = [open_image(value) for value in rows[data.image_column]]
        masks = None
        if data.mask_column is not None:
            masks = [open_mask(value) for value in rows[data.mask_column]]
            for i, (image, mask) in enumerate(zip(images, masks)):
                check_mask_size(image, mask, f"row {start + i}{_source(rows[data.image_column][i])}")
        yield Batch(images, torch.tensor(rows[data.label_column]), masks)


def _mask_values(mask: Image.Image) -> np.ndarray:
    """The values of one mask ``(H, W)``: its single channel (palette indices for mode P, 16-bit values as they
    are), the shared value of a grey RGB mask, or, for a colour mask, 1 on every pixel that is not black."""
    if mask.mode == "1":
        return np.asarray(mask, dtype=np.uint8)
    if mask.mode in ("L", "P", "RGB") or mask.mode.startswith("I"):
        array = np.asarray(mask)
    else:  # LA, RGBA, CMYK...: the colour values, any alpha band dropped (a mask's transparency is no label)
        array = np.asarray(mask.convert("RGBA"))[..., :3]
    if array.ndim == 3:
        grey = (array == array[..., :1]).all()
        array = array[..., 0] if grey else array.any(axis=-1).astype(np.uint8)
    return array


def localisation_masks(
    masks: Sequence[Image.Image], image_processor, ignore_index: int | None = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``(objects, annotated)``, each ``(B, H, W)``, resized and cropped like the images.

    A pixel of value `ignore_index` (255, Pascal VOC's border label, as in segmentation) is unannotated: it is
    neither object nor background, and the localisation metrics leave it out. Every other non-zero value is object
    (a class index), 0 is background. Binary masks must therefore mark the object with a value other than 255 (1,
    or PIL mode ``1``), or be read with ``ignore_index=None``. A colour mask marks the object by any non-black
    pixel and has no unannotated pixels.
    """
    encoded = []
    for mask in masks:
        values = _mask_values(mask)
        annotated = np.ones(values.shape, bool) if ignore_index is None else values != ignore_index
        objects = (values != 0) & annotated
        # Two channels resized together (bicubic, as the images) and thresholded at one half each.
        planes = np.stack([objects, annotated, np.zeros_like(objects)], axis=-1).astype(np.uint8) * 255
        encoded.append(Image.fromarray(planes))
    pixels = images_to_pixels(encoded, image_processor) > 0.5
    return pixels[:, 0], pixels[:, 1]


def scorable_masks(objects: torch.Tensor, annotated: torch.Tensor) -> tuple[torch.Tensor, dict[str, int]]:
    """``(N,)`` the images a localisation metric can score (an object pixel in the crop; object pixels are
    annotated), and how many of the others were skipped per reason ("no annotated pixel", "no object pixel")."""
    has_pixels = annotated.flatten(1).any(dim=1)
    keep = objects.flatten(1).any(dim=1)  # an object cropped away (or unannotated) leaves nothing to point at
    return keep, {"no annotated pixel": int((~has_pixels).sum()), "no object pixel": int((has_pixels & ~keep).sum())}


def masks_to_tensor(masks: Sequence[Image.Image], image_processor) -> torch.Tensor:
    """Boolean ``(B, H, W)`` object masks (any non-zero value is object), resized and cropped like the images: the
    binary reading of :func:`localisation_masks` (no unannotated value)."""
    return localisation_masks(masks, image_processor, ignore_index=None)[0]
