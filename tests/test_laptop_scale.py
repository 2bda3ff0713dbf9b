"""The laptop-scale experiment (experiments/laptop_scale): scenes, variant settings, the pipeline at toy size."""

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "laptop_scale"
sys.path.insert(0, str(EXPERIMENT))

scenes = importlib.import_module("scenes")
finetune = importlib.import_module("finetune")
run = importlib.import_module("run")


def test_scenes_are_a_function_of_the_seed_and_the_masks_cover_the_object():
    spec = scenes.SceneSpec()
    first, again, other = (scenes.make_scenes(seed, 12, spec) for seed in (0, 0, 1))
    assert first["label"] == again["label"]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first["image"], again["image"]))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first["image"], other["image"]))
    for image, mask, label in zip(first["image"], first["mask"], first["label"]):
        inside = np.asarray(mask) > 0
        assert 0.05 < inside.mean() < 0.5
        if scenes.CLASS_NAMES[label].startswith("solid"):
            # Away from the anti-aliased edge, a solid object is one colour: the mask sits exactly on it.
            core = inside.copy()
            for axis in (0, 1):
                for shift in (1, -1):
                    core &= np.roll(inside, shift, axis=axis)
            colours = np.asarray(image)[core]
            assert len(colours) > 0 and (colours == colours[0]).all()


def test_variants_change_only_their_own_attack_setting():
    spec = finetune.FinetuneSpec(eps=8.0)
    aft = finetune.attack_settings("aft", spec)
    assert aft == dict(attack_eps=8.0, attack_step_size=2.0, attack_steps=10, attack_eta=2.0, noise_sigma=2.0,
                       attack_norm="huber")
    differences = {
        variant: {k for k, v in finetune.attack_settings(variant, spec).items() if aft[k] != v}
        for variant in finetune.VARIANTS
    }
    assert differences == {
        "clean": {"attack_eps"},
        "random": {"attack_steps", "attack_step_size", "noise_sigma"},
        "aft": set(),
        "aft_no_noise": {"noise_sigma"},
        "aft_linf": {"attack_norm"},
    }
    with pytest.raises(ValueError, match="variant='pgd'"):
        finetune.attack_settings("pgd", spec)


@pytest.fixture
def keep_torch_threads():
    """run.main sets torch's thread count (1 by default): give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_smoke_run_writes_the_table_and_figure_and_is_reproducible(tmp_path, keep_torch_threads):
    report = run.main(["--output", str(tmp_path / "a"), "--smoke", "--seeds", "0", "--figure_images", "2"])
    for name in ("results.json", "table.md", run.FIGURE_NAME):
        assert (tmp_path / "a" / name).stat().st_size > 0
    assert json.loads((tmp_path / "a" / "results.json").read_text())["summary"] == report["summary"]
    assert report["same_data_order"]
    metrics = report["seeds"][0]["metrics"]
    assert list(metrics) == ["base", *finetune.VARIANTS]
    # With ε = 0 the FARE loss and its gradient are exactly zero: the clean control stays at the base.
    for name, value in metrics["base"].items():
        assert metrics["clean"][name] == pytest.approx(value, abs=1e-5)
    logs = report["seeds"][0]["train_logs"]
    assert logs["aft"][0]["attack_loss"] > logs["random"][0]["attack_loss"] > 0 == logs["clean"][0]["attack_loss"]
    table = (tmp_path / "a" / "table.md").read_text()
    assert all(f"`{model}`" in table for model in metrics)
    again = run.main(["--output", str(tmp_path / "b"), "--smoke", "--seeds", "0", "--figure_images", "2"])
    assert again["seeds"][0]["metrics"] == metrics

