"""The public masked dataset the docs name for the localisation metrics, as its Hub schema: Pascal VOC 2012
segmentation from ``shijli/voc2012`` (config ``segmentation``, splits ``train``/``validation``; columns ``id``
string, ``image`` Image, ``mask`` Image: a palette PNG of class indices, 0 background, 1-20 the VOC classes, 255 the
unannotated object borders). A tiny local copy with exactly that schema (shipped photos, synthetic masks) shows that
`evaluate` refuses it as it is (no per-image class label) and runs on its single-object images once they are written
as an imagefolder whose label column is the VOC class index, with VOC's class list
(``recipes/configs/voc2012-classes.txt``) as ``--class_names``: the mask read by the mask rules (255 unannotated,
not object) for localisation and as the same class indices for segmentation; a label outside the list is refused."""

import io
import math
import os

import datasets
import numpy as np
import pytest
from PIL import Image

from hf_clip_aft.cli import parse_args, run_command
from hf_clip_aft.commands import prepare_voc
from hf_clip_aft.commands.evaluate import ARGUMENTS
from hf_clip_aft.commands.prepare_voc import VOC_BORDER, write_single_object_folder
from hf_clip_aft.interpret import batches
from hf_clip_aft.interpret.results import load_results
from hf_clip_aft.interpret.suite import EvaluationArguments, run_evaluation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "hf_clip_aft", "assets", "tiny-clip")
PHOTOS = os.path.join(REPO, "hf_clip_aft", "assets", "photos")
CONFIG = os.path.join(REPO, "recipes", "configs", "evaluate-voc.yaml")
CLASS_LIST = os.path.join(REPO, "recipes", "configs", "voc2012-classes.txt")

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
# shijli/voc2012, config "segmentation" (https://huggingface.co/datasets/shijli/voc2012)
VOC_FEATURES = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(), "mask": datasets.Image()})


def voc_palette() -> list[int]:
    """VOC's colour map (index -> RGB, the devkit's bit-interleaving rule), flattened for `putpalette`."""
    palette = []
    for index in range(256):
        r = g = b = 0
        for bit in range(8):
            r |= ((index >> (3 * bit)) & 1) << (7 - bit)
            g |= ((index >> (3 * bit + 1)) & 1) << (7 - bit)
            b |= ((index >> (3 * bit + 2)) & 1) << (7 - bit)
        palette += [r, g, b]
    return palette


def _photo(name: str) -> bytes:
    with open(os.path.join(PHOTOS, name, f"{name}.jpg"), "rb") as file:
        return file.read()


def _mask(size: tuple[int, int], objects: list[tuple[int, slice, slice]], border: int = 10) -> bytes:
    """A VOC palette PNG of `size` (width, height): each (class, rows, columns) box drawn with a `border`-pixel
    frame of 255 around it, 0 elsewhere."""
    values = np.zeros(size[::-1], np.uint8)
    for _, rows, columns in objects:
        top, left = max(rows.start - border, 0), max(columns.start - border, 0)
        values[top : rows.stop + border, left : columns.stop + border] = VOC_BORDER
    for index, rows, columns in objects:
        values[rows, columns] = index
    mask = Image.fromarray(values, mode="L").convert("P")
    mask.putpalette(voc_palette())
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def voc_rows() -> datasets.Dataset:
    """Four rows in the Hub schema: a cat and a person each in the centre; a cat drawn at the left edge, so that
    only its 255 border reaches the model's centre crop; and a person with a cat (two classes)."""
    cat, person = VOC_CLASSES.index("cat"), VOC_CLASSES.index("person")
    two = [(person, slice(40, 220), slice(30, 110)), (cat, slice(40, 220), slice(150, 230))]
    rows = {"id": [], "image": [], "mask": []}
    for name, photo, size, objects, border in [
        ("2007_cat", "cat", (385, 256), [(cat, slice(60, 200), slice(120, 260))], 10),
        ("2007_person", "astronaut", (256, 256), [(person, slice(40, 220), slice(70, 190))], 10),
        # The crop keeps columns 64-321 of 385: the cat ends at column 40, its border of 255 reaches column 90.
        ("2007_cat_edge", "cat", (385, 256), [(cat, slice(60, 200), slice(0, 40))], 50),
        ("2007_two", "astronaut", (256, 256), two, 10),
    ]:  # fmt: skip
        rows["id"].append(name)
        rows["image"].append({"bytes": _photo(photo), "path": None})
        rows["mask"].append({"bytes": _mask(size, objects, border), "path": None})
    return datasets.Dataset.from_dict(rows, features=VOC_FEATURES)


def test_the_shipped_class_list_is_vocs_classes_in_index_order():
    assert batches.read_class_names(CLASS_LIST) == list(VOC_CLASSES)


def test_the_hub_schema_as_it_is_has_no_class_label_and_is_refused(voc_rows, monkeypatch):
    """The Hub copy has no per-image class: `evaluate` needs one (the prompt each map explains) and says so."""
    monkeypatch.setattr(batches, "load_image_dataset", lambda *args, **kwargs: voc_rows)
    args = EvaluationArguments(
        models=[TINY], dataset="shijli/voc2012", dataset_config="segmentation", split="validation", device="cpu"
    )
    with pytest.raises(ValueError, match="label_column='label' must be a ClassLabel column"):
        run_evaluation(args)


