"""The AFT tower inside LLaVA: swap, save, reload with stock transformers, generate; and the CLIPVisionModel load
that the original LLaVA code base does."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaProcessor,
)

from hf_clip_aft.model_configs import clip_config
from hf_clip_aft.modeling import quiet_transformers
from hf_clip_aft.release.card import render_llava_card
from hf_clip_aft.release.export import export_clip, private_strings
from hf_clip_aft.release.llava import save_llava, swap_llava_vision_tower, validate_llava_folder, vision_tower_state
from test_export import TINY, fine_tuned_tower
from test_hub import FakeHfApi, load_recipe
from tiny_llava import IMAGE_TOKEN, NUM_PATCHES, tiny_llava_config


@pytest.fixture(scope="module")
def trained():
    return fine_tuned_tower(seed=3)


@pytest.fixture(scope="module")
def aft_export(trained, tmp_path_factory):
    return export_clip(trained, TINY, tmp_path_factory.mktemp("aft") / "clip-aft")


@pytest.fixture(scope="module")
def llava_checkpoint(tmp_path_factory):
    """A tiny LLaVA checkpoint on disk, with a processor, standing in for llava-hf/llava-1.5-7b-hf.

    Its weights use the llava-hf checkpoints' key layout (``vision_tower.vision_model.*``), which a model built
    from a config does not save with.
    """
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llava") / "llava-base"
    LlavaForConditionalGeneration(tiny_llava_config()).save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    legacy = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in weights.items()}
    assert legacy != weights
    save_file(legacy, folder / "model.safetensors", metadata={"format": "pt"})
    image_processor = CLIPImageProcessorPil.from_pretrained(TINY)
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(TINY), patch_size=16,
        vision_feature_select_strategy="default",
    )  # fmt: skip
    processor.save_pretrained(folder)
    return folder


def tower_weights(trained: CLIPVisionModelWithProjection) -> dict[str, torch.Tensor]:
    prefix = "vision_model."
    return {k.removeprefix(prefix): v for k, v in trained.state_dict().items() if k.startswith(prefix)}


def prompt() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN] * NUM_PATCHES + [7, 8]])
    return {"input_ids": ids, "pixel_values": torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))}


def test_swapped_llava_saves_reloads_and_generates(trained, aft_export, llava_checkpoint, tmp_path):
    with quiet_transformers():
        llava = LlavaForConditionalGeneration.from_pretrained(llava_checkpoint).eval()
    original = {k: v.clone() for k, v in llava.model.vision_tower.state_dict().items()}
    language = {k: v.clone() for k, v in llava.model.language_model.state_dict().items()}
    swap_llava_vision_tower(llava, aft_export)
    expected = tower_weights(trained)
    assert all(torch.equal(v, expected[k]) for k, v in llava.model.vision_tower.state_dict().items())
    assert not torch.equal(original["encoder.layers.0.mlp.fc1.weight"], expected["encoder.layers.0.mlp.fc1.weight"])
    assert all(torch.equal(v, language[k]) for k, v in llava.model.language_model.state_dict().items())
    with torch.no_grad():
        in_memory = llava.generate(**prompt(), max_new_tokens=4, do_sample=False)

    out = save_llava(llava, tmp_path / "llava-aft")
    with safe_open(out / "model.safetensors", "pt") as f:  # the checkpoint's own layout, for older readers
        tower_keys = [k for k in f.keys() if "vision_tower" in k]
    assert tower_keys and all(k.startswith("vision_tower.vision_model.") for k in tower_keys)
    validate_llava_folder(out, expected)
    with pytest.raises(ValueError, match="differ from the fine-tuned"):
        validate_llava_folder(out, original)

    reloaded = LlavaForConditionalGeneration.from_pretrained(out).eval()  # stock transformers, nothing of ours
    assert all(torch.equal(v, expected[k]) for k, v in reloaded.model.vision_tower.state_dict().items())
    with torch.no_grad():
        generated = reloaded.generate(**prompt(), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, prompt()["input_ids"].shape[1] + 4)
    assert torch.equal(generated, in_memory)


@pytest.mark.parametrize("kind", ["CLIPModel", "CLIPVisionModel", "CLIPVisionModelWithProjection", "peft"])
def test_swap_accepts_every_clip_model_class(kind, trained, aft_export):
    with quiet_transformers():
        if kind == "peft":
            from peft import LoraConfig, get_peft_model

            vision = get_peft_model(fine_tuned_tower(seed=3), LoraConfig(r=2, target_modules=["q_proj"]))
        else:
            vision = {"CLIPModel": CLIPModel, "CLIPVisionModel": CLIPVisionModel}.get(
                kind, CLIPVisionModelWithProjection
            ).from_pretrained(aft_export)
    llava = LlavaForConditionalGeneration(tiny_llava_config())
    swap_llava_vision_tower(llava, vision)
    expected = tower_weights(trained)
    assert all(torch.equal(v, expected[k]) for k, v in llava.model.vision_tower.state_dict().items())


def test_swap_into_llava_next_and_into_a_half_precision_llava(trained, aft_export):
    llava_next = LlavaNextForConditionalGeneration(tiny_llava_config(cls=LlavaNextConfig))
    swap_llava_vision_tower(llava_next, aft_export)
    expected = tower_weights(trained)
    assert all(torch.equal(v, expected[k]) for k, v in llava_next.model.vision_tower.state_dict().items())

    llava = LlavaForConditionalGeneration(tiny_llava_config()).to(torch.bfloat16)
    swap_llava_vision_tower(llava, aft_export)
    tower = llava.model.vision_tower.state_dict()
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, expected[k].to(torch.bfloat16)) for k, v in tower.items())


def test_mismatched_swap_raises_a_clear_error(aft_export):
    vision = clip_config("tiny").vision_config
    vision.image_size, vision.hidden_size = 32, 48  # e.g. a ViT-B/16 tower into a ViT-L/14-336 LLaVA
    llava = LlavaForConditionalGeneration(tiny_llava_config(vision))
    with pytest.raises(ValueError, match=r"image_size 64 \(yours\) vs 32 \(LLaVA's\)") as err:
        swap_llava_vision_tower(llava, aft_export)
    assert "hidden_size 32 (yours) vs 48" in str(err.value)
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        swap_llava_vision_tower(CLIPModel(clip_config("tiny")), aft_export)


def test_export_loads_as_the_original_llava_code_loads_its_tower(trained, aft_export):
    # LLaVA's CLIPVisionTower: CLIPImageProcessor.from_pretrained(name) (its PIL backend here) and
    # CLIPVisionModel.from_pretrained(name), then the hidden states of layer −2 (mm_vision_select_layer).
    assert json.loads((aft_export / "preprocessor_config.json").read_text())["crop_size"] == {"height": 64, "width": 64}
    image_processor = CLIPImageProcessorPil.from_pretrained(aft_export)
    with quiet_transformers():
        tower, info = CLIPVisionModel.from_pretrained(aft_export, output_loading_info=True)
    assert not info["missing_keys"]
    config, state = vision_tower_state(aft_export)
    assert config.image_size == 64 and all(torch.equal(v, tower_weights(trained)[k]) for k, v in state.items())
    pixels = image_processor(images=[torch.zeros(3, 64, 64).numpy().transpose(1, 2, 0)], return_tensors="pt")
    with torch.no_grad():
        got = tower.eval()(**pixels, output_hidden_states=True).hidden_states[-2]
        want = trained.vision_model(**pixels, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(got, want)


def test_llava_card_parses_and_names_no_local_path(aft_export, tmp_path):
    card = render_llava_card("llava-hf/llava-1.5-7b-hf", str(aft_export), repo_id="org/llava-aft", license="llama2")
    card.save(tmp_path / "README.md")
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.base_model == ["llava-hf/llava-1.5-7b-hf"]  # the local vision export is no Hub base
    assert data.pipeline_tag == "image-text-to-text" and "llava" in data.tags
    assert str(aft_export.parent) not in card.content and "clip-aft" in card.content
    assert private_strings(tmp_path) == []


def test_llava_recipe_end_to_end_with_a_dry_run_push(aft_export, llava_checkpoint, tmp_path, monkeypatch):
    from hf_clip_aft.release import hub

    FakeHfApi.calls, FakeHfApi.fail = [], {}
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    recipe = load_recipe("llava")
    out = tmp_path / "llava-aft"
    recipe.main(recipe.LlavaArguments(
        llava=str(llava_checkpoint), vision=str(aft_export), output=str(out), push_to_hub="org/llava-aft",
        dry_run=True,
    ))  # fmt: skip
    assert FakeHfApi.calls == []
    assert {"README.md", "config.json", "model.safetensors", "processor_config.json"} <= {p.name for p in out.iterdir()}
    reloaded = LlavaForConditionalGeneration.from_pretrained(out)
    assert torch.equal(reloaded.model.vision_tower.embeddings.patch_embedding.weight,
                       vision_tower_state(aft_export)[1]["embeddings.patch_embedding.weight"])  # fmt: skip
    assert private_strings(out) == []
