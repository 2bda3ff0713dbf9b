"""Broden probe sets: a small folder written in Broden's exact on-disk format (index.csv, category.csv, label.csv,
c_*.csv, images/ with label PNGs coding the label as R + 256·G), read by the loader, tallied against a planted
unit, and dissected end to end through ``hf-clip-aft dissect``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPProcessor

from hf_clip_aft import cli
from hf_clip_aft.data import open_image
from hf_clip_aft.interpret import dissect as d

TINY = str(Path(__file__).resolve().parents[1] / "hf_clip_aft" / "assets" / "tiny-clip")
CATEGORIES = ("color", "object", "part", "material", "scene", "texture")
# Global label numbers (label.csv) by category; 300 needs the PNG's green channel (300 = 44 + 256 x 1).
LABELS = {
    "color": {1: "black", 2: "red"},
    "object": {3: "sky", 300: "flower"},
    "part": {5: "leg"},
    "material": {6: "wood"},
    "scene": {7: "kitchen"},
    "texture": {8: "striped"},
}
IMAGES, SIDE, SEG = 6, 64, 32  # images of 64 x 64 pixels, label maps of 32 x 32


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _label_png(path: Path, labels: np.ndarray) -> None:
    """A Broden label PNG: label = R + 256·G."""
    rgb = np.stack([labels % 256, labels // 256, np.zeros_like(labels)], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def red_squares() -> list[tuple[int, int]]:
    """Each image's red square: top-left cell (row, column) of the 4 x 4 patch grid."""
    generator = torch.Generator().manual_seed(0)
    return [tuple(torch.randint(0, 4, (2,), generator=generator).tolist()) for _ in range(IMAGES)]


def write_broden(root: Path) -> Path:
    """A six-image Broden folder: dark noise images with one red 16 x 16 square each; color labels it red (the rest
    black), object labels it flower (id 300) and the top rows sky, in two PNG channels; scene is a whole-image id;
    part annotates image 0 only, texture the even images, material none."""
    images = root / "images"
    images.mkdir(parents=True)
    generator = np.random.default_rng(0)
    index = []
    for i, (row, col) in enumerate(red_squares()):
        pixels = (generator.random((SIDE, SIDE, 3)) * 80).astype(np.uint8)
        pixels[row * 16 : row * 16 + 16, col * 16 : col * 16 + 16] = (255, 0, 0)
        Image.fromarray(pixels).save(images / f"img{i}.jpg", quality=95)
        square = np.zeros((SEG, SEG), dtype=np.int64)
        square[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] = 1
        _label_png(images / f"img{i}_color.png", np.where(square == 1, 2, 1))
        _label_png(images / f"img{i}_object.png", square * 300)
        sky = np.zeros((SEG, SEG), dtype=np.int64)
        sky[:4] = 3
        _label_png(images / f"img{i}_object_1.png", sky)
        part = ""
        if i == 0:
            _label_png(images / "img0_part.png", np.full((SEG, SEG), 5))
            part = "img0_part.png"
        index.append(
            [f"img{i}.jpg", "train" if i < 4 else "val", SIDE, SIDE, SEG, SEG, f"img{i}_color.png"]
            + [f"img{i}_object.png;img{i}_object_1.png", part, "", "7", "8" if i % 2 == 0 else ""]
        )
    _write_csv(root / "index.csv", ["image", "split", "ih", "iw", "sh", "sw", *CATEGORIES], index)
    numbers = {n: (name, category) for category, labels in LABELS.items() for n, name in labels.items()}
    _write_csv(
        root / "category.csv",
        ["name", "first", "last", "count", "frequency"],
        [[c, min(LABELS[c]), max(LABELS[c]), len(LABELS[c]), IMAGES] for c in CATEGORIES],
    )
    _write_csv(
        root / "label.csv",
        ["number", "name", "category", "frequency", "coverage", "syns"],
        [[n, name, f"{category}({IMAGES})", IMAGES, 0.5, ""] for n, (name, category) in sorted(numbers.items())],
    )
    for category, labels in LABELS.items():
        _write_csv(
            root / f"c_{category}.csv",
            ["code", "number", "name", "frequency", "coverage"],
            [[code, n, name, IMAGES, 0.5] for code, (n, name) in enumerate(sorted(labels.items()), start=1)],
        )
    return root


@pytest.fixture(scope="module")
def broden(tmp_path_factory) -> Path:
    return write_broden(tmp_path_factory.mktemp("broden1_64"))


