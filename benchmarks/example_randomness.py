"""What per-example attack randomness costs: the attack with `ExampleRandomness` against the global generator.

    python benchmarks/example_randomness.py                                   # tiny and vit-b-16 shapes, CPU, ~3 min
    python benchmarks/example_randomness.py --model vit-b-16 --batch_size 64 --device cuda --repeats 20

Per configuration: the time of the K + 1 draws of one attack (random start and K noise samples) with one draw from
the global generator per step, and with one reseeded generator per example; and for the model, the time of the whole
attack (``adversarial_perturbation``, weights frozen, random weights) both ways. Medians over ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from transformers import CLIPVisionModelWithProjection

from hf_clip_aft.attack import ExampleRandomness, _draw, adversarial_perturbation
from hf_clip_aft.config import AFTConfig
from hf_clip_aft.model_configs import clip_config
from hf_clip_aft.modeling import encode_images, frozen_parameters


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model_name: str, batch_size: int, steps: int, device: torch.device, repeats: int, attack: bool) -> dict:
    """Seconds of the draws of one attack, and of one whole attack, with the global and the per-example generators."""
    config = clip_config(model_name).vision_config
    size = config.image_size
    pixels = torch.rand(batch_size, 3, size, size, device=device)
    randomness = ExampleRandomness(seed=0, epoch=0, indices=torch.arange(batch_size))

    def draws(per_example: bool):
        source = randomness if per_example else None
        _draw(pixels, source, 0, lambda t, g: t.uniform_(-1, 1, generator=g))
        for step in range(1, steps + 1):
            _draw(pixels, source, step, lambda t, g: t.normal_(generator=g))

    row = {"model": model_name, "batch": batch_size, "K": steps, "device": str(device)}
    for name, per_example in (("global", False), ("per_example", True)):
        draws(per_example)  # warm-up
        row[f"draws_{name}_s"] = _median_seconds(partial(draws, per_example), repeats, device)
    if attack:
        torch.manual_seed(0)
        model = CLIPVisionModelWithProjection(config).to(device).eval()
        mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
        embed = lambda x: encode_images(model, x, mean, std)  # noqa: E731
        settings = AFTConfig(output_dir="unused", attack_steps=steps, report_to="none")
        with torch.no_grad():
            target = embed(pixels)
        for name, source in (("global", None), ("per_example", randomness)):
            with frozen_parameters(model):
                run = lambda: adversarial_perturbation(embed, pixels, target, settings, source)  # noqa: B023, E731
                run()
                row[f"attack_{name}_s"] = _median_seconds(run, repeats, device)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["tiny", "vit-b-16"], help="architectures (model_configs)")
    parser.add_argument("--batch_size", type=int, nargs="+", default=[8, 4], help="one per model, in images")
    parser.add_argument("--attack_steps", type=int, default=10, help="PGD steps K")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is steady on a shared CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draws_only", action="store_true", help="skip the whole-attack timing")
    args = parser.parse_args()
    if len(args.batch_size) != len(args.model):
        parser.error(f"--batch_size needs one value per --model: got {args.batch_size} for {args.model}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for model_name, batch_size in zip(args.model, args.batch_size):
        row = measure(model_name, batch_size, args.attack_steps, device, args.repeats, not args.draws_only)
        extra = row["draws_per_example_s"] - row["draws_global_s"]
        line = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        if "attack_global_s" in row:
            line += f", draw overhead={100 * extra / row['attack_global_s']:.2f}% of the attack"
        print(line, flush=True)


if __name__ == "__main__":
    main()
