"""Network dissection of CLIP image encoders (base vs AFT): CLIP-Dissect, and Network Dissection with masks.

    python recipes/dissect.py --models openai/clip-vit-base-patch16 org/clip-aft-vit-b-16 \
        --probe_dataset frgfm/imagenette --split validation --limit 2000 --layers 8 10 11 --output dissect/

writes dissect/results.json (schema hf_clip_aft.dissect/v1), dissect/summary.md (a base vs AFT table with Δ) and
dissect/top_images.png (each model's best labelled units with their top images). Network Dissection on Broden
(a folder in its on-disk format: index.csv, category.csv, label.csv, c_*.csv, images/):

    python recipes/dissect.py --models ... --probe_dataset broden1_224 --split all --mask_size 112

Offline demo:

    python recipes/dissect.py recipes/configs/dissect.yaml
"""

from __future__ import annotations

import logging

from hf_clip_aft.interpret.dissect import DissectionArguments, dissect_models

ARGUMENTS = (DissectionArguments,)


def main(args: DissectionArguments) -> None:
    """Dissect every model in ``args.models`` and write the results, summary and figure to ``args.output``."""
    # The dissection reports its progress through `logging`; a command shows it.
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    dissect_models(args)
