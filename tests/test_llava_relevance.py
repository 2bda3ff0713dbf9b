"""LLaVA relevance maps: the pure math on planted tensors, a tiny random LLaVA end to end, and the command."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from conftest import TINY_CLIP
from hf_clip_aft import swap_llava_vision_tower
from hf_clip_aft.cli import run_command
from hf_clip_aft.interpret.llava_relevance import (
    attention_to_tokens,
    check_llava_architecture,
    chefer_layer_relevance,
    image_token_positions,
    llava_prompt,
    llava_relevance,
    patch_relevance,
    propagate_row,
    to_patch_grid,
    word_token_indices,
)
from tiny_llava import tiny_llava_config, tiny_llava_with_processor

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    return tiny_llava_with_processor(TINY_CLIP)


def test_image_positions_come_from_the_token_id_wherever_they_are(llava):
    planted = torch.tensor([1, 9, 127, 127, 5, 127, 127, 8])  # not contiguous, not 576 long
    assert image_token_positions(planted, 127).tolist() == [2, 3, 5, 6]
    with pytest.raises(ValueError, match="No image token"):
        image_token_positions(torch.tensor([1, 2, 3]), 127)

    model, processor = llava
    ids = processor(images=IMAGE, text="a photo: <image> what is it?", return_tensors="pt")["input_ids"][0]
    positions = image_token_positions(ids, model.config.image_token_id)
    assert positions.numel() == 16 and positions[0] > 1  # 4 x 4 patches after some text
    assert (ids[positions] == model.config.image_token_id).all() and (ids == model.config.image_token_id).sum() == 16


def test_prompt_gets_the_image_token_and_the_chat_template(llava):
    _, processor = llava
    assert llava_prompt(processor, "what is it?") == "<image>\nwhat is it?"  # no chat template
    assert llava_prompt(processor, "see <image> here") == "see <image> here"
    processor.chat_template = (
        "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:"
    )
    try:
        assert llava_prompt(processor, "what is it?") == "USER: <image>\nwhat is it? ASSISTANT:"
    finally:
        processor.chat_template = None


def test_first_token_is_removed_and_the_rest_renormalised_after_head_averaging():
    heads = torch.tensor([[0.6, 0.2, 0.2], [0.2, 0.4, 0.4]])  # head mean [0.4, 0.3, 0.3]
    layer = torch.zeros(2, 3, 3)
    layer[:, 2] = heads
    other = torch.zeros(2, 3, 3)
    other[:, 2] = torch.tensor([0.5, 0.5, 0.0])
    rows = attention_to_tokens([layer, other], torch.tensor([2]))
    torch.testing.assert_close(rows, torch.tensor([[0.0, 0.75, 0.25]]))  # mean of [0, .5, .5] and [0, 1, 0]
    kept = attention_to_tokens([layer, other], torch.tensor([2]), drop_first_token=False)
    torch.testing.assert_close(kept, torch.tensor([[0.45, 0.4, 0.15]]))


def test_a_planted_attention_pattern_gives_a_map_peaking_at_that_patch():
    torch.manual_seed(1)
    n, grid = 30, (4, 4)
    positions = torch.tensor(list(range(3, 11)) + list(range(14, 22)))  # 16 image tokens in two runs
    target = 9  # image token 9 -> patch (2, 1)
    layers = []
    for _ in range(3):
        attention = torch.rand(4, n, n).tril().softmax(dim=-1)
        attention[:, 27] = 0.01
        attention[:, 27, 0] = 5.0  # a strong attention sink, removed by the method
        attention[:, 27, positions[target]] = 1.0
        layers.append(attention / attention.sum(dim=-1, keepdim=True))
    rows = attention_to_tokens(layers, torch.tensor([27]))
    maps = to_patch_grid(patch_relevance(rows[:, positions], first_patch_token=1), grid)
    assert maps.shape == (1, 4, 4)
    assert divmod(int(maps[0].argmax()), 4) == (2, 1)
    # Carried through an identity vision flow ("default" drops CLS), the map is unchanged.
    torch.testing.assert_close(patch_relevance(rows[:, positions], 1, torch.eye(17)), rows[:, positions])
    # "full" keeps CLS as image token 0: the patches are tokens 1..16.
    full = patch_relevance(torch.arange(17.0)[None], first_patch_token=0)
    torch.testing.assert_close(full, torch.arange(1.0, 17.0)[None])


def test_chefer_row_propagation_equals_the_full_relevance_product():
    torch.manual_seed(2)
    n = 12
    attentions = [torch.rand(3, n, n).tril().softmax(-1) for _ in range(4)]
    grads = [torch.randn(3, n, n) for _ in range(4)]
    cams = [chefer_layer_relevance(a, g) for a, g in zip(attentions, grads)]
    assert all((c >= 0).all() for c in cams)
    torch.testing.assert_close(cams[0], (grads[0] * attentions[0]).clamp(min=0).mean(0))
    relevance = torch.eye(n)
    for cam in cams:  # Chefer's rule 6, layer by layer
        relevance = relevance + cam @ relevance
    torch.testing.assert_close(propagate_row(torch.eye(n)[7], cams, residual=True), relevance[7])
    torch.testing.assert_close(propagate_row(torch.eye(n), cams, residual=True), relevance)


def test_word_tokens_are_found_by_their_text():
    pieces = ["The", " red", " cir", "cle", "."]
    assert word_token_indices(pieces, "circle") == [2, 3]
    assert word_token_indices(pieces, "Red") == [1]
    assert word_token_indices(pieces, "dog") == []


@pytest.mark.parametrize("method", ["attention", "relevancy"])
def test_relevance_on_a_tiny_llava_changes_no_weights(llava, method):
    model, processor = llava
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.config._attn_implementation != "eager"
    explanation = llava_relevance(model, processor, IMAGE, "what is this?", method=method, vision_weighting=True,
                                  max_new_tokens=3)  # fmt: skip
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert model.config._attn_implementation == model.config.vision_config._attn_implementation == "sdpa"
    tokens = len(explanation.token_ids)
    assert 1 <= tokens <= 3 and len(explanation.tokens) == tokens
    assert explanation.maps.shape == (tokens, 4, 4) and explanation.maps.dtype == torch.float32
    assert torch.isfinite(explanation.maps).all() and (explanation.maps >= 0).all() and explanation.maps.sum() > 0
    assert ((explanation.image_share > 0) & (explanation.image_share <= 1)).all()
    assert explanation.vision_weighting
    plain = llava_relevance(model, processor, IMAGE, "what is this?", method=method, max_new_tokens=3)
    assert plain.token_ids == explanation.token_ids and not torch.allclose(plain.maps, explanation.maps)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        llava_relevance(model, processor, IMAGE, "what is this?", max_new_tokens=0)


@pytest.mark.parametrize("method", ["attention", "relevancy"])
def test_relevance_runs_in_eval_mode_and_restores_the_mode(method):
    """A LLaVA with attention dropout (0.5 in the language and vision towers), handed over in train mode, gives the
    same map twice and is handed back in train mode."""
    torch.manual_seed(0)
    model, processor = tiny_llava_with_processor(TINY_CLIP)
    for module in model.modules():
        if hasattr(module, "attention_dropout"):  # the language model's attention
            module.attention_dropout = 0.5
        elif hasattr(module, "dropout") and isinstance(module.dropout, float):  # CLIP's attention
            module.dropout = 0.5
    model.train()
    first, second = (
        llava_relevance(model, processor, IMAGE, "what is this?", method=method, max_new_tokens=2) for _ in range(2)
    )
    assert first.token_ids == second.token_ids and torch.equal(first.maps, second.maps)
    assert all(module.training for module in model.modules())


def test_original_and_swapped_tower_differ_only_in_the_tower(llava):
    model, processor = llava
    torch.manual_seed(0)
    swapped, _ = tiny_llava_with_processor(TINY_CLIP)
    swapped.load_state_dict(model.state_dict())
    swap_llava_vision_tower(swapped, TINY_CLIP)
    original, new = model.state_dict(), swapped.state_dict()
    changed = {k for k in original if not torch.equal(original[k], new[k])}
    assert changed and all(k.startswith("model.vision_tower.") for k in changed)
    ours = llava_relevance(model, processor, IMAGE, "what is this?", max_new_tokens=2)
    theirs = llava_relevance(swapped, processor, IMAGE, "what is this?", max_new_tokens=2)
    assert not torch.allclose(ours.maps[0], theirs.maps[0])


def test_llava_next_is_refused_clearly():
    next_model = LlavaNextForConditionalGeneration(tiny_llava_config(cls=LlavaNextConfig))
    with pytest.raises(NotImplementedError, match="tiles the image.*LlavaForConditionalGeneration"):
        llava_relevance(next_model, None, IMAGE, "what is this?")
    with pytest.raises(NotImplementedError, match="anyres"):
        check_llava_architecture("LlavaNextForConditionalGeneration")
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration, got CLIPModel"):
        check_llava_architecture("CLIPModel")


def test_command_writes_answers_figures_and_localisation(llava, tmp_path):
    model, processor = llava
    folder = tmp_path / "tiny-llava"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    rows = ["file_name,mask_file_name"]
    for i in range(2):
        image = np.zeros((80, 80, 3), np.uint8)
        image[20:50, 10 + 20 * i : 40 + 20 * i] = (255, 0, 0)
        Image.fromarray(image).save(data / f"{i}.png")
        Image.fromarray((image[..., 0] > 0).astype(np.uint8)).save(data / f"{i}_mask.png")
        rows.append(f"{i}.png,{i}_mask.png")
    (data / "metadata.csv").write_text("\n".join(rows) + "\n")
    output = tmp_path / "maps"
    run_command("llava_explain", [
        "--llava", str(folder), "--vision", TINY_CLIP, "--images", str(tmp_path / "data"), "--output", str(output),
        "--max_new_tokens", "3", "--figure_tokens", "2", "--word", "zzz-not-there",
    ])  # fmt: skip
    results = json.loads((output / "results.json").read_text())
    assert results["schema"] == "hf_clip_aft.llava_explain/v1" and results["settings"]["mask_column"] == "mask"
    assert len(results["images"]) == 2
    for image in results["images"]:
        assert (output / image["figure"]).is_file()
        for tower in ("original", "aft"):
            entry = image[tower]
            assert entry["explained"] == "answer" and 1 <= len(entry["token_ids"]) <= 3
            assert all(0 <= entry[k] <= 1 for k in ("pointing_game", "energy_pointing_game", "top_k_iou", "gini"))
            assert len(entry["peak_patch"]) == 2 and 0 < entry["image_share"] <= 1
    for key, value in results["difference_aft_minus_original"].items():
        assert value == pytest.approx(results["mean"]["aft"][key] - results["mean"]["original"][key])
    with Image.open(output / "overview.png") as overview:
        assert overview.size == (3 * 128, overview.size[1]) and overview.size[1] > 2 * 128
    assert not [p for p in output.rglob(".*")]  # no temporary file left behind