def test_single_object_images_as_an_imagefolder_run_localisation(voc_rows, tmp_path, aft_stand_in, monkeypatch):
    monkeypatch.chdir(REPO)  # the config names the class list from the repository root
    folder = str(tmp_path / "voc2012-val-single")
    assert write_single_object_folder(voc_rows, folder) == 3  # the person-with-cat row has two classes
    output = tmp_path / "eval"
    # The example config's settings, with the tiny models and the tiny copy in place of the real ones.
    argv = [CONFIG, "--models", TINY, aft_stand_in, "--dataset", folder, "--output", str(output)]
    run_command("evaluate", argv + ["--batch_size", "4", "--device", "cpu", "--grid_images", "2"])
    results = load_results(output)
    # VOC's 21 classes from the class list, not only the classes present (cat, person).
    assert results["settings"]["mask_column"] == "mask" and results["settings"]["num_classes"] == 21
    assert results["settings"]["methods"] == ["simple_gradient", "gradcam"]
    values = {(r["model"], r["metric"], r["method"]): r for r in results["results"]}
    for model in (TINY, aft_stand_in):
        for method in ("simple_gradient", "gradcam"):
            for metric in ("pointing_game", "energy_pointing_game", "top_k_iou"):
                entry = values[model, metric, method]
                assert math.isfinite(entry["value"]) and 0.0 <= entry["value"] <= 1.0
                # The edge cat leaves only 255 (unannotated) pixels in the crop: skipped, not scored as object.
                assert entry["settings"]["num_images"] == 2
        assert any(
            f"localization: {model}: images skipped out of 3: 0 with no annotated pixel, 1 with no object pixel" in note
            for note in results["settings"]["notes"]
        )


def test_prepare_voc_downloads_the_split_and_writes_the_folder_once(voc_rows, tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(prepare_voc.datasets, "load_dataset", lambda *args, **kwargs: asked.append(args) or voc_rows)
    folder = tmp_path / "voc"
    run_command("prepare_voc", ["--output", str(folder)])
    assert asked == [("shijli/voc2012", "segmentation")]
    names = sorted(os.listdir(folder))
    assert "metadata.csv" in names and len(names) == 1 + 2 * 3 and not (tmp_path / "voc.partial").exists()
    with pytest.raises(FileExistsError, match="already exists; choose another --output"):
        run_command("prepare_voc", ["--output", str(folder)])


def test_segmentation_reads_the_masks_as_the_labels_voc_indices(voc_rows, tmp_path, aft_stand_in, monkeypatch):
    """Labels and mask values are both VOC indices (cat 8, person 15) against the list's 21 prompts. Text labels
    encoded over the classes present made cat 0 and person 1, and segmentation refused masks holding 8 and 15."""
    monkeypatch.chdir(REPO)
    folder = str(tmp_path / "voc2012-val-single")
    write_single_object_folder(voc_rows, folder)
    output = tmp_path / "eval"
    argv = [CONFIG, "--models", TINY, aft_stand_in, "--dataset", folder, "--output", str(output)]
    argv += ["--metrics", "localization", "segmentation", "--methods", "gradcam", "clip_surgery"]
    run_command("evaluate", argv + ["--batch_size", "4", "--device", "cpu", "--grid_images", "0"])
    results = load_results(output)
    values = {(r["model"], r["metric"], r["method"]): r for r in results["results"]}
    for model in (TINY, aft_stand_in):
        miou = values[model, "miou", "clip_surgery"]
        assert math.isfinite(miou["value"]) and 0.0 <= miou["value"] <= 1.0
        assert miou["settings"]["num_images"] == 3  # every image's pixels counted; the edge cat's crop adds background
        assert (model, "miou", "gradcam") not in values  # no per-class maps: skipped with a note
        for method in ("gradcam", "clip_surgery"):
            assert values[model, "pointing_game", method]["settings"]["num_images"] == 2
    assert any(note.startswith("segmentation skipped for gradcam") for note in results["settings"]["notes"])


def test_text_labels_take_their_index_in_the_class_list(voc_rows, tmp_path):
    """The colleague's first layout (class names in metadata.csv) gives the same VOC indices with the class list."""
    folder = tmp_path / "voc2012-val-single"
    write_single_object_folder(voc_rows, str(folder))
    metadata = folder / "metadata.csv"
    rows = [line.split(",") for line in metadata.read_text().split()[1:]]
    named = [f"{image},{mask},{VOC_CLASSES[int(label)]}" for image, mask, label in rows]
    metadata.write_text("\n".join(["file_name,mask_file_name,label", *named]) + "\n")
    data = batches.load_evaluation_data(str(folder), split="train", class_names=VOC_CLASSES)
    labels = dict(zip((os.path.basename(v["path"]) for v in data.dataset["image"]), data.dataset["label"]))
    assert labels == {"2007_cat.jpg": 8, "2007_person.jpg": 15, "2007_cat_edge.jpg": 8}
    assert data.class_names == list(VOC_CLASSES)


def test_a_label_outside_the_class_list_is_refused_naming_it(voc_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    folder = tmp_path / "voc2012-val-single"
    write_single_object_folder(voc_rows, str(folder))
    metadata = folder / "metadata.csv"
    text = metadata.read_text()
    assert "2007_person_mask.png,15\n" in text
    metadata.write_text(text.replace("2007_person_mask.png,15\n", "2007_person_mask.png,21\n"))
    (args,) = parse_args(ARGUMENTS, [CONFIG, "--models", TINY, "--dataset", str(folder), "--device", "cpu"])
    expected = r"The label 21 of row \d \(.*2007_person\.jpg\) is outside \[0, 21\): class_names has 21 names"
    with pytest.raises(ValueError, match=expected):
        run_evaluation(args)


def test_the_example_config_parses():
    (parsed,) = parse_args(ARGUMENTS, [CONFIG])
    assert parsed.metric_groups() == ["localization"] and parsed.mask_column == "mask"
    assert parsed.class_names == "recipes/configs/voc2012-classes.txt"
    assert os.path.samefile(os.path.join(REPO, parsed.class_names), CLASS_LIST)
