"""One short AFT run of the tiny CLIP on the 8 demo photos, under whatever engine the launcher set up.

    accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 tests/distributed_worker.py OUT \
        --per_device_train_batch_size 4 --fsdp_on_cpu
    accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml --num_processes 2 \
        tests/distributed_worker.py OUT --per_device_train_batch_size 4

`run` trains 3 steps (a checkpoint at step 2) and exports the model to ``OUT/export``, then, in the same processes,
resumes a fresh trainer from the checkpoint, trains step 3 again and exports to ``OUT/export-resumed``. Rank 0 writes
``OUT/report.json``: the engine that ran, the per-step losses of both runs. `tests/test_distributed.py` calls `run`
in its own process for the single-process references.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import datasets
import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor

from hf_clip_aft import AFTConfig, AFTTrainer

ASSETS = Path(__file__).resolve().parents[1] / "hf_clip_aft" / "assets"
STEPS, CHECKPOINT_STEP = 3, 2


@contextlib.contextmanager
def fsdp_on_cpu():
    """Let `accelerate launch` with an FSDP config run FSDP on CPU processes (gloo): a test-only shim.

    Accelerate 1.15 switches a distributed state to FSDP only when it is a GPU-like one (``AcceleratorState.__init__``:
    ``elif self.distributed_type in [DistributedType.MULTI_GPU, ...]``); a CPU launch is ``MULTI_CPU`` and silently
    trains plain DDP. torch's FSDP2 runs on CPUs with gloo, so the state is presented as ``MULTI_GPU`` while the
    Trainer builds its Accelerator, then called ``FSDP`` in both singletons (``PartialState`` too, else
    ``get_state_dict`` returns sharded DTensors). Each step is checked, so that a change in accelerate fails here
    instead of degrading the test to DDP.
    """
    partial = PartialState()
    if partial.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"fsdp_on_cpu expects a MULTI_CPU launch, got {partial.distributed_type}: update the shim.")
    partial.distributed_type = DistributedType.MULTI_GPU
    try:
        yield
    finally:
        partial.distributed_type = DistributedType.FSDP
    state = AcceleratorState()
    if state.distributed_type != DistributedType.FSDP or state.fsdp_plugin is None:
        raise RuntimeError(
            f"fsdp_on_cpu: accelerate built a {state.distributed_type} state, not FSDP: update the shim."
        )


def engine_facts(trainer: AFTTrainer) -> dict:
    """What actually ran: accelerate's type, the Trainer's flags, whether the weights are DTensors, the ZeRO stage."""
    facts = {
        "distributed_type": str(AcceleratorState().distributed_type),
        "world_size": PartialState().num_processes,
        "is_fsdp_enabled": trainer.is_fsdp_enabled,
        "is_deepspeed_enabled": trainer.is_deepspeed_enabled,
        "dtensor_parameters": all(isinstance(p, DTensor) for p in trainer.model.parameters()),
    }
    if trainer.is_deepspeed_enabled:
        facts["zero_stage"] = trainer.deepspeed.zero_optimization_stage()
        facts["zero_optimizer"] = type(trainer.deepspeed.optimizer).__name__
    return facts


def _losses(trainer: AFTTrainer) -> dict[int, float]:
    return {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}


def run(
    out: str | Path, per_device_train_batch_size: int, gradient_accumulation_steps: int = 1, fsdp: bool = False
) -> dict:
    """Train, export, resume from the checkpoint, export again; the report (also written by rank 0)."""
    out = Path(out)
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    settings = dict(
        output_dir=str(out / "run"),
        max_steps=STEPS,
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=1e-3,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=CHECKPOINT_STEP,
        report_to="none",
        attack_steps=2,
        seed=0,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
        # On CPUs accelerate builds a distributed (gloo) state only with use_cpu, and a DeepSpeed state only without
        # it (DeepSpeed finds its CPU accelerator itself) and with the backend named.
        use_cpu=not deepspeed,
        ddp_backend="gloo" if deepspeed else None,
    )
    dataset = datasets.load_dataset("imagefolder", data_dir=str(ASSETS / "photos"), split="train")

    def new_trainer() -> AFTTrainer:
        # Fresh settings, as a resumed job would have: they reset accelerate's state (one process cannot build a
        # second DeepSpeed Accelerator), while the process group stays up.
        args = AFTConfig(**settings)
        with fsdp_on_cpu() if fsdp else contextlib.nullcontext():
            return AFTTrainer(str(ASSETS / "tiny-clip"), args=args, train_dataset=dataset)

    trainer = new_trainer()
    trainer.train()
    report = {"engine": engine_facts(trainer), "losses": _losses(trainer)}
    trainer.save_model(str(out / "export"))
    resumed = new_trainer()
    resumed.train(resume_from_checkpoint=str(out / "run" / f"checkpoint-{CHECKPOINT_STEP}"))
    report["resumed_losses"] = _losses(resumed)
    resumed.save_model(str(out / "export-resumed"))
    if trainer.is_world_process_zero():
        (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--per_device_train_batch_size", type=int, required=True)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--fsdp_on_cpu", action="store_true")
    cli = parser.parse_args()
    run(cli.out, cli.per_device_train_batch_size, cli.gradient_accumulation_steps, cli.fsdp_on_cpu)
    PartialState().wait_for_everyone()
    torch.distributed.destroy_process_group()  # as recipes/train.py ends: no rank exits while another still talks
