"""Images -> pixels: dataset loading, RGB conversion, resize + centre crop, and robust batching.

Pixels leave this module in [0, 1] (the processor's resize, centre crop and 1/255 rescale, **without** mean/std
normalisation, which :mod:`hf_clip_aft.modeling` applies inside the model), so that the attack works in image space.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image, ImageOps
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
    if os.path.isfile(name_or_path):
        raise ValueError(
            f"dataset_name={name_or_path!r} is a file; it must be a Hub dataset id or a folder of images (one "
            "sub-folder per class). A CSV/JSON list of image paths is read in Python: load_dataset('csv', "
            "data_files=...), .cast_column('<path column>', datasets.Image()), and pass the dataset to AFTTrainer."
        )
    if os.path.isdir(name_or_path):
        if _first_image_file(name_or_path) is None:
            found = sorted({Path(f).suffix or f for _, _, files in os.walk(name_or_path) for f in files})
            raise ValueError(
                f"The folder {name_or_path!r} holds no image files (found: {found or 'nothing'}); it must hold "
                "images (.jpg, .png, ...) in one sub-folder per class. A CSV of image paths is read in Python: "
                "load_dataset('csv', ...) with the path column cast to datasets.Image()."
            )
        return datasets.load_dataset("imagefolder", data_dir=name_or_path, split=split, streaming=streaming)
    if os.path.isabs(name_or_path) or name_or_path.startswith(("~", ".")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(
            f"No dataset folder at {name_or_path!r} (nothing exists at that path), and it is not a Hub dataset id "
            "('namespace/name') either: check the path."
        )
    return datasets.load_dataset(name_or_path, config_name, split=split, streaming=streaming)


def _first_image_file(folder: str) -> str | None:
    """The first file under `folder` with an extension the ``imagefolder`` builder reads, or None."""
    extensions = ImageFolder.EXTENSIONS
    for root, _, files in os.walk(folder):
        for name in files:
            if Path(name).suffix.lower() in extensions:
                return os.path.join(root, name)
    return None


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
    """Class names of a `ClassLabel` column (what zero-shot prompts and the TeCoA loss need), underscores read as
    spaces."""
    feature = None if features is None else features.get(label_column)
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError(
            f"label_column={label_column!r} must be a ClassLabel column with class names; got {feature!r}. "
            "Name the classes of its integer labels: `hf-clip-aft evaluate --class_names FILE` (a UTF-8 text file, "
            "one name per line, line i naming label i), `load_evaluation_data(..., class_names=[...])` or "
            "`AFTTrainer(..., class_names=[...])`."
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


def read_image(value: Any) -> Image.Image:
    """A decoded, upright PIL image in its own mode from what an image column holds: a PIL image, a
    ``{"bytes", "path"}`` dict, or a path. The package's one way to open an image file (:func:`open_image` converts
    the result to RGB; masks keep their mode: palette indices, 16-bit values).

    The EXIF orientation is applied; the file is decoded now, so that a truncated file fails here and not later; an
    image over twice PIL's ``Image.MAX_IMAGE_PIXELS`` (a decompression bomb) raises
    ``PIL.Image.DecompressionBombError`` before it is decoded.
    """
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
    image.load()
    return ImageOps.exif_transpose(image)


def open_image(value: Any) -> Image.Image:
    """A PIL RGB image from what an image column holds (:func:`read_image`, then :func:`to_rgb`)."""
    return to_rgb(read_image(value))


# 16-bit integer modes: PIL's convert("RGB") clips their 0-65535 values to 255 (a white image) instead of scaling.
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as upright 8-bit RGB, what the image processors expect.

    The EXIF orientation is applied (a phone's portrait JPEG is stored sideways); 16-bit integer images (modes
    ``I;16*`` and ``I``, values 0-65535) are scaled to 8 bits (value / 257, rounded); transparency (RGBA, LA, PA, a
    palette or RGB/L image with a transparent colour) is composited over white, as transformers' `convert_to_rgb`
    does; CMYK and the other modes go through PIL's conversion. A 32-bit float image (mode ``F``) has no fixed range
    and is refused (ValueError), so that the collator skips it with that reason.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode == "F":
        raise ValueError("a 32-bit float image (mode F) has no fixed value range; save it as 8- or 16-bit")
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        scaled = np.rint(np.asarray(image, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(scaled)  # mode L
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def describe_example(example: dict[str, Any], image_column: str) -> str:
    """Where an example comes from, for messages: its index (:data:`INDEX_COLUMN`) and file path, when known."""
    source = example.get(image_column)
    parts = [f"index {example[INDEX_COLUMN]}"] if INDEX_COLUMN in example else []
    if isinstance(source, dict) and source.get("path"):
        parts.append(str(source["path"]))
    elif isinstance(source, (str, os.PathLike)):
        parts.append(str(source))
    return ", ".join(parts) or "no index or path"


def check_images_decode(dataset: datasets.Dataset | datasets.IterableDataset, image_column: str, shown: int = 5) -> int:
    """Decode the images of `dataset` (prepared by :func:`prepare_dataset`) in order until one decodes; return its
    position. Cheap for a usable dataset (one image), and the one check that stops a run before any compute.

    Raises:
        ValueError: the dataset is empty, or none of its images decodes; the message names the first `shown`
            examples (index, path) and why each failed.
    """
    failures = []
    for position, example in enumerate(dataset):
        try:
            open_image(example[image_column])
            return position
        except Exception as err:  # noqa: BLE001 - any decoding failure counts as "does not decode"
            if len(failures) < shown:
                failures.append(f"position {position} ({describe_example(example, image_column)}): {err}")
    if not failures:
        raise ValueError("The train dataset is empty: check dataset_name, dataset_config and dataset_split.")
    raise ValueError(
        f"None of the images in column {image_column!r} decodes; the first failures: " + "; ".join(failures) + ". "
        "Check that the column holds image files (or PIL images) in a format PIL reads."
    )


def images_to_pixels(images: Sequence[Image.Image], image_processor) -> torch.Tensor:
    """``(B, 3, H, W)`` float32 pixels in [0, 1]: the processor's resize and centre crop, without normalisation.

    Images in another mode than RGB go through :func:`to_rgb` (16-bit scaled, transparency over white), never PIL's
    plain ``convert("RGB")``, which clips 16-bit values to white.
    """
    out = image_processor(images=[to_rgb(im) for im in images], do_normalize=False, return_tensors="pt")
    return out["pixel_values"].float().clamp_(0, 1)


class AFTDataCollator:
    """Batches examples into ``{"pixel_values", "num_skipped"[, "labels", "example_index"]}``, one row per kept image.

    An image that cannot be decoded is skipped and counted (``num_skipped``), so one corrupt file does not end a
    long run; the trainer logs the running total as ``skipped_images``. A batch whose every image fails holds one
    blank row flagged ``placeholder``, which the trainer turns into a zero-loss step. Examples with an
    :data:`INDEX_COLUMN` (see :func:`with_example_index`) pass it on as ``example_index``.
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
                where = describe_example(example, self.image_column)
                logger.warning("Skipping an unreadable image (%s): %s", where, err)
                continue
            if self.label_column is not None:
                labels.append(int(example[self.label_column]))
            if INDEX_COLUMN in example:
                indices.append(int(example[INDEX_COLUMN]))
        skipped = len(examples) - len(images)
        placeholder = not images
        if placeholder:
            # Every image failed: one blank row, flagged ``placeholder``, keeps the batch's shape, and the trainer
            # makes the step a zero loss (see `AFTTrainer.compute_loss`): a batch of broken files never ends a run.
            images = [Image.new("RGB", (1, 1))]
            labels = [0] if self.label_column is not None else []
            indices = [int(examples[0][INDEX_COLUMN])] if INDEX_COLUMN in examples[0] else []
        # The count rides along as a per-row tensor (its sum is the count) because Accelerate concatenates and
        # slices batches along the first dimension when it dispatches them, which a scalar cannot survive.
        num_skipped = torch.zeros(len(images))
        num_skipped[0] = skipped
        batch = {"pixel_values": images_to_pixels(images, self.image_processor), "num_skipped": num_skipped}
        if placeholder:
            batch["placeholder"] = torch.ones(1)
        if self.label_column is not None:
            batch["labels"] = torch.tensor(labels)
        if indices:
            batch["example_index"] = torch.tensor(indices, dtype=torch.int64)
        return batch
