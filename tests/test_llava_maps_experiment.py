"""The LLaVA-maps experiment (experiments/llava_maps): training batch, tower swap, the pipeline at toy size."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "llava_maps"
sys.path.insert(0, str(EXPERIMENT))
# Loaded under its own name: tests/test_laptop_scale.py imports experiments/laptop_scale/run.py as "run".
_spec = importlib.util.spec_from_file_location("llava_maps_run", EXPERIMENT / "run.py")
run = importlib.util.module_from_spec(_spec)
sys.modules["llava_maps_run"] = run  # dataclasses look their module up there
_spec.loader.exec_module(run)
towers = sys.modules["llava_towers"]
pretrain = sys.modules["pretrain"]


def _smoke_llava():
    tower = pretrain.build_tower(towers.tower_config(smoke=True).tower, seed=0).eval()
    processor = run.llava_processor(tower)
    return tower, processor, run.build_llava(tower, processor, run.SMOKE_SPEC, seed=0)


def test_training_batch_supervises_only_the_shape_word_after_the_processors_prompt():
    tower, processor, _ = _smoke_llava()
    input_ids, targets = run.training_batch(processor, torch.tensor([0, 1, 2]))
    tokenizer = processor.tokenizer
    grid = (tower.config.image_size // tower.config.patch_size) ** 2
    assert (input_ids[:, :-2] == processor.image_token_id).sum(dim=1).tolist() == [grid] * 3
    assert input_ids[0, 0] == tokenizer.bos_token_id  # the attention sink that llava_relevance drops is not an image
    assert [tokenizer.convert_ids_to_tokens(int(i)) for i in input_ids[:, -2]] == ["disc", "square", "triangle"]
    assert (input_ids[:, -1] == tokenizer.eos_token_id).all()
    assert (targets[:, :-2] == -100).all() and (targets[:, -2:] == input_ids[:, -2:]).all()


def test_aft_llava_differs_from_the_base_llava_only_in_the_tower():
    _, _, llava = _smoke_llava()
    other = pretrain.build_tower(towers.tower_config(smoke=True).tower, seed=1).eval()
    before = {k: v.clone() for k, v in llava.state_dict().items()}
    swapped = run.swap_llava_vision_tower(llava, other)
    changed = {k for k, v in swapped.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("vision_tower" in k for k in changed)


def test_smoke_run_writes_results_and_figure(tmp_path):
    figure = tmp_path / "figure.png"
    args = ["--smoke", "--output", str(tmp_path / "out"), "--figure", str(figure)]
    run.main([*args, "--tower_cache", str(tmp_path / "cache")])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert figure.stat().st_size > 0
    assert not results["towers_from_cache"] and 0 < results["mask_share"] < 1
    for side in run.LANGUAGE_SIDES:
        for tower in run.TOWERS:
            summary = results["summary"][side][tower]
            assert 0 <= summary["accuracy"] <= 1
            for name in run.MAP_SETTINGS:
                assert all(0 <= summary["maps"][name][m] <= 1 for m in run.MAP_METRICS)
        assert len(results["per_image"][f"{side}/aft"]) == run.SMOKE_SPEC.eval_size
    # The second run finds the towers in the cache.
    again = run.main([*args, "--tower_cache", str(tmp_path / "cache")])
    assert again["towers_from_cache"] and again["summary"] == results["summary"]
