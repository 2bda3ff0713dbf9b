"""Area under faithfulness curves (deletion, insertion, ROAR), as a local `evaluate` module; the math is
hf_clip_aft.interpret.faithfulness."""

import datasets
import evaluate
import torch

from hf_clip_aft.interpret.faithfulness import curve_auc

_DESCRIPTION = """Mean area under curves sampled at equally spaced points of [0, 1] (share of pixels deleted or
inserted), by the trapezoidal rule, in the curve's units. For deletion curves lower is better (the score falls
fast when the most salient pixels go); for insertion curves higher is better."""
_KWARGS_DESCRIPTION = """
Args:
    predictions: curves, each a list of at least 2 scores (e.g. from
        hf_clip_aft.interpret.faithfulness_curve); all curves of one call should have the same length.
Returns:
    auc: the mean area under the curves.
"""
_CITATION = """Petsiuk, V., Das, A. and Saenko, K. (2018). RISE: Randomized input sampling for explanation of
black-box models. BMVC."""


class FaithfulnessAUC(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float32"))}),
        )

    def _compute(self, predictions):
        return {"auc": curve_auc(torch.tensor(predictions, dtype=torch.float32)).mean().item()}
