"""Sparsity of saliency maps (Gini index), as a local `evaluate` module; the math is hf_clip_aft.interpret.metrics."""

import datasets
import evaluate
import torch

from hf_clip_aft.interpret.metrics import gini_index

_DESCRIPTION = """Mean Gini index of the absolute values of saliency maps, in [0, 1). Higher means sparser: importance
concentrated on fewer pixels. A uniform map scores 0; a map with all its mass on one of n pixels scores 1 - 1/n."""
_KWARGS_DESCRIPTION = """
Args:
    predictions: saliency maps, each a 2-D list of floats (H x W); maps may differ in size.
Returns:
    gini: the mean Gini index over the maps.
"""
_CITATION = """Hurley, N. and Rickard, S. (2009). Comparing measures of sparsity. IEEE Trans. Inf. Theory 55(10)."""


class SaliencySparsity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float32")))}
            ),
        )

    def _compute(self, predictions):
        values = [gini_index(torch.tensor(m, dtype=torch.float32).unsqueeze(0)) for m in predictions]
        return {"gini": torch.cat(values).mean().item()}
