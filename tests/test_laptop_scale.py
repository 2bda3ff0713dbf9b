"""The laptop-scale experiment (experiments/laptop_scale): scenes, variant settings, the pipeline at toy size."""

import importlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "laptop_scale"
sys.path.insert(0, str(EXPERIMENT))

scenes = importlib.import_module("scenes")
finetune = importlib.import_module("finetune")
pretrain = importlib.import_module("pretrain")
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


def test_class_cue_paints_the_clutter_in_the_class_colour_only_when_asked():
    def cue_pixels(spec, index):
        image, mask, label = scenes.render_scene(0, index, spec)
        outside = np.asarray(image)[~mask]
        return int((outside == np.array(scenes.CUE_COLOURS[label])).all(axis=-1).sum())

    with_cue = [cue_pixels(scenes.SceneSpec(class_cue=1.0), i) for i in range(12)]
    without = [cue_pixels(scenes.SceneSpec(), i) for i in range(12)]
    assert sum(count > 0 for count in with_cue) >= 10  # a scene's clutter may hide behind its object
    assert sum(without) == 0


def test_clean_control_is_a_no_op_the_weights_stay_exactly_at_the_base():
    spec = run.SMOKE_CONFIG
    base = pretrain.build_tower(spec.tower, seed=0)
    processor = pretrain.image_processor_for(spec.scenes.image_size)
    images = scenes.make_scenes(0, 16, spec.scenes).select_columns(["image"])
    result = finetune.finetune(base, processor, images, "clean", finetune.FinetuneSpec(steps=2, batch_size=8), 0)
    tuned, original = result.model.state_dict(), base.state_dict()
    assert tuned.keys() == original.keys()
    assert all(torch.equal(tuned[name], original[name]) for name in original)
    # The planted counter-example: the paper's weight decay alone moves the clean control off the base.
    decayed = finetune.finetune(
        base, processor, images, "clean", finetune.FinetuneSpec(steps=2, batch_size=8, weight_decay=0.1), 0
    ).model.state_dict()
    assert not all(torch.equal(decayed[name], original[name]) for name in original)


def test_variants_change_only_their_own_attack_setting():
    spec = finetune.FinetuneSpec(eps=8.0)
    aft = finetune.attack_settings("aft", spec)
    assert aft == dict(
        attack_eps=8.0, attack_step_size=2.0, attack_steps=10, attack_eta=2.0, noise_sigma=2.0, attack_norm="huber"
    )
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
    report = run.main(
        ["--output", str(tmp_path / "a"), "--smoke", "--seeds", "0", "--figure_images", "2", "--workers", "1"]
    )
    for name in ("results.json", "table.md", run.FIGURE_NAME, run.SURGERY_FIGURE_NAME):
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
    # Every model is also measured with the training-free dense maps.
    assert all(f"energy_pointing_game@{m}" in metrics["aft"] for m in run.SURGERY_METHODS)
    table = (tmp_path / "a" / "table.md").read_text()
    assert all(f"`{model}`" in table for model in metrics)
    assert all(f"energy_pointing_game ({m})" in table for m in run.SURGERY_METHODS)
    again = run.main(
        ["--output", str(tmp_path / "b"), "--smoke", "--seeds", "0", "--figure_images", "2", "--workers", "1"]
    )
    assert again["seeds"][0]["metrics"] == metrics


def test_figures_are_redrawn_from_saved_towers_only_when_they_are_the_run_s(tmp_path, keep_torch_threads):
    """--figures_from redraws both figures (with the masks' outline) from towers saved as experiments/dissection's
    towers.py saves them, and refuses towers that do not give the run's numbers."""
    from hf_clip_aft.data import open_image
    from hf_clip_aft.interpret.figures import OUTLINE_COLOUR

    output = tmp_path / "run"
    arguments = ["--smoke", "--seeds", "0", "--figure_images", "2", "--workers", "1", "--variants", "clean", "aft"]
    report = run.main(["--output", str(output), *arguments])
    spec = importlib.util.spec_from_file_location("dissection_towers", EXPERIMENT.parent / "dissection" / "towers.py")
    towers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(towers)
    config = run.ExperimentConfig.from_dict(report["config"])
    assert config == run.dataclasses.replace(run.SMOKE_CONFIG, variants=("clean", "aft"))
    towers.seed_towers(config, 0, config.variants, str(tmp_path / "towers"))
    for name in (run.FIGURE_NAME, run.SURGERY_FIGURE_NAME):
        (output / name).unlink()
    result = run.redraw_figures(str(output), str(tmp_path / "towers"), 2)
    assert result.figure_masks.shape == (2, 16, 16) and result.figure_masks.any()
    for name in (run.FIGURE_NAME, run.SURGERY_FIGURE_NAME):
        pixels = np.asarray(open_image(output / name), dtype=np.int16)
        assert (np.abs(pixels - np.array(OUTLINE_COLOUR)).max(axis=-1) < 24).sum() > 20  # the outlines
    # The AFT tower in the base's place is not the run's base: refused, naming it.
    base = tmp_path / "towers" / "seed0" / "base"
    shutil.rmtree(base)
    shutil.copytree(tmp_path / "towers" / "seed0" / "aft", base)
    with pytest.raises(ValueError, match="base energy_pointing_game"):
        run.redraw_figures(str(output), str(tmp_path / "towers"), 2)
