"""The evaluation suite end to end (tiny models, demo photos, a synthetic masked dataset), the results schema and
the local `evaluate` modules."""

import copy
import json
import os
import subprocess
import sys

import datasets
import evaluate
import numpy as np
import pytest
import torch
from PIL import Image

from hf_clip_aft.data import class_names
from hf_clip_aft.interpret import evaluate_module_path
from hf_clip_aft.interpret import suite as suite_module
from hf_clip_aft.interpret.batches import read_class_names, with_class_names
from hf_clip_aft.interpret.metrics import energy_pointing_game, gini_index, pointing_game, top_fraction_iou
from hf_clip_aft.interpret.results import load_results, summary_markdown, validate_results
from hf_clip_aft.interpret.suite import EvaluationArguments, evaluate_models, run_evaluation
from hf_clip_aft.interpret.zero_shot import ZeroShotDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "hf_clip_aft", "assets", "tiny-clip")
PHOTOS = os.path.join(REPO, "hf_clip_aft", "assets", "photos")
CHEAP = dict(smoothgrad_samples=2, ig_steps=2, faithfulness_steps=4, batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def second_model(aft_stand_in):
    """tiny-clip with perturbed vision weights, standing in for the trained AFT demo model."""
    return aft_stand_in


@pytest.fixture(scope="module")
def masked_dataset(tmp_path_factory):
    """An imagefolder with a label and a mask column (metadata.csv): a coloured square on black, its mask."""
    root = tmp_path_factory.mktemp("masked") / "data"
    split = root / "train"
    rows = ["file_name,mask_file_name,label"]
    for i, (name, colour) in enumerate([("red", (255, 0, 0)), ("blue", (0, 0, 255))] * 2):
        image = np.zeros((80, 80, 3), np.uint8)
        image[20:50, 10:40] = colour
        mask = np.zeros((80, 80), np.uint8)
        mask[20:50, 10:40] = 1
        (split / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(split / name / f"{i}.png")
        Image.fromarray(mask).save(split / name / f"{i}_mask.png")
        rows.append(f"{name}/{i}.png,{name}/{i}_mask.png,{name}")
    (split / "metadata.csv").write_text("\n".join(rows) + "\n")
    return str(root)


def test_recipe_writes_results_summary_and_grid(tmp_path, second_model):
    output = tmp_path / "eval"
    command = [
        sys.executable,
        os.path.join(REPO, "recipes", "evaluate.py"),
        "--models",
        TINY,
        second_model,
        "--dataset",
        PHOTOS,
        "--split",
        "train",
        "--limit",
        "3",
        "--metrics",
        "all",
        "--output",
        str(output),
        "--grid_images",
        "2",
        *(f"--{key}={value}" for key, value in CHEAP.items()),
    ]
    subprocess.run(command, check=True, cwd=REPO, capture_output=True, text=True)
    results = load_results(output)
    assert results["models"] == [TINY, second_model]
    assert results["dataset"] == {"name": PHOTOS, "config": None, "split": "train", "num_images": 3}
    assert results["settings"]["limit"] == 3 and results["settings"]["seed"] == 0
    metrics = {(r["model"], r["metric"], r["method"]) for r in results["results"]}
    for model in results["models"]:
        assert (model, "accuracy", None) in metrics
        for method in results["settings"]["methods"]:
            for metric in ("gini", "deletion_auc", "insertion_auc"):
                assert (model, metric, method) in metrics
    # No mask column in the photos: localisation is skipped, and the file says so.
    assert not any(r["metric"] == "pointing_game" for r in results["results"])
    assert any("localization skipped" in note for note in results["settings"]["notes"])
    summary = (output / "summary.md").read_text()
    assert "| gini ↑ | simple_gradient |" in summary and "Δ" in summary
    grid = Image.open(output / "saliency_grid.png")
    # image + the six gradient and attention methods ('all'; the training-free maps are opt-in) x 2 models
    six = ["simple_gradient", "smoothgrad", "integrated_gradients", "gradcam", "attention", "rollout"]
    assert results["settings"]["methods"] == six
    assert grid.width == 96 * (1 + 6 * 2)
    assert "Gradient vs training-free" not in summary  # the family table needs both families
    assert grid.height > 2 * 96


def test_localisation_is_computed_when_a_mask_column_exists(masked_dataset, second_model):
    args = EvaluationArguments(
        models=[TINY, second_model],
        dataset=masked_dataset,
        split="train",
        metrics=["localization"],
        methods=["simple_gradient", "gradcam"],
        **CHEAP,
    )
    results, figure = run_evaluation(args)
    assert results["settings"]["mask_column"] == "mask"
    assert results["settings"]["num_classes"] == 2  # class names given as text, encoded
    names = {r["metric"] for r in results["results"]}
    assert names == {"pointing_game", "energy_pointing_game", "top_k_iou"}
    for entry in results["results"]:
        assert 0.0 <= entry["value"] <= 1.0 and entry["settings"]["num_images"] == 4
    assert len(figure) == 4 and set(figure.maps) == {(m, n) for m in args.methods for n in args.models}


def test_roar_and_robustness_are_opt_in_and_reported_per_setting(second_model):
    args = EvaluationArguments(
        models=[TINY, second_model],
        dataset=PHOTOS,
        split="train",
        limit=4,
        metrics=["roar", "robustness"],
        methods=["gradcam"],
        roar_fractions=[0.5],
        robust_eps=[1.0, 4.0],
        attack_steps=2,
        **CHEAP,
    )
    results, _ = run_evaluation(args)
    validate_results(results)
    robust = {(r["model"], r["settings"]["eps"]) for r in results["results"] if r["metric"] == "robust_accuracy"}
    assert robust == {(m, eps) for m in args.models for eps in (1.0, 4.0)}
    roar = {(r["model"], r["settings"]["fraction"]) for r in results["results"] if r["metric"] == "roar_accuracy"}
    assert roar == {(m, f) for m in args.models for f in (0.0, 0.5)}
    assert EvaluationArguments(models=["m"], dataset="d").metric_groups() == [
        "zero_shot",
        "sparsity",
        "localization",
        "faithfulness",
    ]


def test_zero_shot_preset_runs_each_dataset_into_its_folder(tmp_path, monkeypatch, second_model):
    preset = (ZeroShotDataset("photos-a", PHOTOS, split="train"), ZeroShotDataset("photos-b", PHOTOS, split="train"))
    monkeypatch.setattr(suite_module, "zero_shot_preset", lambda name: preset)
    args = EvaluationArguments(
        models=[TINY, second_model], zero_shot_preset="test", output=str(tmp_path), limit=2, **CHEAP
    )
    everything = evaluate_models(args)
    assert set(everything) == {"photos-a", "photos-b"}
    for name in everything:
        results = load_results(tmp_path / name)
        assert {r["metric"] for r in results["results"]} == {"accuracy"}
        assert not (tmp_path / name / "saliency_grid.png").exists()


def test_bad_arguments_fail_before_loading_anything():
    with pytest.raises(ValueError, match="No models"):
        EvaluationArguments(dataset=PHOTOS).check()
    with pytest.raises(ValueError, match="Unknown metric groups"):
        EvaluationArguments(models=[TINY], dataset=PHOTOS, metrics=["sparsity", "speed"]).check()
    with pytest.raises(ValueError, match="Unknown saliency methods"):
        EvaluationArguments(models=[TINY], dataset=PHOTOS, methods=["lime"]).check()
    with pytest.raises(ValueError, match="twice"):
        EvaluationArguments(models=[TINY, TINY], dataset=PHOTOS).check()


def test_class_names_are_checked_before_loading_anything(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("background\ncat\n", encoding="utf-8")
    EvaluationArguments(models=[TINY], dataset=PHOTOS, class_names=str(classes)).check()
    with pytest.raises(ValueError, match="class_names='.*missing.txt' cannot be read"):
        EvaluationArguments(models=[TINY], dataset=PHOTOS, class_names=str(tmp_path / "missing.txt")).check()
    with pytest.raises(ValueError, match="zero_shot_preset='aft-zero-shot-15' evaluates the preset's datasets"):
        EvaluationArguments(models=[TINY], zero_shot_preset="aft-zero-shot-15", class_names=str(classes)).check()


def test_a_class_list_file_is_one_name_per_line(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_bytes("\ufeffbackground\r\n  golden_retriever \ncaf\u00e9\n\n\n".encode())  # BOM, CRLF, blank end
    assert read_class_names(path) == ["background", "golden_retriever", "caf\u00e9"]
    for text, message in [
        ("cat\n\ndog\n", r"Class 1 of .*classes.txt \(line i \+ 1 names class i\) is ''"),
        ("cat\ndog\ncat\n", r"names 'cat' twice \(classes 0 and 2\)"),
        ("\n\n", "names no class"),
    ]:
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            read_class_names(path)
    path.write_bytes(b"caf\xe9\n")  # Latin-1
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        read_class_names(path)


def _labelled(labels, feature) -> datasets.Dataset:
    """Rows with an undecoded image column (its paths name the rows in messages) and the given label column."""
    images = [{"bytes": b"", "path": f"photos/{i}.png"} for i in range(len(labels))]
    features = datasets.Features({"image": datasets.Image(decode=False), "label": feature})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def test_class_names_index_integer_labels_and_map_text_labels():
    names = ["background", "cat", "dog"]
    for labels, feature in [
        ([2, 0, 1], datasets.Value("int32")),
        (["dog", "background", "cat"], datasets.Value("string")),
    ]:
        dataset = with_class_names(_labelled(labels, feature), "label", names, "image")
        assert dataset.features["label"] == datasets.ClassLabel(names=names) and dataset["label"][:] == [2, 0, 1]
    for label in (3, -1):
        with pytest.raises(ValueError, match=rf"The label {label} of row 1 \(photos/1.png\) is outside \[0, 3\)"):
            with_class_names(_labelled([0, label], datasets.Value("int64")), "label", names, "image")
    with pytest.raises(ValueError, match=r"The label 'horse' of row 1 \(photos/1.png\) is not in class_names"):
        with_class_names(_labelled(["cat", "horse"], datasets.Value("string")), "label", names, "image")
    with pytest.raises(ValueError, match=r"The label of row 0 \(photos/0.png\) is missing"):
        with_class_names(_labelled([None, 1], datasets.Value("int64")), "label", names, "image")
    with pytest.raises(ValueError, match="must hold integer class indices or class names"):
        with_class_names(_labelled([0.0, 1.0], datasets.Value("float32")), "label", names, "image")


def test_a_class_label_column_must_carry_the_class_names():
    names = ["background", "cat", "dog"]
    labelled = _labelled([2, 0], datasets.ClassLabel(names=names))
    assert with_class_names(labelled, "label", names, "image") is labelled
    with pytest.raises(ValueError, match="class 1 is 'cat' in the column, 'kitten' in class_names"):
        with_class_names(labelled, "label", ["background", "kitten", "dog"], "image")
    with pytest.raises(ValueError, match="the column has 3 classes, class_names 4"):
        with_class_names(labelled, "label", [*names, "horse"], "image")


def test_integer_labels_without_class_names_name_the_option():
    with pytest.raises(ValueError, match="must be a ClassLabel column.*`hf-clip-aft evaluate --class_names FILE`"):
        class_names(datasets.Features({"label": datasets.Value("int32")}), "label")


def _valid_results():
    return {
        "schema": "hf_clip_aft.eval/v1",
        "dataset": {"name": "d", "config": None, "split": "test", "num_images": 2},
        "models": ["base", "org/aft"],
        "settings": {"seed": 0, "limit": None, "metrics": ["sparsity"], "methods": ["gradcam"]},
        "results": [
            {
                "model": "base",
                "task": "saliency",
                "metric": "gini",
                "method": "gradcam",
                "value": 0.25,
                "settings": {"num_images": 2},
            },
            {
                "model": "org/aft",
                "task": "saliency",
                "metric": "gini",
                "method": "gradcam",
                "value": 0.5,
                "settings": {"num_images": 2},
            },
            {
                "model": "org/aft",
                "task": "zero-shot-image-classification",
                "metric": "accuracy",
                "method": None,
                "value": 1.0,
                "settings": {"num_images": 2},
            },
        ],
    }


@pytest.mark.parametrize(
    "path, bad, message",
    [
        (("schema",), "other/v2", "schema"),
        (("dataset", "num_images"), -1, "dataset.num_images"),
        (("settings", "seed"), "0", "settings.seed"),
        (("results", 0, "model"), "unknown", r"results\[0\].model"),
        (("results", 2, "method"), "gradcam", r"results\[2\].method"),
        (("results", 1, "value"), float("nan"), r"results\[1\].value"),
    ],
)
def test_validator_names_the_bad_field(path, bad, message):
    results = copy.deepcopy(_valid_results())
    target = results
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = bad
    with pytest.raises(ValueError, match=message):
        validate_results(results)


def test_summary_table_has_one_column_per_model_and_the_difference(tmp_path):
    results = _valid_results()
    validate_results(results)
    (tmp_path / "results.json").write_text(json.dumps(results))
    summary = summary_markdown(load_results(tmp_path / "results.json"))
    assert "| metric | method | `base` | `aft` | Δ (`aft` − `base`) |" in summary
    assert "| gini ↑ | gradcam | 0.2500 | 0.5000 | +0.2500 |" in summary
    assert "| accuracy ↑ | – | – | 1.0000 | – |" in summary


def test_evaluate_modules_load_offline_and_match_the_functions():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 6, 6, generator=generator)
    masks = torch.rand(3, 6, 6, generator=generator) > 0.5
    sparsity = evaluate.load(evaluate_module_path("saliency_sparsity"))
    assert sparsity.compute(predictions=maps.tolist())["gini"] == pytest.approx(gini_index(maps).mean().item())
    localisation = evaluate.load(evaluate_module_path("saliency_localization"))
    scores = localisation.compute(predictions=maps.tolist(), references=masks.int().tolist(), fraction=0.3)
    assert scores["pointing_game"] == pytest.approx(pointing_game(maps, masks).mean().item())
    assert scores["energy_pointing_game"] == pytest.approx(energy_pointing_game(maps, masks).mean().item())
    assert scores["top_k_iou"] == pytest.approx(top_fraction_iou(maps, masks, 0.3).mean().item())
    # 255 = unannotated: an all-255 mask is skipped, not scored as an object everywhere.
    references = masks.int() * 255
    references[0] = 255
    references[1, 0] = 1
    scores = localisation.compute(predictions=maps.tolist(), references=references.tolist(), ignore_index=255)
    assert scores["num_images"] == 1  # image 0 has no annotated pixel, image 2 no object pixel
    expected = pointing_game(maps[1:2], references[1:2] == 1, references[1:2] != 255).item()
    assert scores["pointing_game"] == pytest.approx(expected)
    auc = evaluate.load(evaluate_module_path("faithfulness_auc"))
    assert auc.compute(predictions=[[1.0, 0.0], [1.0, 1.0]])["auc"] == pytest.approx(0.75)
    accuracy = evaluate.load(os.path.join(evaluate_module_path("top1_accuracy"), "top1_accuracy.py"))
    assert accuracy.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2])["accuracy"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="Unknown evaluate module"):
        evaluate_module_path("accuracy")
