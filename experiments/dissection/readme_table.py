"""The README's dissection demo table, generated from the demo's results file (so that it cannot drift).

    python experiments/dissection/readme_table.py        # prints the table; tests/test_dissect_readme.py checks it

``demo/results.json`` is ``outputs/dissect-demo/results.json`` of ``python recipes/dissect.py
recipes/configs/dissect.yaml``, after ``python recipes/train.py recipes/configs/demo.yaml`` (see README).
"""

from __future__ import annotations

import sys
from pathlib import Path

from hf_clip_aft.interpret.dissect import load_dissection, summary_table

RESULTS = Path(__file__).resolve().parent / "demo" / "results.json"
KEYS = ("labelled_fraction", "unique_concepts", "mean_best_similarity")


def readme_table(path: str | Path = RESULTS) -> str:
    """The markdown table the README shows: CLIP-Dissect's headline numbers per layer and model, with Δ."""
    return "\n".join(summary_table(load_dissection(path), KEYS)) + "\n"


if __name__ == "__main__":
    print(readme_table(*sys.argv[1:]), end="")
