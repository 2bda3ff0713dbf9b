"""Compare CLIP image encoders (base vs AFT) on interpretability and zero-shot metrics.

    python recipes/evaluate.py --models openai/clip-vit-base-patch16 org/clip-aft-vit-b-16 \
        --dataset frgfm/imagenette --split validation --metrics all --output eval/

writes eval/results.json (schema hf_clip_aft.eval/v1), eval/summary.md (a markdown table, one column per model)
and eval/saliency_grid.png (rows: images; columns: the image, then each model's map per method). Offline demo:

    python recipes/evaluate.py --models hf_clip_aft/assets/tiny-clip outputs/demo \
        --dataset hf_clip_aft/assets/photos --split train --limit 8 --output outputs/eval-demo/
    hf-clip-aft evaluate recipes/configs/evaluate.yaml

A label column of integer class indices (e.g. Pascal VOC's, with masks of the same indices) needs its class list,
one name per line: ``--class_names recipes/configs/voc2012-classes.txt``, as in
``hf-clip-aft evaluate recipes/configs/evaluate-voc.yaml``.
"""

from __future__ import annotations

import logging
from typing import Any

from hf_clip_aft.interpret import EvaluationArguments, evaluate_models

ARGUMENTS = (EvaluationArguments,)


def main(args: EvaluationArguments) -> dict[str, Any]:
    """Evaluate ``args.models``; write the results, summary and grid to ``args.output``; return the results."""
    # The evaluation reports its progress through `logging`; a command shows it.
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return evaluate_models(args)
