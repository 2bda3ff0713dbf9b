"""The README's dissection numbers are the demo results file's (experiments/dissection/demo/results.json)."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("readme_table", REPO / "experiments" / "dissection" / "readme_table.py")
readme_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_table)


def test_the_readme_dissection_table_is_generated_from_the_results_file():
    table = readme_table.readme_table()
    assert table.count("\n") == 2 + 2 * len(readme_table.KEYS)  # header, rule, two layers
    assert table in (REPO / "README.md").read_text(encoding="utf-8")
