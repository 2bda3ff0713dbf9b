"""Network dissection: the similarity math on planted answers, Network Dissection's IoU on hand-made masks, the hooks
against a manual forward, and the command end to end on the tiny model and the shipped photos."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from hf_clip_aft.cli import parse_args
from hf_clip_aft.commands import dissect as dissect_command
from hf_clip_aft.interpret import dissect as d
from hf_clip_aft.model_configs import clip_config

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


def test_the_swapped_marginal_is_a_masked_logsumexp():
    """A null unit replaces a layer unit in log p(m): the replaced row is left out exactly, even when it dominates a
    concept (there "total - own" would cancel to nothing), and the new unit is added with logaddexp."""
    conditional = torch.tensor([[0.0, -3.0], [-60.0, -2.0], [-61.0, -2.5]], dtype=torch.float64)  # unit 0 dominates m=0
    marginal = d.LayerMarginal(conditional)
    replaces = torch.tensor([0, 1, 2, 0])
    new = torch.tensor([[-70.0, -1.0], [-5.0, -9.0], [-0.5, -2.0], [-80.0, -80.0]], dtype=torch.float64)
    brute = []
    for r, row in zip(replaces.tolist(), new):
        masked = conditional.clone()
        masked[r] = -math.inf
        brute.append(torch.logaddexp(torch.logsumexp(masked, dim=0), row) - math.log(3))
    swapped = marginal.log_marginal_swapped(replaces, new)
    assert torch.allclose(swapped, torch.stack(brute), rtol=0, atol=1e-12)
    # Unit 0 swapped for a weak unit: p(m=0) is the other units' (about -60 - log 3), not the rounding residue.
    expected = math.log(math.exp(-60) + math.exp(-61) + math.exp(-70)) - math.log(3)
    assert swapped[0, 0].item() == pytest.approx(expected, rel=1e-12)


def sharp_layer(orphan_images: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """10 units, unit u firing on the 10 images of concept u, plus `orphan_images` images of an 11th concept no unit
    fires on; P one-hot (cosine 1 vs 0), so soft-WPMI's softmax at temperature 10 is near-hard."""
    concept = torch.cat([torch.arange(100) % 10, torch.full((orphan_images,), 10)])
    image_concept = torch.nn.functional.one_hot(concept, 11).float()
    jitter = 1e-3 * torch.rand(len(concept), generator=torch.Generator().manual_seed(0))
    return torch.stack([(concept == u).float() + jitter for u in range(10)], dim=1), image_concept


@pytest.mark.parametrize("name", list(d.SIMILARITY_FUNCTIONS))
def test_a_saturated_null_still_labels_the_planted_units(name):
    """Shuffled units whose top images hold several orphan-concept images own that concept's whole mass: their
    soft-WPMI reaches the cap log U, and so does the null's 95th percentile. The planted units, at the cap too,
    are still labelled (ordered by log p(m | B_k)); so they are with WPMI and cos³, which have no cap."""
    activations, image_concept = sharp_layer()
    args = d.DissectionArguments(similarity=name, top_k=10, null_units=1000, figure_images=3)
    summary, units = d.clip_dissect_layer(activations, image_concept, [f"c{i}" for i in range(11)], range(200), args)
    assert [u["concept"] for u in units] == [f"c{i}" for i in range(10)]
    assert [u["labelled"] for u in units] == [True] * 10
    if name == "soft_wpmi":
        scores = d.layer_scores(name, activations, image_concept, 10)
        test = d.null_test(scores, activations, 1000, 0.95, torch.Generator().manual_seed(0))
        assert test.threshold == pytest.approx(math.log(10), rel=1e-6) and test.conditional < -1
        assert summary["threshold"] == pytest.approx(math.log(10), rel=1e-6)


