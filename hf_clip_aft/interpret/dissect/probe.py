"""The probe set: its images and, for Network Dissection, its concept label maps, from a `datasets` dataset (label-map
Image columns) or a Broden folder (:mod:`.broden`); and the label maps' geometry."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...data import find_image_column, load_image_dataset, prepare_dataset, read_image

logger = logging.getLogger(__name__)


@dataclass
class ProbeData:
    """The probe images, by position 0 … N-1, and their concept labels by category.

    `image(i)` is what :func:`hf_clip_aft.data.open_image` reads; `labels(i)` maps each category the image is
    annotated in to its label channels, each a label-map image (what :func:`open_label_map` reads) or an int (the
    whole image carries that label); a category missing from it is not annotated in that image. `label_names`
    names each category's label ids (None: ``category=id``); `concept_ids` are the ids that are concepts of each
    category (None: every id but 0).
    """

    name: str
    rows: list[int]
    image: Callable[[int], Any]
    categories: list[str] = field(default_factory=list)
    labels: Callable[[int], dict[str, list[Any]]] = lambda i: {}
    label_names: dict[str, list[str] | None] = field(default_factory=dict)
    concept_ids: dict[str, list[int] | None] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)


def seeded_subset(count: int, limit: int | None, seed: int) -> list[int]:
    """Positions ``0 … count-1``, or a seeded random subset of `limit` of them in increasing order."""
    if limit is None:
        return list(range(count))
    if limit < 1:
        raise ValueError(f"limit={limit} must be a positive number of images (or omitted for all).")
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(count, generator=generator)[:limit].tolist())


def mask_label_names(mask_columns: Sequence[str], mask_labels: str | None) -> dict[str, list[str] | None]:
    """Label names per mask column from the JSON file `mask_labels` (None: names are made from the ids)."""
    names: dict[str, list[str] | None] = {column: None for column in mask_columns}
    if mask_labels:
        with open(mask_labels, encoding="utf-8") as f:
            given = json.load(f)
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(
                f"{mask_labels} names columns {unknown} that are not in mask_columns {list(mask_columns)}."
            )
        names.update(given)
    return names


def load_dataset_probe(
    name: str,
    config: str | None,
    split: str,
    image_column: str | None,
    mask_columns: Sequence[str],
    mask_labels: str | None,
    limit: int | None,
    seed: int,
) -> ProbeData:
    """A probe set from a `datasets` dataset (Hub id or local folder): its image column and, for Network
    Dissection, label-map Image columns, one per category, every image annotated in each."""
    dataset = load_image_dataset(name, config, split=split)
    image_column = find_image_column(dataset.features, image_column)
    missing = [c for c in mask_columns if not isinstance(dataset.features.get(c), datasets.Image)]
    if missing:
        raise ValueError(
            f"mask_columns {missing} are not Image columns of the dataset; columns: {list(dataset.features)}"
        )
    names = mask_label_names(mask_columns, mask_labels)
    rows = seeded_subset(len(dataset), limit, seed)
    dataset = dataset.select(rows)
    for column in [image_column, *mask_columns]:
        dataset = prepare_dataset(dataset, column)
    columns = list(mask_columns)
    return ProbeData(
        name=name,
        rows=rows,
        image=lambda i: dataset[i][image_column],
        categories=columns,
        labels=lambda i: {column: [dataset[i][column]] for column in columns},
        label_names=names,
        concept_ids={
            column: None if names[column] is None else list(range(1, len(names[column]))) for column in columns
        },
    )


def open_label_map(value: Any) -> np.ndarray:
    """Integer label ids ``(H, W)`` of a label-map image (a PIL image, ``{"bytes", "path"}`` dict or path), read by
    :func:`hf_clip_aft.data.read_image`: its pixel values, undecoded by any colour conversion (palette indices for
    'P' images, 16-bit values; for RGB, Broden's R + 256·G)."""
    array = np.asarray(read_image(value)).astype(np.int64)
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


def label_channels(channels: Sequence[Any], image_processor, size: int, where: str) -> torch.Tensor | None:
    """One image's label channels of a category as ``(K, size * size)`` ids: label-map images in the image's
    geometry (:func:`label_maps_to_tensor`), ints as whole-image labels. An unreadable label map is logged and
    left out; None when no channel is left (the image then counts as not annotated in the category)."""
    maps, constants = [], []
    for channel in channels:
        if isinstance(channel, (int, np.integer)):
            constants.append(int(channel))
            continue
        try:
            maps.append(open_label_map(channel))
        except Exception as error:  # noqa: BLE001 - one unreadable label map must not stop the run
            logger.warning("Skipping an unreadable label map of %s: %s", where, error)
    out = [label_maps_to_tensor(maps, image_processor, size).flatten(1)] if maps else []
    out += [torch.full((1, size * size), value, dtype=torch.long) for value in constants]
    return torch.cat(out) if out else None


def describe_row(probe: ProbeData, position: int) -> str:
    """Where probe image `position` comes from, for messages: its dataset row and, when known, its file."""
    value = probe.image(position)
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, (str, os.PathLike)) else None
    return f"row {probe.rows[position]}" + (f" ({path})" if path else "")
