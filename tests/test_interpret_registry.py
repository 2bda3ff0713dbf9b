"""The registries of map methods, metrics and metric-group scorers: an entry is all a new method or group needs."""

import dataclasses
import os

import pytest
import torch
from PIL import Image

from hf_clip_aft.interpret import registry
from hf_clip_aft.interpret.figures import _method_label
from hf_clip_aft.interpret.registry import (
    TASK_SEGMENTATION,
    TASK_ZERO_SHOT,
    MapMethod,
    Metric,
    Score,
    Scorer,
    register_map_method,
    register_metric,
    register_scorer,
    result_entry,
)
from hf_clip_aft.interpret.results import load_results, summary_markdown
from hf_clip_aft.interpret.suite import EvaluationArguments, run_evaluation, write_outputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "hf_clip_aft", "assets", "tiny-clip")
PHOTOS = os.path.join(REPO, "hf_clip_aft", "assets", "photos")
RUN = dict(models=[TINY], dataset=PHOTOS, split="train", limit=3, batch_size=2, device="cpu", grid_images=2)


@pytest.fixture
def clean_registries():
    """Whatever a test registers is removed afterwards."""
    saved = [dict(table) for table in (registry.MAP_METHODS, registry.METRICS, registry.SCORERS)]
    yield
    for table, before in zip((registry.MAP_METHODS, registry.METRICS, registry.SCORERS), saved, strict=True):
        table.clear()
        table.update(before)


def _left_half(model, pixels, text_embeds, *, image_processor, **options):
    """A map that is 1 on the left half of the image, 0 elsewhere."""
    maps = torch.zeros(pixels.shape[0], *pixels.shape[-2:])
    maps[..., : pixels.shape[-1] // 2] = 1.0
    return maps


def _class_halves(model, pixels, class_embeds, *, image_processor, **options):
    """Dense maps: class 0 on the left half, every other class on the right half."""
    left = _left_half(model, pixels, None, image_processor=image_processor)
    return torch.stack([left if c == 0 else 1 - left for c in range(class_embeds.shape[0])], dim=1)


def test_a_registered_map_method_reaches_the_arguments_the_summary_and_the_grid(clean_registries, tmp_path):
    register_map_method(MapMethod("left_half", "Left half", "training-free", "none", "test map", _left_half))
    assert "left_half" in EvaluationArguments(**RUN).saliency_methods()  # 'all': every method with default=True
    args = EvaluationArguments(**RUN, metrics=["sparsity"], methods=["left_half", "gradcam"], output=str(tmp_path))
    args.check()
    results, figure = run_evaluation(args)
    gini = {r["method"]: r["value"] for r in results["results"] if r["metric"] == "gini"}
    # Half the pixels carry all the mass: Gini = 1 - 2 * (1/2) * mean weight of the top half = 1/2.
    assert gini["left_half"] == pytest.approx(0.5, abs=1e-3) and "gradcam" in gini
    write_outputs(results, figure, str(tmp_path), args.saliency_methods())
    assert "| gini ↑ | left_half |" in summary_markdown(load_results(tmp_path))
    assert Image.open(tmp_path / "saliency_grid.png").width == 96 * (1 + 2)
    assert _method_label("left_half") == "Left half"
    with pytest.raises(ValueError, match="Unknown saliency methods"):
        EvaluationArguments(**RUN, methods=["right_half"]).check()


def test_a_registered_scorer_is_a_new_metric_group(clean_registries):
    register_metric(Metric("images_seen", "counting", TASK_ZERO_SHOT, True, "1 per image (test)"))

    @register_scorer
    class CountingScorer(Scorer):
        group = "counting"
        default = False
        uses_maps = False

        def update(self, batch):
            return [Score("images_seen", torch.ones(len(batch.labels)), {"unit": "image"})]

    assert "counting" not in EvaluationArguments(**RUN).metric_groups()  # opt-in: not in 'all'
    args = EvaluationArguments(**RUN, metrics=["all", "counting"])
    assert args.metric_groups()[-1] == "counting"
    assert args.saliency_methods()  # the default groups still use maps
    results, _ = run_evaluation(dataclasses.replace(args, metrics=["counting"]))
    (entry,) = results["results"]
    assert entry["task"] == TASK_ZERO_SHOT and entry["method"] is None
    assert entry["value"] == 1.0 and entry["settings"] == {"unit": "image", "num_images": 3}


def test_a_dataset_level_scorer_reads_dense_maps_and_reports_after_the_last_batch(clean_registries):
    register_map_method(
        MapMethod("halves", "Halves", "training-free", "none", "test map", _left_half, dense_fn=_class_halves)
    )
    register_metric(Metric("left_share", "dense_test", TASK_SEGMENTATION, True, "share of pixels won by class 0"))

    @register_scorer
    class DenseScorer(Scorer):
        """Counts, over the whole dataset, the pixels whose arg-max class is 0 (the shape of an mIoU scorer)."""

        group = "dense_test"
        default = False

        def __init__(self, run):
            super().__init__(run)
            self.counts = {}

        def update(self, batch):
            dense = batch.dense_maps()
            assert dense.shape == (len(batch.labels), len(self.run.class_names), *batch.pixels.shape[-2:])
            assert batch.dense_maps() is dense  # computed once per batch, model and method
            won, total = self.counts.get((batch.model_name, batch.method), (0, 0))
            self.counts[batch.model_name, batch.method] = (
                won + (dense.argmax(1) == 0).sum().item(),
                total + dense[:, 0].numel(),
            )
            return []

        def results(self):
            return [
                result_entry(model, "left_share", method, won / total, {"num_images": self.run.args.limit})
                for (model, method), (won, total) in self.counts.items()
            ]

    args = EvaluationArguments(**RUN, metrics=["dense_test"], methods=["halves"])
    results, figure = run_evaluation(args)
    (entry,) = results["results"]
    assert entry["task"] == TASK_SEGMENTATION and entry["method"] == "halves"
    assert entry["value"] == pytest.approx(0.5)
    assert set(figure.maps) == {("halves", TINY)}


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_map_method(MapMethod("gradcam", "x", "gradient", "gradients", "duplicate", _left_half))
    with pytest.raises(ValueError, match="already registered"):
        register_metric(Metric("gini", "sparsity", TASK_ZERO_SHOT, True, "duplicate"))

    class Sparsity(Scorer):
        group = "sparsity"

    with pytest.raises(ValueError, match="already registered"):
        register_scorer(Sparsity)
    with pytest.raises(TypeError, match="not a Scorer subclass"):
        register_scorer(object)
