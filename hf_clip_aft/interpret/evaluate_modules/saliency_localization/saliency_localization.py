"""Localisation of saliency maps against object masks, as a local `evaluate` module; the math is
hf_clip_aft.interpret.metrics."""

import datasets
import evaluate
import torch

from hf_clip_aft.interpret.metrics import energy_pointing_game, pointing_game, top_fraction_iou

_DESCRIPTION = """Localisation of saliency maps against binary object masks (all higher is better, in [0, 1]):
pointing game (share of maps whose maximum lies on the object), energy pointing game (mean share of map mass on
the object) and top-k IoU (mean IoU between the top `fraction` of pixels and the object)."""
_KWARGS_DESCRIPTION = """
Args:
    predictions: saliency maps, each a 2-D list of non-negative floats (H x W).
    references: object masks of the same sizes, 2-D lists of ints (non-zero = object).
    fraction: share of top pixels compared with the mask by the IoU (default 0.2).
    ignore_index: mask value of unannotated pixels (e.g. 255, Pascal VOC's border), left out of every metric;
        default None (every pixel annotated). A map whose mask has no annotated object pixel is skipped.
Returns:
    pointing_game, energy_pointing_game, top_k_iou: means over the maps scored (NaN if none);
    num_images: how many maps were scored.
"""
_CITATION = """Zhang et al. (2018), Top-down neural attention by excitation backprop, IJCV; Wang et al. (2020),
Score-CAM, CVPR workshops."""


class SaliencyLocalization(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
                }
            ),
        )

    def _compute(self, predictions, references, fraction=0.2, ignore_index=None):
        scores = {"pointing_game": [], "energy_pointing_game": [], "top_k_iou": []}
        for saliency_map, mask in zip(predictions, references, strict=True):
            maps = torch.tensor(saliency_map, dtype=torch.float32).unsqueeze(0)
            values = torch.tensor(mask).unsqueeze(0)
            annotated = torch.ones_like(values, dtype=torch.bool) if ignore_index is None else values != ignore_index
            masks = (values != 0) & annotated
            if not masks.any():
                continue
            scores["pointing_game"].append(pointing_game(maps, masks, annotated))
            scores["energy_pointing_game"].append(energy_pointing_game(maps, masks, annotated))
            scores["top_k_iou"].append(top_fraction_iou(maps, masks, fraction, annotated))
        means = {name: torch.cat(values).mean().item() if values else float("nan") for name, values in scores.items()}
        return {**means, "num_images": len(scores["pointing_game"])}
