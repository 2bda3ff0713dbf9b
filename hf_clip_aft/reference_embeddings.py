"""Precomputed reference embeddings (``precompute_ref_embeddings=True``): e0 = f0(x) of every train image, computed
once before training and carried in the batches as ``ref_embeds``, so that no training step runs the frozen encoder."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import AFTDataCollator, images_to_pixels, open_image

logger = logging.getLogger(__name__)

# The column that ties each train example to its row of the precomputed reference embeddings.
ROW_COLUMN = "aft_row"


def _pixels_or_blank(examples: list[dict[str, Any]], image_processor, image_column: str) -> dict[str, torch.Tensor]:
    """Pixels of every example, a blank image where one cannot be decoded (``readable`` is 0 there), and the rows."""
    images, readable = [], []
    for example in examples:
        try:
            images.append(open_image(example[image_column]))
            readable.append(1)
        except Exception as err:  # noqa: BLE001 - any decoding failure means "drop this image"
            logger.warning("Dropping an unreadable image (row %d): %s", example[ROW_COLUMN], err)
            images.append(Image.new("RGB", (1, 1)))
            readable.append(0)
    return {
        "pixel_values": images_to_pixels(images, image_processor),
        "readable": torch.tensor(readable),
        "row": torch.tensor([example[ROW_COLUMN] for example in examples]),
    }


class ReferenceEmbedsCollator:
    """The AFT collator, plus each example's precomputed e0 (``ref_embeds``), looked up by its ``aft_row``.

    Examples without the row column (an evaluation set) get no ``ref_embeds``, and the trainer runs the reference
    encoder for them as usual.
    """

    def __init__(self, collator: AFTDataCollator, table: torch.Tensor):
        self.collator = collator
        self.table = table  # (rows, D) float32 on the host

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(examples)
        if ROW_COLUMN not in examples[0]:
            return batch
        if len(batch["pixel_values"]) != len(examples):
            raise RuntimeError(
                "An image that decoded when the reference embeddings were precomputed failed to decode now: has the "
                "dataset changed on disk? Rerun, or set precompute_ref_embeddings=False."
            )
        batch["ref_embeds"] = self.table[[example[ROW_COLUMN] for example in examples]]
        return batch


def precompute_reference_embeddings(
    dataset: datasets.Dataset,
    collator: AFTDataCollator,
    image_processor,
    embed: Callable[[torch.Tensor], torch.Tensor],
    accelerator: Accelerator,
    *,
    batch_size: int,
    num_workers: int = 0,
    show_progress: bool = True,
) -> tuple[datasets.Dataset, ReferenceEmbedsCollator, int]:
    """Embed every image of `dataset` once with `embed` (pixels in [0, 1] → e0), for the batches to carry e0.

    Under DDP each rank embeds its share and all ranks gather the whole table (N × D float32 on the host), since
    the sampler deals the images out anew every epoch. Images that cannot be decoded are dropped from the dataset
    here, so that the batches never skip one and the table stays aligned with them.

    Returns the dataset with its row column (unreadable images dropped), `collator` wrapped to add each example's
    ``ref_embeds``, and the number of images dropped.
    """
    dataset = dataset.add_column(ROW_COLUMN, list(range(len(dataset))))
    collate = partial(_pixels_or_blank, image_processor=image_processor, image_column=collator.image_column)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    table = None
    readable = torch.zeros(len(dataset), dtype=torch.bool)
    # Iterating a DataLoader draws from the global generator: fork it, so that the attack draws the same noise
    # with or without the precompute.
    cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        for batch in tqdm(accelerator.prepare(loader), desc="Reference embeddings", disable=not show_progress):
            e0 = embed(batch["pixel_values"])
            # Ranks padded to even batches repeat rows: writing them twice is harmless.
            rows, e0, ok = (t.cpu() for t in accelerator.gather((batch["row"], e0, batch["readable"])))
            if table is None:
                table = torch.zeros(len(dataset), e0.shape[-1])
            table[rows] = e0
            readable[rows] = ok.bool()
    dropped = len(dataset) - int(readable.sum())
    if dropped:
        logger.warning("Dropped %d unreadable images of %d from the train set.", dropped, len(dataset))
        dataset = dataset.select(readable.nonzero().flatten().tolist())
    return dataset, ReferenceEmbedsCollator(collator, table), dropped
