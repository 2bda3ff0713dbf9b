"""Seed `s`'s base and AFT towers of the laptop-scale experiment (experiments/laptop_scale), built by its own code.

The configuration is the laptop-scale run's final one (``run.py``'s ``FINAL_STAGE, FINAL_NAME`` in ``search.py``'s
``STAGES``, imported, not copied), restricted to the ``aft`` variant. Building takes minutes on one CPU thread (16 000
scenes rendered, 2000 pre-training steps, 150 AFT steps), so :func:`load_or_build_towers` can keep the two towers in a
cache folder, keyed by the configuration and the seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
from transformers import CLIPVisionModelWithProjection

from hf_clip_aft.release.export import staged_folder

LAPTOP_SCALE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "laptop_scale")
sys.path.insert(0, LAPTOP_SCALE)

from experiment import ExperimentConfig, World, prepare_world  # noqa: E402
from finetune import finetune  # noqa: E402


def _laptop_scale_run():
    """experiments/laptop_scale/run.py under its own module name (this folder has a ``run.py`` too)."""
    name = "laptop_scale_run"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(LAPTOP_SCALE, "run.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def tower_config(smoke: bool = False) -> ExperimentConfig:
    """The laptop-scale final configuration (or its toy-size smoke configuration), with the ``aft`` variant only."""
    laptop = _laptop_scale_run()
    return dataclasses.replace(laptop.SMOKE_CONFIG if smoke else laptop.FINAL_CONFIG, variants=("aft",))


@dataclass
class Towers:
    """The base tower, its AFT fine-tune, the world they were trained in, and how long building them took (s)."""

    base: CLIPVisionModelWithProjection
    aft: CLIPVisionModelWithProjection
    world: World | None
    seconds: dict[str, float]
    pretrain_final_loss: float


def build_towers(config: ExperimentConfig, seed: int) -> Towers:
    """Pre-train the base and fine-tune it with AFT exactly as the laptop-scale experiment does for `seed`."""
    world = prepare_world(config, seed, "test")
    clock = time.perf_counter()
    aft = finetune(world.base, world.processor, world.train_images, "aft", config.finetune, seed).model
    seconds = {**world.seconds, "aft": time.perf_counter() - clock}
    return Towers(world.base.eval(), aft.eval(), world, seconds, world.pretrain_loss)


def cache_key(config: ExperimentConfig, seed: int) -> str:
    """Folder name of the towers of (`config`, `seed`): a hash of the configuration, the seed and torch's version."""
    text = json.dumps({"config": config.to_dict(), "seed": seed, "torch": torch.__version__}, sort_keys=True)
    return f"seed{seed}-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def load_or_build_towers(config: ExperimentConfig, seed: int, cache_dir: str | None) -> Towers:
    """The towers from `cache_dir` when they are there (``world`` is then None), else built and, with a
    `cache_dir`, saved there (atomically: a staging folder renamed into place)."""
    folder = os.path.join(cache_dir, cache_key(config, seed)) if cache_dir else None
    if folder and os.path.isdir(folder):
        with open(os.path.join(folder, "build.json"), encoding="utf-8") as f:
            info = json.load(f)
        base = CLIPVisionModelWithProjection.from_pretrained(os.path.join(folder, "base")).eval()
        aft = CLIPVisionModelWithProjection.from_pretrained(os.path.join(folder, "aft")).eval()
        return Towers(base, aft, None, info["seconds"], info["pretrain_final_loss"])
    towers = build_towers(config, seed)
    if folder:
        with staged_folder(folder) as staging:
            towers.base.save_pretrained(staging / "base")
            towers.aft.save_pretrained(staging / "aft")
            info = {"config": config.to_dict(), "seed": seed, "seconds": towers.seconds,
                    "pretrain_final_loss": towers.pretrain_final_loss}  # fmt: skip
            (staging / "build.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return towers


if __name__ == "__main__":
    # python experiments/llava_maps/llava_towers.py CACHE_DIR [SEED]: build (or find) the towers ahead of run.py.
    torch.set_num_threads(1)
    built = load_or_build_towers(tower_config(), int(sys.argv[2]) if len(sys.argv) > 2 else 0, sys.argv[1])
    print(json.dumps({"seconds": built.seconds, "pretrain_final_loss": built.pretrain_final_loss}))
