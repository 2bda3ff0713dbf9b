"""The laptop-scale experiment's towers (base and fine-tuned variants), built by its own code and kept on disk.

The configuration is the laptop experiment's final one (``experiments/laptop_scale/run.py``: ``FINAL_CONFIG``, the
search's ``tower_image/eps8-lr0.001-image48``), imported, not copied. Building one seed renders its 16 000 training
scenes, pre-trains the base (2000 steps) and fine-tunes each variant (150 steps) with the library's `AFTTrainer`;
with one torch thread a seed gives the same towers as the laptop run on the same machine. Towers are saved with
``save_pretrained`` under ``<towers>/seed<k>/<model>`` (each folder written beside and renamed into place), with
the configuration they were built from, so that a rerun dissects them without rebuilding.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPVisionModelWithProjection

LAPTOP = Path(__file__).resolve().parents[1] / "laptop_scale"
sys.path.insert(0, str(LAPTOP))

from experiment import ExperimentConfig, prepare_world  # noqa: E402
from finetune import finetune  # noqa: E402


def _load_laptop_run():
    """The laptop experiment's ``run.py`` under its own module name (this folder has a ``run.py`` too)."""
    spec = importlib.util.spec_from_file_location("laptop_scale_run", LAPTOP / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


laptop_run = _load_laptop_run()
FINAL_CONFIG: ExperimentConfig = laptop_run.FINAL_CONFIG
SMOKE_CONFIG: ExperimentConfig = laptop_run.SMOKE_CONFIG
CONFIG_FILE = "experiment_config.json"


def _config_json(config: ExperimentConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=list)


def _load_cached(folder: Path, config: ExperimentConfig, models: list[str]) -> dict | None:
    """The saved towers of `models` when `folder` holds all of them, built from exactly `config`; else None."""
    if not (folder / CONFIG_FILE).exists() or not all((folder / name).is_dir() for name in models):
        return None
    if (folder / CONFIG_FILE).read_text(encoding="utf-8") != _config_json(config):
        return None
    return {name: CLIPVisionModelWithProjection.from_pretrained(folder / name).eval() for name in models}


def _save(model: CLIPVisionModelWithProjection, target: Path) -> None:
    """`save_pretrained` into a temporary folder beside `target`, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(temporary)
        if target.exists():
            shutil.rmtree(target)
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)


def seed_towers(
    config: ExperimentConfig, seed: int, variants: tuple[str, ...], towers_dir: str | None, threads: int = 1
) -> tuple[dict[str, CLIPVisionModelWithProjection], dict[str, float]]:
    """``{"base": tower, variant: tower, ...}`` for `seed`, loaded from `towers_dir` when it holds them (built from
    the same configuration), else built and (with `towers_dir`) saved; and the seconds each stage took
    (``data``/``pretrain``/variants, or ``load``)."""
    torch.set_num_threads(threads)
    models = ["base", *variants]
    folder = Path(towers_dir) / f"seed{seed}" if towers_dir else None
    clock = time.perf_counter()
    cached = _load_cached(folder, config, models) if folder else None
    if cached is not None:
        return cached, {"load": time.perf_counter() - clock}
    world = prepare_world(config, seed, "test")
    seconds = dict(world.seconds)
    towers = {"base": world.base}
    for variant in variants:
        clock = time.perf_counter()
        towers[variant] = finetune(
            world.base, world.processor, world.train_images, variant, config.finetune, seed
        ).model
        seconds[variant] = time.perf_counter() - clock
    if folder:
        for name, model in towers.items():
            _save(model, folder / name)
        (folder / CONFIG_FILE).write_text(_config_json(config), encoding="utf-8")
    return towers, seconds
