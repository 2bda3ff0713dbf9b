"""Two real gloo DDP processes on the CPU end with identical weights."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import TINY_CLIP
from hf_clip_aft.trainer import load_vision_tower

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_process_ddp_keeps_ranks_in_sync(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(WORKER),
        str(tmp_path),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    # Each rank saw its own shard of the data, so equal weights mean the gradients were all-reduced.
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    initial = load_vision_tower(TINY_CLIP).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in ranks[0]["state"].items())  # and they did train
    # Logged metrics are reduced across ranks: both ranks log the same values.
    assert ranks[0]["log"][0]["cos_sim_adv"] == ranks[1]["log"][0]["cos_sim_adv"]
