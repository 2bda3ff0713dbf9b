"""The settings of a dissection run (the fields of ``hf-clip-aft dissect``), validated before anything loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .broden import is_broden
from .constants import (
    DEFAULT_VOCABULARY_SIZE,
    NETDISSECT_IOU_THRESHOLD,
    NETDISSECT_QUANTILE,
    NULL_QUANTILE,
    NULL_UNITS,
    QUANTILE_BINS,
    SOFT_WPMI_TOP_K,
    SUMMARIES,
    UNIT_KINDS,
    WPMI_TOP_K,
)
from .similarity import SIMILARITY_FUNCTIONS


@dataclass
class DissectionArguments:
    """Settings of a dissection run (the fields of ``recipes/dissect.py``)."""

    models: list[str] = field(
        default_factory=list,
        metadata={"help": "CLIPModel folders or Hub ids, base model first, AFT model last."},
    )
    probe_dataset: str = field(
        default="",
        metadata={"help": "Probe images: Hub dataset id, local imagefolder, or a Broden folder (with index.csv)."},
    )
    probe_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    split: str = field(
        default="train",
        metadata={"help": "Dataset split; for a Broden folder, index.csv's split column or 'all' (NetDissect's)."},
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column; default: the first Image one."})
    limit: int | None = field(
        default=None,
        metadata={"help": "Use a seeded random subset of this many images."},
    )
    output: str = field(
        default="dissect",
        metadata={"help": "Output folder (results.json, summary.md, figure)."},
    )
    layers: list[int] = field(
        default_factory=lambda: [-1],
        metadata={"help": "Encoder blocks to dissect (0-based; -1 = the last)."},
    )
    unit_kind: Literal["mlp", "residual"] = field(
        default="mlp",
        metadata={"help": "Units: 'mlp' (CLIPMLP neurons after the activation) or 'residual' (block output channels)."},
    )
    summary: Literal["cls", "mean"] = field(
        default="cls",
        metadata={"help": "CLIP-Dissect's value per image: the CLS token or the mean patch token."},
    )
    concepts: str | None = field(
        default=None,
        metadata={
            "help": "Concept file (one per line); default: wordfreq's top English words (pip install [dissect])."
        },
    )
    vocabulary_size: int = field(
        default=DEFAULT_VOCABULARY_SIZE,
        metadata={"help": "Words in the default vocabulary (ignored with a file)."},
    )
    dissector: str | None = field(
        default=None,
        metadata={"help": "CLIP that computes P (image-concept similarity); default: the first model."},
    )
    similarity: Literal["soft_wpmi", "wpmi", "cos_cubed"] = field(
        default="soft_wpmi",
        metadata={"help": "CLIP-Dissect similarity function (published default: soft_wpmi)."},
    )
    top_k: int | None = field(
        default=None,
        metadata={
            "help": f"Top images per unit; default the published ({SOFT_WPMI_TOP_K} soft-WPMI, {WPMI_TOP_K} WPMI)."
        },
    )
    null_units: int = field(
        default=NULL_UNITS,
        metadata={"help": "Shuffled units of the labelled-unit null."},
    )
    null_quantile: float = field(
        default=NULL_QUANTILE,
        metadata={"help": "Quantile of the null's best similarities a label must beat."},
    )
    mask_columns: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Network Dissection: label-map Image columns, one per category (pixel = label id, 0 = none)."
        },
    )
    mask_labels: str | None = field(
        default=None,
        metadata={"help": "JSON file {column: [name of label 0, name of label 1, ...]}; default names 'column=id'."},
    )
    mask_size: int = field(
        default=112,
        metadata={"help": "Side of the label maps after the model's crop (pixels; Broden's are 112 for 224 images)."},
    )
    quantile: float = field(
        default=NETDISSECT_QUANTILE,
        metadata={"help": "Network Dissection's top activation share."},
    )
    quantile_bins: int = field(
        default=QUANTILE_BINS,
        metadata={"help": "Histogram bins per unit of the threshold (memory units x bins x 8 bytes; error < 1 bin)."},
    )
    iou_threshold: float = field(
        default=NETDISSECT_IOU_THRESHOLD,
        metadata={"help": "IoU above which a unit detects."},
    )
    batch_size: int = field(default=32, metadata={"help": "Images per forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed of the subset and of the null's shuffles."})
    device: str | None = field(
        default=None,
        metadata={"help": "Torch device; default: accelerate's (GPU if any)."},
    )
    figure_units: int = field(
        default=4,
        metadata={"help": "Units per model in the figure (best labelled units)."},
    )
    figure_images: int = field(
        default=5,
        metadata={"help": "Top images per unit in the figure and results.json."},
    )

    def check(self) -> None:
        """Raise `ValueError` on settings that cannot run, before any model or dataset is loaded."""
        if not self.models:
            raise ValueError("No models given: pass --models BASE [AFT ...] (CLIPModel folders or Hub ids).")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models={self.models} names a model twice; give each model once.")
        if not self.probe_dataset:
            raise ValueError("No probe images: pass --probe_dataset (Hub id or local imagefolder).")
        if not self.layers:
            raise ValueError("No layers given: pass --layers (0-based block indices, -1 = the last).")
        if self.unit_kind not in UNIT_KINDS:
            raise ValueError(f"unit_kind={self.unit_kind!r} is not one of {UNIT_KINDS}.")
        if self.summary not in SUMMARIES:
            raise ValueError(f"summary={self.summary!r} is not one of {SUMMARIES}.")
        if self.similarity not in SIMILARITY_FUNCTIONS:
            raise ValueError(f"similarity={self.similarity!r} is not one of {list(SIMILARITY_FUNCTIONS)}.")
        if not 0 < self.null_quantile < 1 or self.null_units < 1:
            raise ValueError(f"null_quantile={self.null_quantile} must lie in (0, 1), null_units >= 1.")
        if not 0 < self.quantile < 1:
            raise ValueError(f"quantile={self.quantile} must lie in (0, 1) (published: {NETDISSECT_QUANTILE}).")
        if self.quantile_bins < 2 or self.mask_size < 1 or self.batch_size < 1:
            raise ValueError(
                f"quantile_bins={self.quantile_bins} must be >= 2, mask_size={self.mask_size} and "
                f"batch_size={self.batch_size} >= 1."
            )
        if not 0 <= self.iou_threshold < 1:
            raise ValueError(f"iou_threshold={self.iou_threshold} must lie in [0, 1) (published: 0.04).")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be at least 1 (or omitted for the published value).")
        if self.vocabulary_size < 1 or self.figure_units < 0 or self.figure_images < 1:
            raise ValueError(
                f"vocabulary_size={self.vocabulary_size} and figure_images={self.figure_images} must be >= 1, "
                f"figure_units={self.figure_units} >= 0."
            )
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit} must be a positive number of images (or omitted for all).")
        if is_broden(self.probe_dataset) and (self.mask_columns or self.mask_labels):
            raise ValueError(
                f"{self.probe_dataset} is a Broden folder: its categories and label names come from its csv files; "
                "drop mask_columns and mask_labels."
            )
        if self.mask_labels and not self.mask_columns:
            raise ValueError("mask_labels names label maps but mask_columns is empty; pass --mask_columns too.")
