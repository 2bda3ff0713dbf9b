"""A probe set from a Broden folder (Bau et al. 2017), read in its on-disk format as NetDissect's loader reads it.

    broden1_224/
        index.csv      image, split, ih, iw, sh, sw, then one column per category (color, object, part, material,
                       scene, texture): ';'-separated entries, each a label PNG under images/ or an integer (the
                       whole image carries that label); an empty cell: the image is not annotated in the category
        category.csv   name, first, last, count, frequency: the categories, in order
        label.csv      number, name, category, frequency, coverage, syns: the global label ids and their names
        c_<name>.csv   code, number, name, frequency, coverage: the labels of one category (number = global id)
        images/        the images (ih x iw) and label PNGs (sh x sw, label id = R + 256·G)

Label ids stay global (label.csv's numbers); each category's concepts are the numbers its c_<name>.csv lists.
"""

from __future__ import annotations

import csv
import os
import re
from typing import Any

from .probe import ProbeData, seeded_subset

INDEX_FILE = "index.csv"
META_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
ALL_SPLITS = "all"


def is_broden(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder in Broden's format (it holds index.csv and category.csv)."""
    return os.path.isfile(os.path.join(path, INDEX_FILE)) and os.path.isfile(os.path.join(path, "category.csv"))


def _read_csv(path: str, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing; a Broden folder holds index.csv, category.csv, label.csv and c_*.csv."
        )
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks the columns {missing}; its columns: {reader.fieldnames}.")
        return list(reader)


def _entries(cell: str) -> list[Any]:
    """A category cell of index.csv: label PNG names and whole-image label ids (ints)."""
    return [int(item) if re.fullmatch(r"\d+", item) else item for item in cell.split(";") if item]


def load_broden(
    directory: str | os.PathLike, split: str = ALL_SPLITS, limit: int | None = None, seed: int = 0
) -> ProbeData:
    """The probe set of a Broden folder: the index rows of `split` (``all``: every row, as NetDissect dissects),
    optionally a seeded subset of `limit`, with every category of category.csv."""
    directory = os.fspath(directory)
    categories = [row["name"] for row in _read_csv(os.path.join(directory, "category.csv"), ("name",))]
    index = _read_csv(os.path.join(directory, INDEX_FILE), (*META_COLUMNS, *categories))
    numbered = _read_csv(os.path.join(directory, "label.csv"), ("number", "name"))
    names = [""] * (max(int(row["number"]) for row in numbered) + 1)
    for row in numbered:
        names[int(row["number"])] = row["name"]
    concept_ids = {
        category: sorted(
            int(row["number"])
            for row in _read_csv(os.path.join(directory, f"c_{category}.csv"), ("code", "number"))
            if int(row["number"]) > 0
        )
        for category in categories
    }
    for category, ids in concept_ids.items():
        unnamed = [i for i in ids if i >= len(names)]
        if unnamed:
            raise ValueError(f"c_{category}.csv lists label numbers {unnamed[:5]} that label.csv does not name.")
    numbered_rows = list(enumerate(index))  # rows are named by their place in index.csv
    if split != ALL_SPLITS:
        numbered_rows = [(n, row) for n, row in numbered_rows if row["split"] == split]
        if not numbered_rows:
            splits = sorted({row["split"] for row in index})
            raise ValueError(
                f"{directory}/{INDEX_FILE} has no rows of split {split!r}; splits: {splits} or {ALL_SPLITS!r}."
            )
    numbered_rows = [numbered_rows[i] for i in seeded_subset(len(numbered_rows), limit, seed)]
    chosen = [row for _, row in numbered_rows]
    images = os.path.join(directory, "images")

    def labels(i: int) -> dict[str, list[Any]]:
        out = {}
        for category in categories:
            entries = _entries(chosen[i][category] or "")
            if entries:
                out[category] = [e if isinstance(e, int) else os.path.join(images, e) for e in entries]
        return out

    return ProbeData(
        name=directory,
        rows=[n for n, _ in numbered_rows],
        image=lambda i: os.path.join(images, chosen[i]["image"]),
        categories=categories,
        labels=labels,
        label_names=dict.fromkeys(categories, names),
        concept_ids=concept_ids,
    )
