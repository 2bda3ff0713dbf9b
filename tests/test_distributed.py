"""FSDP, DeepSpeed ZeRO-2 and two-machine DDP in two real CPU processes (gloo): the engine that actually ran, and the
same losses and weights as one process, because every example draws its own attack randomness.

Each launch trains the tiny CLIP on the 8 demo photos for 3 steps (global batch 8, so every step is an epoch), saves a
checkpoint at step 2, exports, resumes from the checkpoint in the same processes and exports again
(`tests/distributed_worker.py`). DeepSpeed compiles a small communication extension on its first launch on a machine
(about 80 s with g++; cached under ~/.cache/torch_extensions afterwards).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPVisionModel

import distributed_worker
from hf_clip_aft.cli import run_command

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "recipes" / "accelerate"
LOSS_TOLERANCE = 1e-6  # what "the same loss" means here: float32 reductions over batches split differently
# The weights after 3 AdamW steps of learning rate 1e-3 (at most ~1e-3 per step): a tenth of one step. Not 1e-6:
# some gradients are zero in exact arithmetic (the key projection's bias: softmax ignores it) and only float noise
# in practice, which Adam normalises into steps of up to the learning rate (measured: up to 4.8e-5 apart).
WEIGHT_TOLERANCE = 1e-4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    env.pop("ACCELERATE_USE_CPU", None)  # accelerate's DeepSpeed branch needs it off
    return env


def _accelerate(config: str, *args: str) -> list[str]:
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / config)]
    return [*accelerate, *args]


def _check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]


def _vision_weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(folder / "model.safetensors").items() if k.startswith(("vision", "visual"))}


def _assert_same_weights(folder: Path, reference: Path, tolerance: float = WEIGHT_TOLERANCE) -> None:
    ours, theirs = _vision_weights(folder), _vision_weights(reference)
    assert ours.keys() == theirs.keys() and ours
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=tolerance, msg=key)


def _assert_same_losses(losses: dict, reference: dict) -> None:
    assert losses.keys() == reference.keys() == {str(step) for step in range(1, distributed_worker.STEPS + 1)}
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], abs=LOSS_TOLERANCE, rel=0), step


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process, batch 8."""
    out = tmp_path_factory.mktemp("one_process")
    distributed_worker.run(out, per_device_train_batch_size=8)
    return out


def _report(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    report["losses"] = {str(k): v for k, v in report["losses"].items()}
    return report


def test_gradient_accumulation_gives_the_same_run(one_process, tmp_path):
    """8 micro-batches of 1 with gradient accumulation: the same losses and weights as one batch of 8."""
    distributed_worker.run(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=8)
    _assert_same_losses(_report(tmp_path)["losses"], _report(one_process)["losses"])
    _assert_same_weights(tmp_path / "export", one_process / "export")


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_two_processes_run_the_engine_and_match_one_process(engine, one_process, tmp_path):
    config = {"fsdp": "fsdp.yaml", "deepspeed": "deepspeed_zero2.yaml"}[engine]
    worker = [str(ROOT / "tests" / "distributed_worker.py"), str(tmp_path), "--per_device_train_batch_size", "4"]
    if engine == "fsdp":
        worker.append("--fsdp_on_cpu")
    cmd = _accelerate(config, "--num_processes", "2", "--main_process_port", str(_free_port()), *worker)
    _check(subprocess.run(cmd, env=_environment(), capture_output=True, text=True, timeout=900))
    report, reference = _report(tmp_path), _report(one_process)

    facts = report["engine"]
    assert facts["world_size"] == 2
    if engine == "fsdp":
        assert facts["distributed_type"] == "DistributedType.FSDP" and facts["is_fsdp_enabled"]
        assert facts["dtensor_parameters"]  # FSDP2 sharded every weight: this was not DDP
    else:
        assert facts["distributed_type"] == "DistributedType.DEEPSPEED" and facts["is_deepspeed_enabled"]
        assert facts["zero_stage"] == 2 and facts["zero_optimizer"] == "DeepSpeedZeroOptimizer"

    _assert_same_losses(report["losses"], reference["losses"])
    _assert_same_weights(tmp_path / "export", one_process / "export")
    # Resumed from the step-2 checkpoint, step 3 is the uninterrupted run's step 3.
    last = str(distributed_worker.STEPS)
    assert report["resumed_losses"][last] == report["losses"][last]
    _assert_same_weights(tmp_path / "export-resumed", tmp_path / "export", tolerance=0)
    # The export is a complete model folder for plain transformers.
    for model_class in (CLIPModel, CLIPVisionModel):
        _, info = model_class.from_pretrained(tmp_path / "export", output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"], (model_class.__name__, info)


def test_two_machines_train_the_demo_like_one_process(tmp_path, monkeypatch):
    """`multi_node.yaml` on 127.0.0.1: two `accelerate launch` commands, one per machine rank, one process each."""
    overrides = ["--max_steps", "3", "--attack_steps", "2", "--logging_steps", "1"]
    port = str(_free_port())
    machines = [
        subprocess.Popen(
            _accelerate(
                "multi_node.yaml",
                "--num_machines",
                "2",
                "--num_processes",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                port,
                str(ROOT / "recipes" / "train.py"),
                str(ROOT / "recipes" / "configs" / "demo.yaml"),
                "--output_dir",
                str(tmp_path / "two_machines"),
                "--per_device_train_batch_size",
                "4",
                *overrides,
            ),
            env=_environment(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    for machine in machines:
        stdout, stderr = machine.communicate(timeout=600)
        _check(subprocess.CompletedProcess(machine.args, machine.returncode, stdout, stderr))
    monkeypatch.chdir(ROOT)  # the demo config's paths are relative to the repository root
    run_command(
        "train",
        [
            str(ROOT / "recipes" / "configs" / "demo.yaml"),
            "--output_dir",
            str(tmp_path / "one_machine"),
            "--per_device_train_batch_size",
            "8",
            *overrides,
        ],
    )
    _assert_same_weights(tmp_path / "two_machines", tmp_path / "one_machine")
