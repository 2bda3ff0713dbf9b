"""The dissection experiment (experiments/dissection): concept matrices, concept masks, the pipeline at toy size."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

RUN = Path(__file__).resolve().parents[1] / "experiments" / "dissection" / "run.py"
spec = importlib.util.spec_from_file_location("dissection_run", RUN)
run = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = run  # its dataclasses look their module up
spec.loader.exec_module(run)


def test_ground_truth_concepts_mark_the_class_its_shape_and_its_texture():
    labels = torch.tensor([run.CLASS_NAMES.index("striped disc"), run.CLASS_NAMES.index("solid triangle")])
    matrix = run.ground_truth_concepts(labels)
    shown = [{c for c, v in zip(run.GROUND_TRUTH_CONCEPTS, row) if v == 1} for row in matrix.tolist()]
    assert shown == [{"striped disc", "disc", "striped"}, {"solid triangle", "triangle", "solid"}]
    assert matrix.sum().item() == 6


def test_concept_maps_put_the_objects_concepts_on_its_mask_and_background_elsewhere():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[1, 1:, 1:] = True
    labels = torch.tensor([run.CLASS_NAMES.index("solid square"), run.CLASS_NAMES.index("striped triangle")])
    maps = run.concept_label_maps(masks, labels)
    names = {
        category: [[run.MASK_LABELS[category][i] for i in m.flatten().tolist()] for m in maps[category]]
        for category in maps
    }
    assert names["shape"][0].count("square") == 4 and names["shape"][1].count("triangle") == 9
    assert names["texture"][0].count("solid") == 4 and names["texture"][1].count("striped") == 9
    assert names["region"][0].count("object") == 4 and names["region"][0].count("background") == 12
    assert (maps["shape"][~masks] == 0).all()  # background is a concept of `region` only


@pytest.fixture
def keep_torch_threads():
    """run_seed sets torch's thread count (1 by default): give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_smoke_run_writes_results_and_reloads_the_saved_towers(tmp_path, keep_torch_threads):
    argv = ["--smoke", "--seeds", "0", "--probe_size", "12", "--workers", "1", "--towers", str(tmp_path / "towers")]
    report = run.main([*argv, "--output", str(tmp_path / "a")])
    assert json.loads((tmp_path / "a" / "results.json").read_text())["summary"] == report["summary"]
    assert "Δ aft − clean" in (tmp_path / "a" / "table.md").read_text()
    seed = report["seeds"][0]
    assert set(seed["records"]) == {"base", *run.VARIANTS}
    methods = {r["method"] for r in seed["records"]["aft"]}
    assert methods == {"clip_dissect/ground_truth", "clip_dissect/class_vectors", "network_dissection"}
    # The clean control is a no-op (weight decay 0): its weights are the base's, bit for bit.
    assert seed["clean_weights_equal_base"]
    assert seed["records"]["aft"] != seed["records"]["base"]
    again = run.main([*argv, "--output", str(tmp_path / "b")])
    assert "load" in again["seeds"][0]["seconds"] and "pretrain" in seed["seconds"]
    assert again["summary"] == report["summary"]
