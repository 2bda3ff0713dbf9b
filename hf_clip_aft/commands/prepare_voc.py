"""Write Pascal VOC 2012's single-object images as a dataset folder for the localisation and segmentation metrics.

The Hub's VOC copies hold an image and a palette mask per row, but no per-image class, which `evaluate` needs (the
class whose prompt each map explains). This keeps the rows whose mask holds exactly one object class, and writes
them as an ``imagefolder`` whose label is that class's VOC index:

    python recipes/prepare_voc.py --output data/voc2012-val-single
    hf-clip-aft evaluate recipes/configs/evaluate-voc.yaml      # with --class_names recipes/configs/voc2012-classes.txt
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import datasets
import numpy as np

from hf_clip_aft.data import read_image
from hf_clip_aft.files import write_text_atomic

VOC_BORDER = 255  # VOC's label for the unannotated pixels around each object


@dataclass
class PrepareVocArguments:
    output: str = field(metadata={"help": "Folder to write (images, masks and metadata.csv); must not exist."})
    dataset: str = field(
        default="shijli/voc2012", metadata={"help": "Hub copy of VOC 2012 with columns id, image, mask (palette)."}
    )
    config: str = field(default="segmentation", metadata={"help": "Configuration of the Hub dataset."})
    split: str = field(default="validation", metadata={"help": "Split to write."})


ARGUMENTS = (PrepareVocArguments,)


def write_single_object_folder(rows: datasets.Dataset, folder: str) -> int:
    """Write the rows of a VOC segmentation dataset (columns ``id``, ``image``, ``mask``) whose mask holds exactly
    one object class, as an imagefolder: the image and mask bytes as they are, and ``metadata.csv`` giving each
    image's class by its VOC index (``label``, the mask's value for it; read with ``--class_names
    recipes/configs/voc2012-classes.txt``) and its mask (``mask_file_name``, read as the ``mask`` column). The
    folder appears complete or not at all (written beside it, then renamed). Returns the number of images kept."""
    if os.path.exists(folder):
        raise FileExistsError(f"{folder!r} already exists; choose another --output or remove it.")
    staging = f"{folder}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # a killed earlier run's leftover
    os.makedirs(staging)
    rows = rows.cast_column("image", datasets.Image(decode=False)).cast_column("mask", datasets.Image(decode=False))
    lines = ["file_name,mask_file_name,label"]
    for row in rows:
        mask = read_image(row["mask"])
        if mask.mode != "P":
            raise ValueError(f"The mask of {row['id']} is mode {mask.mode}; VOC masks are palette PNGs of indices.")
        classes = set(np.unique(np.asarray(mask)).tolist()) - {0, VOC_BORDER}
        if len(classes) != 1:  # the label is the class whose prompt the maps explain: one object class only
            continue
        for suffix, column in ((".jpg", "image"), ("_mask.png", "mask")):
            with open(os.path.join(staging, row["id"] + suffix), "wb") as file:
                file.write(row[column]["bytes"])
        lines.append(f"{row['id']}.jpg,{row['id']}_mask.png,{classes.pop()}")
    write_text_atomic(os.path.join(staging, "metadata.csv"), "\n".join(lines) + "\n")
    os.rename(staging, folder)
    return len(lines) - 1


def main(args: PrepareVocArguments) -> str:
    """Download the split and write the folder; returns its path."""
    rows = datasets.load_dataset(args.dataset, args.config, split=args.split)
    kept = write_single_object_folder(rows, args.output)
    print(f"Wrote {kept} of {len(rows)} images (those with one object class) to {args.output}.")
    return args.output
