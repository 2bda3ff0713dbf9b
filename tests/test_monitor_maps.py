"""The map monitor reads and scores masks as the evaluation suite does (255 = unannotated), runs every registered map
method, and refuses at start-up a method it cannot run."""

import math

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer, CLIPVisionModelWithProjection

from hf_clip_aft.data import images_to_pixels
from hf_clip_aft.interpret import MAP_METHODS, BatchContext, EvaluationArguments, RunContext, saliency
from hf_clip_aft.interpret.batches import masks_to_tensor, open_mask
from hf_clip_aft.interpret.metrics import energy_pointing_game
from hf_clip_aft.interpret.monitor import MapMonitor, MonitorSettings
from hf_clip_aft.interpret.scorers import LocalizationScorer
from hf_clip_aft.interpret.surgery import empty_prompt_embedding
from hf_clip_aft.modeling import class_text_embeddings, embed_fn
from hf_clip_aft.release.record import TrainingRecord
from planted_monitor_run import TINY, masked_scenes

SIZE = 64  # the tiny CLIP's resolution: the masks reach the metrics without a resize


def bordered_scenes() -> datasets.Dataset:
    """Noisy images whose masks are Pascal-VOC-like: 0 background, 1 on a centred square object, a 255 (unannotated)
    frame 12 pixels wide; then one mask all 255 (no annotated pixel) and one all 0 (no object pixel)."""
    rng = np.random.default_rng(0)
    images, masks = [], []
    for _ in range(4):
        images.append(Image.fromarray(rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)))
        mask = np.full((SIZE, SIZE), 255, dtype=np.uint8)
        mask[12:-12, 12:-12] = 0
        mask[24:-24, 24:-24] = 1
        masks.append(Image.fromarray(mask))
    for value in (255, 0):
        images.append(Image.fromarray(rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)))
        masks.append(Image.fromarray(np.full((SIZE, SIZE), value, dtype=np.uint8)))
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "mask": masks}, features=features)


@pytest.fixture(scope="module")
def tiny():
    processor = CLIPImageProcessorPil.from_pretrained(TINY)
    clip = CLIPModel.from_pretrained(TINY).eval()
    tokenizer = CLIPTokenizer.from_pretrained(TINY)
    return processor, clip, tokenizer


def test_held_out_masks_follow_the_suites_255_rule(tiny):
    processor, _, _ = tiny
    base = CLIPVisionModelWithProjection.from_pretrained(TINY).eval()
    scenes = bordered_scenes()
    monitor = MapMonitor.from_dataset(base, scenes, processor, mask_column="mask", settings=MonitorSettings())
    assert monitor.skipped == {"no annotated pixel": 1, "no object pixel": 1} and len(monitor.pixels) == 4
    values = monitor.measure(base)

    # The suite's scorer on the same images, maps (label-free target: the base's own embedding) and mask images.
    images = [scene["image"] for scene in scenes]
    pixels = images_to_pixels(images, processor)
    embed = embed_fn(base, processor)
    with torch.no_grad():
        targets = embed(pixels)
    maps = saliency(base, pixels, targets, "simple_gradient", image_processor=processor)
    mask_images = [open_mask(scene["mask"]) for scene in scenes]
    run = RunContext(EvaluationArguments(), ["simple_gradient"], ["object"], "mask", (), 0)
    scorer = LocalizationScorer(run)
    batch = BatchContext(
        index=0, model_name="base", model=base, image_processor=processor, embed=embed, pixels=pixels,
        labels=torch.zeros(len(images), dtype=torch.long), mask_images=mask_images, image_embeds=targets,
        class_embeds=targets, predictions=torch.zeros(len(images), dtype=torch.long), text_embeds=targets,
        method="simple_gradient", maps=maps,
    )  # fmt: skip
    suite = {score.metric: float(score.values.double().mean()) for score in scorer.update(batch)}
    assert set(suite) == {"pointing_game", "energy_pointing_game", "top_k_iou"}
    for name, value in suite.items():
        assert values[name] == pytest.approx(value, abs=1e-6), name
    assert dict(scorer.skipped) == {("base", "no annotated pixel"): 1, ("base", "no object pixel"): 1}

    # The binary reading (any non-zero value is object) counts the 255 frame as object: another number.
    binary = energy_pointing_game(maps[:4], masks_to_tensor(mask_images[:4], processor)).double().mean()
    assert float(binary) - values["energy_pointing_game"] > 0.05


