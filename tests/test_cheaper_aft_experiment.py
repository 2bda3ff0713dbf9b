"""experiments/cheaper_aft: the frontier pipeline at toy size (its numbers mean nothing) and its bookkeeping."""

import json
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parents[1] / "experiments" / "cheaper_aft" / "run.py"


def test_smoke_run_counts_each_variant_and_writes_the_frontier(tmp_path):
    # A subprocess: the module is called run.py, like experiments/laptop_scale's, which other tests import.
    variants = ["clean", "pgd1", "pgd10", "fgsm_rs", "free4"]
    command = [sys.executable, str(RUN), "--smoke", "--workers", "1", "--output", str(tmp_path)]
    command += ["--worlds", "laptop", "--seeds", "0", "1", "--variants", *variants]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())["summary"]["laptop"]
    rows = summary["variants"]
    assert list(rows) == variants and summary["seeds"] == [0, 1]
    # The trainer's count: reference 1 + attack 2K + training 3; free: no attack forward.
    assert {name: rows[name]["forward_equivalents"]["mean"] for name in variants} == {
        "clean": 4.0,
        "pgd1": 6.0,
        "pgd10": 24.0,
        "fgsm_rs": 6.0,
        "free4": 4.0,
    }
    assert rows["clean"]["gain"]["values"] == [0.0, 0.0]  # the gain is paired with the clean control per seed
    assert rows["clean"]["meets_target"] is None  # controls are not candidates
    assert rows["free4"]["cost_share_of_pgd10"] == 4 / 24
    assert (tmp_path / "frontier.png").stat().st_size > 0
    assert "| pgd1 |" in (tmp_path / "table.md").read_text()
