"""Time and peak memory of a dissection as the probe set grows (hf_clip_aft.interpret.dissect), on synthetic units.

    python benchmarks/dissect_cost.py --images 500 1000 2000 4000 --units 768 --threads 1 \
        --output benchmarks/results/dissect-cost.json

Each (stage, N) runs in a fresh process, so that its peak resident memory (``ru_maxrss``) is its own:

- ``network_dissection``: the library's two passes over N synthetic images: unit maps ``(B, U, 14, 14)`` (ViT-B/16's
  patch grid, GELU of Gaussian values) feed the per-unit threshold histograms (:class:`QuantileSketch`), then are
  regenerated (same seeds, as the run recomputes them), upsampled to Broden's 112 x 112 label maps and tallied
  (:class:`ConceptTally`) against one label channel per image (8 x 8 blocks of random ids out of Broden's 1,198).
  No N-sized array is kept.
- ``clip_dissect``: :func:`clip_dissect_layer` (soft-WPMI, top-100, the 1,000-unit null) on A ``(N, U)`` and
  P ``(N, C)`` from random 512-d embeddings; A and P are the method's inputs, so this stage grows with N.
- ``forward``: one ViT-B/16 forward (random weights, 224 px) per image, the model's share of each pass.

Prints one JSON line per case (wall seconds, CPU seconds of the case and of its parts, peak RSS) and writes them
all to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from hf_clip_aft.files import write_json_atomic
from hf_clip_aft.interpret.dissect import (
    ConceptTally,
    DissectionArguments,
    QuantileSketch,
    clip_dissect_layer,
    image_concept_similarity,
    unit_masks,
)

GRID, MASK, LABELS = 14, 112, 1198  # ViT-B/16's patch grid; Broden's label maps (224 px images) and label count


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _batch(index: int, size: int, units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic batch `index`: unit maps ``(B, U, 14, 14)`` and label maps ``(B, 112 * 112)``, from its own seed."""
    generator = torch.Generator().manual_seed(index)
    maps = F.gelu(torch.randn(size, units, GRID, GRID, generator=generator))
    blocks = torch.randint(1, LABELS, (size, 1, 8, 8), generator=generator).float()
    labels = F.interpolate(blocks, size=(MASK, MASK), mode="nearest").long().flatten(1)
    return maps, labels


def network_dissection(images: int, units: int, batch: int) -> dict[str, float]:
    sizes = [min(batch, images - start) for start in range(0, images, batch)]
    clock = time.process_time()
    sketch = QuantileSketch(units)
    for index, size in enumerate(sizes):
        sketch.update(_batch(index, size, units)[0])
    thresholds = sketch.quantile(1 - 0.005)
    first = time.process_time() - clock
    tally = ConceptTally(units, LABELS)
    for index, size in enumerate(sizes):
        maps, labels = _batch(index, size, units)
        for image_maps, image_labels in zip(maps, labels):
            tally.update(unit_masks(image_maps, thresholds, MASK), image_labels[None])
    tally.iou()
    return {"thresholds_cpu_s": first, "tally_cpu_s": time.process_time() - clock - first}


def clip_dissect(images: int, units: int, concepts: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    activations = F.gelu(torch.randn(images, units, generator=generator))
    image_concept = image_concept_similarity(
        torch.randn(images, 512, generator=generator), torch.randn(concepts, 512, generator=generator)
    )
    args = DissectionArguments(figure_images=1)
    clock = time.process_time()
    clip_dissect_layer(activations, image_concept, [str(c) for c in range(concepts)], range(images), args)
    return {"similarity_and_null_cpu_s": time.process_time() - clock}


def forward(images: int) -> dict[str, float]:
    from transformers import CLIPVisionModelWithProjection

    from hf_clip_aft.model_configs import clip_config

    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(clip_config("vit-b-16").vision_config).eval()
    pixels = torch.randn(images, 3, 224, 224)
    with torch.no_grad():
        model(pixel_values=pixels[:1])  # warm-up
        clock = time.process_time()
        model(pixel_values=pixels)
    return {"forward_cpu_s_per_image": (time.process_time() - clock) / images}


def run_case(stage: str, images: int, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    baseline = _peak_mib()
    clock, cpu = time.perf_counter(), time.process_time()
    if stage == "network_dissection":
        detail = network_dissection(images, args.units, args.batch_size)
    elif stage == "clip_dissect":
        detail = clip_dissect(images, args.units, args.concepts)
    else:
        detail = forward(images)
    return {
        "stage": stage,
        "images": images,
        "units": args.units,
        "concepts": args.concepts if stage == "clip_dissect" else None,
        "threads": args.threads,
        "seconds": round(time.perf_counter() - clock, 2),
        "cpu_seconds": round(time.process_time() - cpu, 2),  # this process's CPU time: steadier on a shared machine
        **{k: round(v, 4) for k, v in detail.items()},
        "peak_rss_mib": round(_peak_mib(), 1),
        "rss_after_imports_mib": round(baseline, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[500, 1000, 2000, 4000], help="Probe set sizes N.")
    parser.add_argument("--units", type=int, default=768, help="Units per layer (ViT-B/16: 768 residual, 3072 MLP).")
    parser.add_argument("--concepts", type=int, default=20_000, help="CLIP-Dissect vocabulary size C.")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per batch (the run's default).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads.")
    parser.add_argument("--stages", nargs="+", default=["network_dissection", "clip_dissect", "forward"])
    parser.add_argument("--output", default=None, help="JSON file for all rows.")
    parser.add_argument("--case", nargs=2, default=None, help=argparse.SUPPRESS)  # (stage, N): one child process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args)))
        return
    rows = []
    for stage in args.stages:
        for images in args.images if stage != "forward" else [16]:
            command = [sys.executable, __file__, "--case", stage, str(images), "--units", str(args.units)]
            command += ["--concepts", str(args.concepts), "--batch_size", str(args.batch_size)]
            command += ["--threads", str(args.threads)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        write_json_atomic(args.output, {"command": "python " + " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