def labelled_monitor(tiny, method: str, labelled: bool = True) -> MapMonitor:
    """The monitor on 4 masked scenes with `method`, with class prompts (if `labelled`) and the empty prompt."""
    processor, clip, tokenizer = tiny
    base = CLIPVisionModelWithProjection.from_pretrained(TINY)
    held_out = masked_scenes(4, seed=2)
    class_embeds = class_text_embeddings(clip, tokenizer, held_out.features["label"].names) if labelled else None
    return MapMonitor.from_dataset(
        base,
        held_out,
        processor,
        mask_column="mask",
        label_column="label" if labelled else None,
        class_embeds=class_embeds,
        settings=MonitorSettings(method=method, batch_size=4, max_images=4),
        empty_prompt_embeds=empty_prompt_embedding(clip, tokenizer),
    )


@pytest.mark.parametrize("method", list(MAP_METHODS))
def test_every_registered_map_method_measures_finite_numbers(tiny, method):
    monitor = labelled_monitor(tiny, method)
    model = CLIPVisionModelWithProjection.from_pretrained(TINY)  # SDPA, as the trainer loads it
    model.train()
    values = monitor.measure(model)
    assert set(values) == set(monitor.available_metrics) and all(math.isfinite(v) for v in values.values())
    assert 0.0 <= values["energy_pointing_game"] <= 1.0 and values["gini"] > 0  # a map, not all zeros
    assert model.config._attn_implementation == "sdpa" and model.training  # the model is left as it was


def test_clip_surgery_measures_label_free_too(tiny):
    monitor = labelled_monitor(tiny, "clip_surgery", labelled=False)
    values = monitor.measure(CLIPVisionModelWithProjection.from_pretrained(TINY))
    assert "accuracy" not in values and all(math.isfinite(v) for v in values.values())


def test_a_method_the_monitor_cannot_run_is_refused_at_start_up(tiny):
    processor, _, _ = tiny
    base = CLIPVisionModelWithProjection.from_pretrained(TINY)
    settings = MonitorSettings(method="clip_surgery")
    with pytest.raises(ValueError, match=r"method='clip_surgery' needs the empty prompt's text embedding.*"):
        MapMonitor.from_dataset(base, masked_scenes(4), processor, mask_column="mask", settings=settings)
    with pytest.raises(ValueError, match=r"empty_prompt_embedding\(clip_model, tokenizer\)"):
        MapMonitor(torch.rand(2, 3, SIZE, SIZE), processor, torch.rand(2, 8), settings=settings)
    with pytest.raises(ValueError, match="method='gradcam_typo' is not a registered map method"):
        MonitorSettings(method="gradcam_typo")


def test_train_command_monitors_with_clip_surgery(tmp_path):
    from test_monitor import monitored_demo_run

    out = tmp_path / "out"
    monitored_demo_run(out, "--monitor_method", "clip_surgery")
    summary = TrainingRecord.load(out).training_evaluation
    assert summary["method"] == "clip_surgery" and [entry["step"] for entry in summary["history"]] == [0, 2]
    assert all(math.isfinite(value) for entry in summary["history"] for value in entry.values())


def test_train_command_refuses_clip_surgery_without_a_tokenizer(tmp_path):
    from hf_clip_aft.cli import run_command

    checkpoint = tmp_path / "no-tokenizer"  # weights only: CLIP's default image processor, no tokenizer
    CLIPModel.from_pretrained(TINY).save_pretrained(checkpoint)
    out = tmp_path / "out"
    flags = ["--model_name_or_path", str(checkpoint), "--output_dir", str(out), "--max_steps", "2"]
    flags += ["--monitor_steps", "2", "--monitor_maps", "true", "--monitor_method", "clip_surgery"]
    flags += ["--monitor_split", "train", "--monitor_max_images", "4"]
    with pytest.raises(ValueError, match="method='clip_surgery' needs the empty prompt's text embedding"):
        run_command("train", ["recipes/configs/demo.yaml", *flags])
    assert not out.exists()  # refused before training
