"""Network dissection: the similarity math on planted answers, Network Dissection's IoU on hand-made masks, the hooks
against a manual forward, and the command end to end on the tiny model and the shipped photos."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from hf_clip_aft.cli import parse_args
from hf_clip_aft.commands import dissect as dissect_command
from hf_clip_aft.interpret import dissect as d

TINY = str(Path(__file__).resolve().parents[1] / "hf_clip_aft" / "assets" / "tiny-clip")
PHOTOS = str(Path(__file__).resolve().parents[1] / "hf_clip_aft" / "assets" / "photos")
CONCEPTS = 4
PER_CONCEPT = 10


def planted() -> tuple[torch.Tensor, torch.Tensor]:
    """P for 40 images, image i showing concept i % 4 (cosine 0.3 vs 0.1), and 4 units: unit 0 fires exactly on the
    images of concept 2, unit 1 on those of concept 0, unit 2 is noise, unit 3 is constant."""
    concept = torch.arange(CONCEPTS * PER_CONCEPT) % CONCEPTS
    image_concept = torch.where(torch.nn.functional.one_hot(concept, CONCEPTS).bool(), 0.3, 0.1)
    generator = torch.Generator().manual_seed(0)
    jitter = 1e-3 * torch.rand(len(concept), generator=generator)  # distinct values: a well-defined top-k
    activations = torch.stack(
        [
            (concept == 2).float() + jitter,
            (concept == 0).float() + jitter,
            torch.rand(len(concept), generator=generator),
            torch.full((len(concept),), 0.7),
        ],
        dim=1,
    )
    return activations, image_concept


def test_rank_weights_fall_linearly_from_the_published_start():
    weights = d.rank_weights(100)
    assert weights[0].item() == pytest.approx(0.998)
    assert weights[-1].item() == pytest.approx(0.998 - 0.99 * (0.998 - 0.97))
    assert torch.allclose(weights.diff(), torch.full((99,), -(0.998 - 0.97) / 100, dtype=torch.float64))


def test_soft_wpmi_matches_the_formula_written_out():
    activations, image_concept = planted()
    activations = activations[:, :3]  # a constant unit's top-k is a tie that any order may break
    k, unit, concept = 5, 2, 1
    sim = d.soft_wpmi(activations, image_concept, top_k=k)
    probs = torch.softmax(d.SOFT_WPMI_TEMPERATURE * image_concept.double(), dim=1)

    def log_conditional(u: int, m: int) -> float:
        order = sorted(range(len(activations)), key=lambda i: -activations[i, u].item())[:k]
        return sum(
            math.log(1 + (0.998 - r / k * (0.998 - 0.97)) * (probs[i, m].item() - 1) + d.MIN_PROB)
            for r, i in enumerate(order)
        )

    marginal = math.log(sum(math.exp(log_conditional(u, concept)) for u in range(3)) / 3)
    expected = log_conditional(unit, concept) - d.SOFT_WPMI_LAMBDA * marginal
    assert sim[unit, concept].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", list(d.SIMILARITY_FUNCTIONS))
def test_a_unit_firing_on_a_concept_is_labelled_with_it(name):
    activations, image_concept = planted()
    sim = d.similarity_matrix(name, activations, image_concept, top_k=PER_CONCEPT)
    values, indices = d.best_concepts(sim, d.constant_units(activations))
    assert indices[:2].tolist() == [2, 0]
    # The planted unit is the one the concept describes best, and its concept beats every other for it.
    assert sim[:, 2].argmax().item() == 0 and sim[:, 0].argmax().item() == 1
    assert indices[3].item() == -1 and math.isnan(values[3].item())  # the constant unit has no concept


def test_a_unit_in_its_own_place_reproduces_the_published_marginal():
    activations, image_concept = planted()
    for name in d.SIMILARITY_FUNCTIONS:
        published = d.similarity_matrix(name, activations, image_concept, top_k=5)
        in_place = d.similarity_matrix(name, activations, image_concept, 5, reference=(activations, torch.arange(4)))
        assert torch.allclose(published, in_place, atol=1e-5)


def test_the_null_labels_planted_units_and_not_the_constant_one():
    activations, image_concept = planted()
    noise = torch.rand(len(activations), 20, generator=torch.Generator().manual_seed(5))
    activations = torch.cat([activations, noise], dim=1)  # a layer of 24 units: the null needs a few
    args = d.DissectionArguments(top_k=PER_CONCEPT, null_units=300, figure_images=3)
    summary, units = d.clip_dissect_layer(activations, image_concept, list("abcd"), list(range(100, 140)), args)
    assert [u["labelled"] for u in units[:2]] == [True, True]
    assert units[0]["concept"] == "c" and units[1]["concept"] == "a"
    assert units[3] == {
        "unit": 3,
        "concept": None,
        "similarity": None,
        "labelled": False,
        "top_images": units[3]["top_images"],
    }
    assert units[0]["top_images"] == [100 + i for i in torch.topk(activations[:, 0], 3).indices.tolist()]
    assert summary["constant_units"] == 1 and summary["unique_concepts"] >= 2
    assert summary["threshold"] < min(units[0]["similarity"], units[1]["similarity"])


def test_quantile_thresholds_match_torch_quantile():
    maps = torch.randn(7, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    for quantile in (0.005, 0.04, 0.5):
        expected = torch.quantile(maps.transpose(0, 1).reshape(3, -1), 1 - quantile, dim=1)
        assert torch.allclose(d.quantile_thresholds(maps, quantile), expected, atol=1e-6)


def test_iou_is_one_for_a_map_equal_to_the_mask_and_counted_over_the_dataset():
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[0, :2, :2] = 1  # concept 1: 4 pixels in image 0, 2 in image 1
    labels[1, 3, :2] = 1
    labels[1, 0, 3] = 2  # concept 2: one pixel
    on_concept = (labels == 1).float()
    partial = torch.zeros(2, 4, 4)
    partial[0, 0, :] = 1  # 2 of concept 1's pixels and 2 others
    maps = torch.stack([on_concept, 1 - on_concept, partial], dim=1)  # (N=2, U=3, 4, 4)
    iou = d.dissection_iou(*d.dissection_tally(maps, torch.full((3,), 0.5), labels, num_labels=3))
    assert iou[0, 1].item() == 1.0
    assert iou[1, 1].item() == 0.0
    assert iou[2, 1].item() == pytest.approx(2 / (4 + 6 - 2))
    assert iou[:, 0].eq(0).all()  # label 0 is "unlabelled"


def test_residual_hooks_equal_the_hidden_states():
    model = CLIPModel.from_pretrained(TINY).eval()
    processor = CLIPProcessor.from_pretrained(TINY).image_processor
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tokens, embeds = d.unit_tokens(model, pixels, processor, [0, -1], "residual")
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=(pixels - mean) / std, output_hidden_states=True).hidden_states
    assert sorted(tokens) == [0, 1] and embeds.shape == (3, 16)
    for layer in (0, 1):
        assert tokens[layer].shape == (3, 1 + 16, 32)
        assert torch.allclose(tokens[layer], hidden[layer + 1], atol=1e-6)


def test_mlp_hooks_equal_a_manual_forward_of_the_block():
    model = CLIPModel.from_pretrained(TINY).eval()
    processor = CLIPProcessor.from_pretrained(TINY).image_processor
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tokens, _ = d.unit_tokens(model, pixels, processor, [1], "mlp")
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    block = model.vision_model.encoder.layers[1]
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=(pixels - mean) / std, output_hidden_states=True).hidden_states
        attended = hidden[1] + block.self_attn(block.layer_norm1(hidden[1]))[0]
        neurons = block.mlp.activation_fn(block.mlp.fc1(block.layer_norm2(attended)))
        assert tokens[1].shape == (2, 17, 128)
        assert torch.allclose(tokens[1], neurons, atol=1e-5)
        assert torch.allclose(attended + block.mlp.fc2(tokens[1]), hidden[2], atol=1e-5)


def test_summaries_and_patch_grid_follow_the_token_layout():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)  # CLS + a 2 x 2 grid, 3 units
    assert torch.equal(d.summarize_tokens(tokens, "cls"), tokens[:, 0])
    assert torch.equal(d.summarize_tokens(tokens, "mean"), tokens[:, 1:].mean(dim=1))
    grid = d.patch_grid(tokens)
    assert grid.shape == (2, 3, 2, 2) and grid[1, 2, 1, 0].item() == tokens[1, 3, 2].item()  # row 1, column 0
    with pytest.raises(ValueError, match="square"):
        d.patch_grid(tokens[:, :4])


def test_a_planted_colour_unit_is_found_by_network_dissection():
    """A hook makes residual channel 0 of block 0 the redness of each patch; red squares are the concept masks."""
    model = CLIPModel.from_pretrained(TINY).eval()
    processor = CLIPProcessor.from_pretrained(TINY).image_processor
    generator = torch.Generator().manual_seed(0)
    images, labels = [], []
    for _ in range(6):
        pixels = torch.rand(3, 64, 64, generator=generator) * 0.5
        label = torch.zeros(64, 64, dtype=torch.long)
        row, col = (torch.randint(0, 3, (2,), generator=generator) * 16).tolist()
        pixels[:, row : row + 16, col : col + 16] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
        label[row : row + 16, col : col + 16] = 1
        images.append(pixels)
        labels.append(label)
    pixels = torch.stack(images)
    redness = (pixels[:, 0] - pixels[:, 1:].mean(dim=1)).unfold(1, 16, 16).unfold(2, 16, 16).mean((-1, -2))

    def plant(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[:, 1:, 0] = 10 * redness.flatten(1)
        return output

    handle = model.vision_model.encoder.layers[0].register_forward_hook(plant)
    try:
        tokens, _ = d.unit_tokens(model, pixels, processor, [0], "residual")
    finally:
        handle.remove()
    args = d.DissectionArguments(quantile=1 / 16)  # one patch in 16 is red
    patch_labels = torch.stack(labels)[:, ::16, ::16]  # the squares sit on the patch grid: labels at its resolution
    summary, units = d.network_dissection_layer(
        d.patch_grid(tokens[0]), {"colour": patch_labels}, {"colour": ["none", "red"]}, args
    )
    assert units[0] == {"unit": 0, "concept": "red", "category": "colour", "iou": 1.0, "detector": True}
    assert summary["detectors_per_category"]["colour"] >= 1


def test_label_maps_follow_the_image_geometry_and_keep_their_ids():
    processor = CLIPProcessor.from_pretrained(TINY).image_processor
    label = torch.zeros(64, 128, dtype=torch.long)
    label[:, 64:] = 300  # ids above 255 survive (RGB-encoded through the processor)
    out = d.label_maps_to_tensor([label.numpy()], processor, size=32)
    assert out.shape == (1, 32, 32) and set(out.unique().tolist()) == {0, 300}
    assert out[0, :, :16].eq(0).all() and out[0, :, 16:].eq(300).all()  # centre crop keeps the middle, split in half


def test_concept_files_and_the_default_vocabulary(tmp_path):
    path = tmp_path / "concepts.txt"
    path.write_text("dog\n\n cat \ndog\n")
    assert d.load_concepts(path) == ["dog", "cat"]
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no concepts"):
        d.load_concepts(path)
    pytest.importorskip("wordfreq")
    words = d.default_vocabulary(200)
    assert len(words) == 200 and len(set(words)) == 200
    assert all(w.isalpha() and len(w) >= 3 for w in words)


def test_the_command_writes_valid_outputs_offline(tmp_path):
    # A second model: the tiny CLIP with a perturbed vision tower stands in for the AFT model.
    other = CLIPModel.from_pretrained(TINY)
    with torch.no_grad():
        for parameter in other.vision_model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    other.save_pretrained(tmp_path / "other")
    CLIPProcessor.from_pretrained(TINY).save_pretrained(tmp_path / "other")
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("cat\nhorse\nclock\nrocket\nstars\ncoffee\n")
    argv = [
        *("--models", TINY, str(tmp_path / "other")),
        *("--probe_dataset", PHOTOS, "--concepts", str(concepts), "--layers", "0", "-1"),
        *("--top_k", "3", "--null_units", "50", "--device", "cpu", "--output", str(tmp_path / "out")),
    ]
    (args,) = parse_args(dissect_command.ARGUMENTS, argv)
    dissect_command.main(args)
    results = d.load_dissection(tmp_path / "out")
    assert results["schema"] == d.SCHEMA and results["dataset"]["num_images"] == 8
    assert [(e["model"], e["layer"]) for e in results["layers"]] == [
        (m, layer) for m in args.models for layer in (0, 1)
    ]
    assert all(len(e["units"]) == 128 for e in results["layers"])
    assert results["settings"]["top_k"] == 3 and results["settings"]["dissector"] == TINY
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| Δ |" in summary and "labelled_fraction" in summary
    assert Image.open(tmp_path / "out" / "top_images.png").size[0] > 0
    broken = json.loads((tmp_path / "out" / "results.json").read_text())
    del broken["layers"][0]["units"][0]["concept"]
    with pytest.raises(ValueError, match=r"layers\[0\]\.units\[0\]"):
        d.validate_dissection(broken)
