"""Images -> pixels: dataset loading, RGB conversion, resize + centre crop, and robust batching.

Pixels leave this module in [0, 1] (the processor's resize, centre crop and 1/255 rescale, **without** mean/std
normalisation, which :mod:`hf_clip_aft.modeling` applies inside the model), so that the attack works in image space.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, BaseImageProcessor, CLIPImageProcessorPil, ProcessorMixin

logger = logging.getLogger(__name__)

# The image-processor backend, chosen explicitly: transformers 5 picks torchvision when it is installed, and its
# resize differs slightly from PIL's, so the same checkpoint would give different pixels on different machines.
IMAGE_BACKEND = "pil"
# Each example's position in its dataset (added by `with_example_index`); batches carry it as ``example_index``.
INDEX_COLUMN = "aft_index"


def load_image_processor(name_or_path: str) -> BaseImageProcessor:
    """The checkpoint's image processor on the PIL backend (the same pixels on every machine)."""
    return AutoImageProcessor.from_pretrained(name_or_path, backend=IMAGE_BACKEND)


def load_processor(name_or_path: str) -> ProcessorMixin | BaseImageProcessor:
    """The checkpoint's processor (`AutoProcessor`), its image processor on the PIL backend.

    A checkpoint with no tokenizer gives the bare image processor. (``backend=`` cannot be passed to
    `AutoProcessor` itself: the tokenizer would keep it and write it into its saved config.)
    """
    processor = AutoProcessor.from_pretrained(name_or_path)
    if isinstance(processor, BaseImageProcessor):
        return load_image_processor(name_or_path)
    if getattr(processor, "image_processor", None) is not None:
        processor.image_processor = load_image_processor(name_or_path)
    return processor


def clip_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """CLIP's default image processor (OpenAI mean/std, bicubic resize + centre crop) for `image_size` pixels."""
    size = {"shortest_edge": image_size}
    return CLIPImageProcessorPil(size=size, crop_size={"height": image_size, "width": image_size})


def load_image_dataset(
    name_or_path: str,
    config_name: str | None = None,
    split: str = "train",
    streaming: bool = False,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load a dataset by Hub name (e.g. ``ILSVRC/imagenet-1k``) or from a local folder of images.

    A local directory is read with the ``imagefolder`` builder: one sub-folder per class, the folder name being the
    class name (``label`` column). `streaming` avoids downloading a large Hub dataset before training starts.
    """
    if os.path.isdir(name_or_path):
        return datasets.load_dataset("imagefolder", data_dir=name_or_path, split=split, streaming=streaming)
    return datasets.load_dataset(name_or_path, config_name, split=split, streaming=streaming)


def find_image_column(features: datasets.Features | None, image_column: str | None = None) -> str:
    """The name of the image column: `image_column` if given (checked), else the first column of type `Image`."""
    if features is None:
        raise ValueError("The dataset has no known features; pass `image_column` explicitly.")
    if image_column is not None:
        if image_column not in features:
            raise ValueError(f"image_column={image_column!r} is not a column of the dataset; columns: {list(features)}")
        return image_column
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise ValueError(f"No column of type Image among {list(features)}; pass `image_column` to name it.")


def class_names(features: datasets.Features | None, label_column: str) -> list[str]:
    """Class names of a `ClassLabel` column (what zero-shot prompts and the TeCoA loss need)."""
    feature = None if features is None else features.get(label_column)
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError(
            f"label_column={label_column!r} must be a ClassLabel column with class names; got {feature!r}. "
            "Pass `class_names` explicitly."
        )
    return [name.replace("_", " ") for name in feature.names]


def prepare_dataset(dataset: datasets.Dataset | datasets.IterableDataset, image_column: str):
    """Stop `datasets` from decoding images itself, so that the collator can skip unreadable ones."""
    return dataset.cast_column(image_column, datasets.Image(decode=False))


def with_example_index(dataset: datasets.Dataset | datasets.IterableDataset):
    """The dataset with each example's position in it as a column (:data:`INDEX_COLUMN`), kept as it is when present.

    The collator passes it on as ``example_index``, which seeds the example's own attack randomness
    (:class:`~hf_clip_aft.attack.ExampleRandomness`). For a streaming dataset it is the position in the stream.
    """
    if dataset.features is not None and INDEX_COLUMN in dataset.features:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        features = None
        if dataset.features is not None:
            features = datasets.Features({**dataset.features, INDEX_COLUMN: datasets.Value("int64")})
        return dataset.map(lambda _, index: {INDEX_COLUMN: index}, with_indices=True, features=features)
    return dataset.add_column(INDEX_COLUMN, np.arange(len(dataset), dtype=np.int64))


def open_image(value: Any) -> Image.Image:
    """A PIL RGB image from what an image column holds: a PIL image, a ``{"bytes", "path"}`` dict, or a path."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes") is not None:
        image = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        image = Image.open(value["path"])
    elif isinstance(value, (str, os.PathLike)):
        image = Image.open(value)
    else:
        raise TypeError(f"Cannot read an image from {type(value).__name__}")
    image.load()  # decode now, so that a truncated file fails here and not later
    return image.convert("RGB")


def images_to_pixels(images: Sequence[Image.Image], image_processor) -> torch.Tensor:
    """``(B, 3, H, W)`` float32 pixels in [0, 1]: the processor's resize and centre crop, without normalisation."""
    out = image_processor(images=[im.convert("RGB") for im in images], do_normalize=False, return_tensors="pt")
    return out["pixel_values"].float().clamp_(0, 1)


class AFTDataCollator:
    """Batches examples into ``{"pixel_values", "num_skipped"[, "labels", "example_index"]}``, one row per kept image.

    An image that cannot be decoded is skipped and counted (``num_skipped``), so one corrupt file does not end a
    long run; the trainer logs the running total as ``skipped_images``. Examples with an :data:`INDEX_COLUMN` (see
    :func:`with_example_index`) pass it on as ``example_index``.
    """

    def __init__(self, image_processor, image_column: str = "image", label_column: str | None = None):
        self.image_processor = image_processor
        self.image_column = image_column
        self.label_column = label_column

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images, labels, indices = [], [], []
        for example in examples:
            try:
                images.append(open_image(example[self.image_column]))
            except Exception as err:  # noqa: BLE001 - any decoding failure means "skip this image"
                source = example[self.image_column]
                where = source.get("path") if isinstance(source, dict) else None
                logger.warning("Skipping an unreadable image%s: %s", f" ({where})" if where else "", err)
                continue
            if self.label_column is not None:
                labels.append(int(example[self.label_column]))
            if INDEX_COLUMN in example:
                indices.append(int(example[INDEX_COLUMN]))
        if not images:
            raise RuntimeError(f"Every image of a batch of {len(examples)} failed to decode; check the dataset.")
        # The count rides along as a per-row tensor (its sum is the count) because Accelerate concatenates and
        # slices batches along the first dimension when it dispatches them, which a scalar cannot survive.
        num_skipped = torch.zeros(len(images))
        num_skipped[0] = len(examples) - len(images)
        batch = {"pixel_values": images_to_pixels(images, self.image_processor), "num_skipped": num_skipped}
        if self.label_column is not None:
            batch["labels"] = torch.tensor(labels)
        if indices:
            batch["example_index"] = torch.tensor(indices, dtype=torch.int64)
        return batch
