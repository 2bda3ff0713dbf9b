"""Export: the drop-in CLIPModel folder loads in every CLIP class and reproduces the trained model exactly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoProcessor, CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

from hf_clip_aft.model_configs import clip_config
from hf_clip_aft.modeling import encode_images, quiet_transformers
from hf_clip_aft.release.export import export_checkpoint, export_clip, validate_export

TINY = str(Path(__file__).resolve().parents[1] / "hf_clip_aft" / "assets" / "tiny-clip")
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def fine_tuned_tower(seed: int = 0) -> CLIPVisionModelWithProjection:
    """The tiny CLIP's vision tower with every weight moved, standing in for a trained one."""
    with quiet_transformers():
        tower = CLIPVisionModelWithProjection.from_pretrained(TINY)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return tower.eval()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def load_all(folder):
    with quiet_transformers():
        return {
            cls: cls.from_pretrained(folder, output_loading_info=True)
            for cls in (CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection)
        }


def test_export_loads_in_every_clip_class_with_the_trained_embeddings(tmp_path, pixels):
    trained = fine_tuned_tower()
    out = export_clip(trained, TINY, tmp_path / "export")
    validate_export(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json",
        "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    loaded = load_all(out)
    text_side = ("text_model.", "text_projection.", "logit_scale")
    assert not loaded[CLIPModel][1]["missing_keys"] and not loaded[CLIPModel][1]["unexpected_keys"]
    with_projection_head = (*text_side, "visual_projection.")
    for cls, skippable in ((CLIPVisionModelWithProjection, text_side), (CLIPVisionModel, with_projection_head)):
        info = loaded[cls][1]
        assert not info["missing_keys"], cls
        assert info["unexpected_keys"] and all(k.startswith(skippable) for k in info["unexpected_keys"]), cls

    clip, vision_proj, vision = (
        loaded[c][0].eval() for c in (CLIPModel, CLIPVisionModelWithProjection, CLIPVisionModel)
    )
    expected = encode_images(trained, pixels, MEAN, STD, normalize=False)
    assert torch.equal(encode_images(clip, pixels, MEAN, STD, normalize=False), expected)
    assert torch.equal(encode_images(vision_proj, pixels, MEAN, STD, normalize=False), expected)
    with torch.no_grad():  # what LLaVA reads: hidden layer −2 of the bare tower
        want = trained.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        got = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(got, want)

    with quiet_transformers():
        base = CLIPModel.from_pretrained(TINY)
    for key, value in base.state_dict().items():  # the text side is the base's, untouched
        if key.startswith(("text_model.", "text_projection.", "logit_scale")):
            assert torch.equal(clip.state_dict()[key], value), key
    assert AutoProcessor.from_pretrained(out).tokenizer is not None


def test_lora_export_is_merged_loads_without_peft_and_keeps_the_adapter(tmp_path, pixels):
    with quiet_transformers():
        tower = CLIPVisionModelWithProjection.from_pretrained(TINY)
    lora = get_peft_model(tower, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).eval()
    with torch.no_grad():  # LoRA's B starts at zero: make the adapter do something
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    expected = encode_images(lora, pixels, MEAN, STD, normalize=False)
    with lora.disable_adapter():
        assert not torch.allclose(encode_images(lora, pixels, MEAN, STD, normalize=False), expected, atol=1e-4)

    out = export_clip(lora, TINY, tmp_path / "export")
    validate_export(out)
    assert any("lora_B" in n for n, _ in lora.named_parameters()), "the export must not merge the trainer's model"
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] is None  # a local base is never named
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "adapter" / "README.md").exists()

    # A fresh interpreter in which peft cannot be imported loads the merged model.
    torch.save({"pixels": pixels, "expected": expected}, tmp_path / "expected.pt")
    script = f"""
import sys, torch
sys.modules["peft"] = None
from transformers import CLIPModel
from hf_clip_aft.modeling import encode_images
data = torch.load({str(tmp_path / "expected.pt")!r})
clip = CLIPModel.from_pretrained({str(out)!r}).eval()
got = encode_images(clip, data["pixels"], {MEAN}, {STD}, normalize=False)
assert torch.allclose(got, data["expected"], atol=1e-5), (got - data["expected"]).abs().max()
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]

    # Re-exporting a plain tower into the same folder leaves no stale adapter behind.
    export_clip(fine_tuned_tower(), TINY, out)
    assert not (out / "adapter").exists()


def test_export_checkpoint_handles_vision_only_and_adapter_checkpoints(tmp_path, pixels):
    trained = fine_tuned_tower()
    trained.save_pretrained(tmp_path / "checkpoint-1")  # what a full fine-tuning run checkpoints
    with pytest.raises(ValueError, match="base_model"):
        export_checkpoint(tmp_path / "checkpoint-1", tmp_path / "a")
    out = export_checkpoint(tmp_path / "checkpoint-1", tmp_path / "a", base_model=TINY)
    validate_export(out)
    with quiet_transformers():
        clip = CLIPModel.from_pretrained(out).eval()
    expected = encode_images(trained, pixels, MEAN, STD, normalize=False)
    assert torch.equal(encode_images(clip, pixels, MEAN, STD, normalize=False), expected)

    with quiet_transformers():
        tower = CLIPVisionModelWithProjection.from_pretrained(TINY)
    lora = get_peft_model(tower, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "checkpoint-2")  # what a LoRA run checkpoints
    out = export_checkpoint(tmp_path / "checkpoint-2", tmp_path / "b", base_model=TINY)
    validate_export(out)
    assert (out / "adapter" / "adapter_config.json").is_file()

    # An export folder among training state: only the drop-in files (and its adapter) come out.
    (out / "checkpoint-3").mkdir()
    (out / "trainer_state.json").write_text("{}")
    again = export_checkpoint(out, tmp_path / "c")
    validate_export(again)
    assert (again / "adapter" / "adapter_config.json").is_file() and not (again / "trainer_state.json").exists()


def test_export_rejects_a_tower_of_another_architecture(tmp_path):
    config = clip_config("tiny").vision_config
    config.image_size = 32
    with pytest.raises(ValueError, match="image_size"):
        export_clip(CLIPVisionModelWithProjection(config), TINY, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_validate_export_names_training_state_and_local_paths(tmp_path):
    out = export_clip(fine_tuned_tower(), TINY, tmp_path / "export")
    (out / "training_args.bin").write_bytes(b"pickle")
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "name_or_path": TINY}))
    with pytest.raises(ValueError) as err:
        validate_export(out)
    assert "training_args.bin" in str(err.value) and TINY in str(err.value)
