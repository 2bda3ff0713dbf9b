"""benchmarks/aft_step.py: its naive baseline computes the same loss as the library, and a smoke run on tiny."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from aft_step import CPU_ATTENTION_FLOPS, Setting, build_vision_tower, run_setting, vit_forward_flops  # noqa: E402


def test_naive_and_library_paths_give_the_same_loss():
    losses = {
        path: run_setting(Setting(path=path, model="tiny", batch_size=2, attack_steps=2, steps=1), "time")["train_loss"]
        for path in ("library", "library-precompute", "naive")
    }
    assert losses["library"] > 0
    assert losses["naive"] == pytest.approx(losses["library"], rel=1e-5)
    assert losses["library-precompute"] == pytest.approx(losses["library"], rel=1e-5)


def test_flop_counter_sees_the_cpu_attention_kernels():
    model = build_vision_tower("tiny", "sdpa", seed=0)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter, torch.no_grad():
        model(pixel_values=torch.zeros(1, 3, 64, 64))
    assert counter.get_total_flops() == vit_forward_flops(model.config)


def test_smoke_run_on_tiny(tmp_path):
    out = tmp_path / "results.json"
    command = [
        sys.executable,
        str(BENCHMARKS / "aft_step.py"),
        "--model",
        "tiny",
        "--attack_steps",
        "2",
        "--steps",
        "1",
        "--threads",
        "1",
        "--output",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "library/naive at K=2, batch 2: step time" in done.stdout
    results = {r["setting"]["path"]: r for r in json.loads(out.read_text())["results"]}
    library, naive = results["library"], results["naive"]
    for r in (library, naive):
        assert r["step_s"] > 0 and r["peak_mib"] > 0 and r["tflops"] > 0
    # The naive step's only extra matmul work is its clean forward: exactly one forward per image more.
    assert naive["forward_equivalents_per_image"] - library["forward_equivalents_per_image"] == pytest.approx(1.0)
    assert library["train_loss"] == pytest.approx(naive["train_loss"], rel=1e-5)
