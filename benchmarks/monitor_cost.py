"""Cost of one map-monitor evaluation (hf_clip_aft.interpret.monitor), in forward-equivalents per image and seconds.

    python benchmarks/monitor_cost.py --model vit-b-16 --images 8 --threads 1

Counts the FLOPs of `MapMonitor.measure` with `FlopCounterMode` and divides them by (images × one forward), for a
held-out set with masks (localisation metrics) and without (deletion/insertion curves), with random weights and
random images (the cost does not depend on the values). Prints one JSON line per case; `--output` also writes
them to a JSON file (the docs quote `benchmarks/results/monitor-cost-vit-b-16.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionModelWithProjection

from hf_clip_aft.data import clip_image_processor
from hf_clip_aft.files import write_json_atomic
from hf_clip_aft.interpret.monitor import MapMonitor, MonitorSettings
from hf_clip_aft.model_configs import clip_config


def flops(fn) -> tuple[int, float]:
    counter = FlopCounterMode(display=False)
    start = time.perf_counter()
    with counter:
        fn()
    return counter.get_total_flops(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit-b-16", help="An architecture of hf_clip_aft.model_configs.")
    parser.add_argument("--images", type=int, default=8, help="Held-out images measured.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads.")
    parser.add_argument("--output", default=None, help="JSON file to write the rows (one per case) to.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = clip_config(args.model).vision_config
    model = CLIPVisionModelWithProjection(config).eval()
    processor = clip_image_processor(config.image_size)
    pixels = torch.rand(args.images, 3, config.image_size, config.image_size)
    forward, _ = flops(lambda: model(pixel_values=pixels[:1]))
    masks = torch.zeros(args.images, config.image_size, config.image_size, dtype=torch.bool)
    masks[:, : config.image_size // 2] = True
    settings = MonitorSettings(max_images=args.images, batch_size=args.images)
    with torch.no_grad():
        reference = torch.nn.functional.normalize(model(pixel_values=pixels).image_embeds, dim=-1)
    rows = []
    for name, case_masks in (("masks", masks), ("no_masks", None)):
        monitor = MapMonitor(pixels, processor, reference, masks=case_masks, settings=settings)
        total, seconds = flops(partial(monitor.measure, model))
        row = {
            "model": args.model,
            "case": name,
            "images": args.images,
            "metrics": list(monitor.metric_names),
            "forward_equivalents_per_image": round(total / (forward * args.images), 2),
            "seconds_per_image": round(seconds / args.images, 3),
            "threads": args.threads,
        }
        print(json.dumps(row))
        rows.append(row)
    if args.output:
        write_json_atomic(args.output, {"command": " ".join(sys.argv), "load_average": os.getloadavg(), "rows": rows})


if __name__ == "__main__":
    main()
