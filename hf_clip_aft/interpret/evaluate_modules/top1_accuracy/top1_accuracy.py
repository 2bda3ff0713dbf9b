"""Top-1 accuracy of class predictions (zero-shot or robust), as a local `evaluate` module; the math is
hf_clip_aft.interpret.zero_shot."""

import datasets
import evaluate
import torch

from hf_clip_aft.interpret.zero_shot import top1_accuracy

_DESCRIPTION = """Share of predicted class indices equal to the reference labels, in [0, 1]; higher is better."""
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class indices (e.g. hf_clip_aft.interpret.zero_shot_predictions).
    references: true class indices.
Returns:
    accuracy: the top-1 accuracy.
"""
_CITATION = """Radford et al. (2021). Learning transferable visual models from natural language supervision. ICML."""


class Top1Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"accuracy": top1_accuracy(torch.tensor(predictions), torch.tensor(references))}