def test_float32_log_probabilities_would_change_labels():
    """Why the log-probabilities are float64: soft-WPMI sums 100 log terms of a few nats each, so float32 is off by
    about 1e-4 nats, enough to swap near-synonym concepts (text embeddings 1e-4 apart, like "cat" / "cats" in a
    20k vocabulary) for some units. The float64 path is the formula written out (test above)."""
    generator = torch.Generator().manual_seed(0)
    images, base = torch.randn(300, 32, generator=generator), torch.randn(50, 32, generator=generator)
    text = torch.cat([base, base + 1e-4 * torch.randn(50, 32, generator=generator)])
    image_concept = d.image_concept_similarity(images, text)
    activations = torch.randn(300, 100, generator=generator)
    ours = d.soft_wpmi(activations, image_concept, top_k=100)
    probs = torch.softmax(d.SOFT_WPMI_TEMPERATURE * image_concept, dim=1)  # the same formula in float32
    top = torch.topk(activations, 100, dim=0).indices
    weights = d.rank_weights(100).float().view(-1, 1, 1)
    conditional = torch.log(1 + weights * (probs[top] - 1) + d.MIN_PROB).sum(dim=0)
    single = conditional - (torch.logsumexp(conditional, dim=0, keepdim=True) - math.log(100))
    assert (ours - single).abs().max().item() > 1e-5
    assert (ours.argmax(dim=1) != single.argmax(dim=1)).sum().item() > 0


def test_the_scatter_tally_equals_a_one_hot_product():
    """The tally's scatter-adds over labelled pixels equal the one-hot matrix product they replace, channel by
    channel, and the union counts only the images a category annotates."""
    generator = torch.Generator().manual_seed(3)
    maps = torch.rand(5, 6, 3, 3, generator=generator)
    thresholds = torch.full((6,), 0.6)
    labels = torch.randint(0, 7, (5, 2, 9, 9), generator=generator)  # two channels per image, ids 0 … 6
    tally = d.ConceptTally(6)
    intersections = torch.zeros(6, 7, dtype=torch.float64)
    active = torch.zeros(6, dtype=torch.float64)
    labelled = torch.zeros(7, dtype=torch.float64)
    for i in range(4):  # image 4 is not annotated in this category
        masks = d.unit_masks(maps[i], thresholds, 9)
        tally.update(masks, labels[i].flatten(1))
        active += masks.sum(dim=1)
        for channel in labels[i]:
            onehot = torch.nn.functional.one_hot(channel.flatten(), 7).double()
            onehot[:, 0] = 0
            intersections += masks.double() @ onehot
            labelled += onehot.sum(dim=0)
    assert torch.equal(tally.intersections, intersections)
    assert torch.equal(tally.active, active) and torch.equal(tally.labelled, labelled)
    assert torch.equal(tally.iou(), d.dissection_iou(intersections, active, labelled))


def test_units_whose_iou_is_zero_everywhere_get_no_concept():
    tally = d.ConceptTally(2, 3)
    tally.update(torch.tensor([[True, False, False], [False, False, True]]), torch.tensor([[1, 2, 0]]))
    summary, units = d.describe_detectors({"object": tally}, {"object": ["-", "cat", "dog"]}, {"object": None}, 0.04)
    assert units[0] == {"unit": 0, "concept": "cat", "category": "object", "iou": 1.0, "detector": True}
    assert units[1] == {"unit": 1, "concept": None, "category": None, "iou": 0.0, "detector": False}
    assert summary["detectors"] == 1 and summary["unique_detector_concepts"] == 1


def test_streamed_thresholds_are_within_one_bin_of_torch_quantile():
    """The sketch's error against the exact quantile stays below one bin width, also after its range grew: on this
    stream (3,000 maps of 4 x 4 cells, the scale growing 8-fold) the largest error is below 0.1% of each unit's
    range with the default 2,048 bins."""
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(300, 5, 4, 4, generator=generator) * (1 + i) ** 0.9 + i for i in range(10)]
    maps = torch.cat(batches)
    sketch = d.QuantileSketch(5)
    for batch in batches:
        sketch.update(batch)
    values = maps.transpose(0, 1).reshape(5, -1).double()
    spread = values.amax(dim=1) - values.amin(dim=1)
    for quantile in (0.005, 0.04, 0.5):
        expected = torch.quantile(values, 1 - quantile, dim=1)
        error = (sketch.quantile(1 - quantile) - expected).abs()
        assert (error <= sketch.width).all()
        assert (error / spread).max().item() < 1e-3
    error = (d.quantile_thresholds(maps, 0.005).double() - torch.quantile(values, 0.995, dim=1)).abs()
    assert (error <= 2 * spread / (d.QUANTILE_BINS - 2)).all()  # the documented bound, whatever the batches
    with pytest.raises(ValueError, match="quantile"):
        d.quantile_thresholds(maps, 1.5)