def test_the_loader_reads_the_index_labels_and_categories(broden):
    assert d.is_broden(broden)
    probe = d.load_broden(broden)
    assert len(probe) == IMAGES and probe.rows == list(range(IMAGES)) and probe.categories == list(CATEGORIES)
    names = probe.label_names["object"]
    assert names[300] == "flower" and names[3] == "sky" and names[4] == ""  # label.csv's numbers, gaps unnamed
    assert probe.concept_ids == {c: sorted(labels) for c, labels in LABELS.items()}
    assert probe.image(2) == str(broden / "images" / "img2.jpg")
    first, second = probe.labels(0), probe.labels(1)
    assert first["object"] == [str(broden / "images" / "img0_object.png"), str(broden / "images" / "img0_object_1.png")]
    assert first["scene"] == [7] and first["texture"] == [8] and "material" not in first
    assert "part" not in second and "texture" not in second  # empty cells: not annotated there
    val = d.load_broden(broden, "val")
    assert val.rows == [4, 5] and val.image(0).endswith("img4.jpg")
    with pytest.raises(ValueError, match=r"no rows of split 'test'; splits: \['train', 'val'\] or 'all'"):
        d.load_broden(broden, "test")


def test_label_pngs_decode_to_global_ids_in_the_image_geometry(broden):
    processor = CLIPProcessor.from_pretrained(TINY).image_processor
    probe = d.load_broden(broden)
    channels = d.probe.label_channels(probe.labels(0)["object"], processor, SEG, "row 0")
    row, col = red_squares()[0]
    flower = channels[0].view(SEG, SEG)
    assert set(flower.unique().tolist()) == {0, 300}
    assert flower[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8].eq(300).all() and flower.eq(300).sum() == 64
    assert channels[1].view(SEG, SEG)[:4].eq(3).all()
    scene = d.probe.label_channels([7], processor, SEG, "row 0")
    assert scene.shape == (1, SEG * SEG) and scene.eq(7).all()


def test_a_planted_red_unit_detects_red_and_flower_on_the_broden_folder(broden):
    """Unit 0's map is each patch's redness, unit 1 is noise: tallied against the folder's labels at the patch grid's
    resolution (so that no upsampling blurs the square), unit 0 covers exactly the red squares (IoU 1 with
    color=red and object=flower), and part (image 0 only) adds only image 0 to its union."""
    processor = CLIPProcessor.from_pretrained(TINY).image_processor
    probe = d.load_broden(broden)
    maps = []
    for i in range(len(probe)):
        pixels = torch.from_numpy(np.array(open_image(probe.image(i)))).float().permute(2, 0, 1)
        redness = (pixels[0] - pixels[1:].mean(dim=0)).unfold(0, 16, 16).unfold(1, 16, 16).mean((-1, -2))
        maps.append(torch.stack([redness, torch.rand(4, 4, generator=torch.Generator().manual_seed(i))]))
    maps = torch.stack(maps)  # (6, 2, 4, 4)
    thresholds = d.quantile_thresholds(maps, 1 / 16)  # one patch in 16 is red
    tallies = {c: d.ConceptTally(2) for c in probe.categories}
    for i in range(len(probe)):
        masks = d.unit_masks(maps[i], thresholds, 4)
        for category, channels in probe.labels(i).items():
            tallies[category].update(masks, d.probe.label_channels(channels, processor, 4, f"row {i}"))
    summary, units = d.describe_detectors(tallies, probe.label_names, probe.concept_ids, 0.04)
    assert units[0] == {"unit": 0, "concept": "red", "category": "color", "iou": 1.0, "detector": True}
    assert tallies["object"].iou()[0, 300].item() == 1.0
    assert tallies["part"].active[0].item() == 1  # part annotates image 0 only: its one red cell
    assert summary["detectors_per_category"]["color"] >= 1  # the noise unit may pass 0.04 on "black" (15/16 of pixels)


def test_the_broden_folder_runs_end_to_end_through_the_command(broden, tmp_path, aft_stand_in):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("red\nflower\nsky\nkitchen\n")
    output = tmp_path / "out"
    cli.main(
        [
            "dissect",
            *("--models", TINY, aft_stand_in, "--probe_dataset", str(broden), "--split", "all"),
            *("--concepts", str(concepts), "--layers", "0", "--top_k", "2", "--null_units", "20"),
            *("--mask_size", str(SEG), "--device", "cpu", "--figure_units", "2", "--output", str(output)),
        ]
    )
    results = d.load_dissection(output)
    assert results["dataset"]["num_images"] == IMAGES and results["dataset"]["skipped_images"] == 0
    netdissect = [e for e in results["layers"] if e["method"] == d.METHOD_NETDISSECT]
    assert [e["model"] for e in netdissect] == [TINY, aft_stand_in]
    names = {name for labels in LABELS.values() for name in labels.values()}
    for entry in netdissect:
        assert list(entry["summary"]["detectors_per_category"]) == list(CATEGORIES)
        assert len(entry["units"]) == 128
        assert all(
            u["concept"] in names and u["category"] in CATEGORIES or u["concept"] is None for u in entry["units"]
        )
    assert "network_dissection" in (output / "summary.md").read_text()
    with pytest.raises(ValueError, match="is a Broden folder: its categories and label names come from its csv"):
        cli.main(["dissect", "--models", TINY, "--probe_dataset", str(broden), "--mask_columns", "seg"])