def test_the_sketch_memory_does_not_grow_with_the_probe_set():
    sketch = d.QuantileSketch(3, bins=64)
    sizes = set()
    for i in range(20):
        sketch.update(torch.randn(50, 3, 2, 2) * (i + 1))
        sizes.add(tuple(sketch.counts.shape))
    assert sizes == {(3, 64)} and sketch.counts.sum(dim=1).tolist() == [20 * 50 * 4] * 3
    constant = d.QuantileSketch(1, bins=8)
    constant.update(torch.full((4, 1, 2, 2), 2.5))
    assert constant.quantile(0.9).item() == pytest.approx(2.5)


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


def test_concept_files_and_the_default_vocabulary(tmp_path, caplog):
    path = tmp_path / "concepts.txt"
    path.write_text("dog\n\n cat \ndog\n")
    with caplog.at_level("WARNING"):
        assert d.load_concepts(path) == ["dog", "cat"]
    assert "concepts.txt lists 1 concepts more than once (dog)" in caplog.text
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no concepts"):
        d.load_concepts(path)
    path.write_bytes("café\nnaïve\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"concepts\.txt is not UTF-8 text .* save the concept file as UTF-8"):
        d.load_concepts(path)
    pytest.importorskip("wordfreq")
    words = d.default_vocabulary(200)
    assert len(words) == 200 and len(set(words)) == 200
    assert all(w.isalpha() and len(w) >= 3 for w in words)


def test_the_command_writes_valid_outputs_offline(tmp_path, aft_stand_in):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("cat\nhorse\nclock\nrocket\nstars\ncoffee\n")
    argv = [
        *("--models", TINY, aft_stand_in),
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


def test_an_unreadable_probe_image_is_skipped_logged_and_counted(tmp_path, caplog):
    probe = tmp_path / "probe"
    shutil.copytree(PHOTOS, probe)
    (probe / "broken.jpg").write_bytes(b"not a JPEG")
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("cat\nclock\n")
    argv = [
        *("--models", TINY, "--probe_dataset", str(probe), "--concepts", str(concepts), "--layers", "0"),
        *("--top_k", "2", "--null_units", "20", "--device", "cpu", "--output", str(tmp_path / "out")),
    ]
    (args,) = parse_args(dissect_command.ARGUMENTS, argv)
    with caplog.at_level("WARNING"):
        results = d.dissect_models(args)
    assert results["dataset"]["num_images"] == 8 and results["dataset"]["skipped_images"] == 1
    assert "Skipping an unreadable probe image" in caplog.text and "broken.jpg" in caplog.text
    assert "1 unreadable probe images were skipped" in (tmp_path / "out" / "summary.md").read_text()


def test_units_are_read_in_eval_mode_and_the_mode_is_restored():
    config = clip_config("tiny")
    config.vision_config.attention_dropout = 0.5
    torch.manual_seed(0)
    model = CLIPModel(config).train()
    processor = CLIPProcessor.from_pretrained(TINY).image_processor
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    first, _ = d.unit_tokens(model, pixels, processor, [1], "mlp")
    second, _ = d.unit_tokens(model, pixels, processor, [1], "mlp")
    assert model.training and torch.equal(first[1], second[1])


def test_the_figure_shows_units_with_different_top_images():
    """Units whose top images are the same set get near-equal scores from those images (only their order differs),
    so the highest-scored units often share one set; the figure skips repeats to show each unit's own images."""
    units = [
        {"unit": 0, "concept": "fur", "similarity": 1.3, "labelled": True, "top_images": [4, 3, 7]},
        {"unit": 1, "concept": "face", "similarity": 1.27, "labelled": True, "top_images": [4, 7, 3]},
        {"unit": 2, "concept": "clock", "similarity": 0.9, "labelled": False, "top_images": [1, 2, 3]},
        {"unit": 3, "concept": None, "similarity": None, "labelled": False, "top_images": [5, 6, 0]},
        {"unit": 4, "concept": "sky", "similarity": 1.1, "labelled": True, "top_images": [0, 1, 2]},
    ]
    shown = d.figure_units({"units": units}, count=3, images=3)
    assert [u["unit"] for u in shown] == [0, 4, 2]
