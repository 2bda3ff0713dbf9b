"""Where a tiny LLaVA's answer looks: the laptop-scale base tower vs its AFT tower (issue 13's evidence).

    python experiments/llava_maps/run.py --output experiments/llava_maps/results --tower_cache /tmp/llava_maps_towers

1. Seed 0's base and AFT towers of experiments/laptop_scale (its final configuration, built by its own code:
   :mod:`towers`), `CLIPVisionModelWithProjection` at 48 px in 12-px patches (a 4 × 4 grid), width 64, no text side.
2. A tiny `LlavaForConditionalGeneration` built from configs: the base tower as its vision tower (config taken from
   the tower), a word-level tokenizer, a 2-layer Llama. Only the projector and the language model are trained, on
   the laptop-scale training scenes, to answer "What shape is this?" with the shape word (disc, square, triangle).
   A copy of the untrained LLaVA is kept as the random-language-side control, and a second copy with the AFT tower
   is trained the same way (the AFT tower's "own" language side).
3. The AFT LLaVA: the same language side with the AFT tower put in by `hf_clip_aft.swap_llava_vision_tower`.
4. `hf_clip_aft.interpret.llava_relevance` on held-out test scenes with their object masks, for both towers (with
   the trained, own and random language sides): answer accuracy, and the localisation metrics of the first answer
   token's map (the shape word) with every map setting: pointing game, energy pointing game, top-20 % IoU, means
   over images.

Writes ``results.json`` into ``--output`` and the figure ``--figure`` (default docs/llava_maps_laptop_scale.png).
``--smoke`` runs the same pipeline at toy sizes in seconds (tests/test_llava_maps_experiment.py); its numbers mean
nothing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from tqdm.auto import tqdm
from transformers import (
    CLIPVisionModelWithProjection,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "laptop_scale")]

from experiment import SPLIT_OFFSETS  # noqa: E402  (from experiments/laptop_scale)
from llava_towers import load_or_build_towers, tower_config  # noqa: E402
from pretrain import image_processor_for  # noqa: E402
from scenes import SHAPES, make_scenes  # noqa: E402

from hf_clip_aft import swap_llava_vision_tower  # noqa: E402
from hf_clip_aft.files import atomic_write, write_json_atomic  # noqa: E402
from hf_clip_aft.interpret.figures import saliency_grid  # noqa: E402
from hf_clip_aft.interpret.llava_relevance import llava_prompt, llava_relevance, map_summary  # noqa: E402

PROMPT = "What shape is this?"
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
VOCABULARY = (*SPECIAL, "what", "shape", "is", "this", "?", *SHAPES)
MAP_SETTINGS = {  # name -> llava_relevance options
    "attention": {"method": "attention", "vision_weighting": False},
    "attention+tower": {"method": "attention", "vision_weighting": True},
    "relevancy": {"method": "relevancy", "vision_weighting": False},
    "relevancy+tower": {"method": "relevancy", "vision_weighting": True},
}
MAP_METRICS = ("pointing_game", "energy_pointing_game", "top_k_iou")
TOWERS = ("base", "aft")
# "trained": trained on the base tower's features, then shared by both towers (the tower is swapped, as for a real
# LLaVA); "random": untrained (seeded); "own": each tower with a language side trained on its own features (for the
# base tower that is "trained"; for the AFT tower a second training from the same start, data and steps).
LANGUAGE_SIDES = ("trained", "random", "own")
FIGURE_COLUMNS = {"base": ("trained", "base"), "AFT": ("trained", "aft"), "AFT, own LM": ("own", "aft")}
DEFAULT_FIGURE = os.path.join(os.path.dirname(os.path.dirname(HERE)), "docs", "llava_maps_laptop_scale.png")


@dataclass(frozen=True)
class LlavaSpec:
    """The tiny LLaVA's language side and its training (AdamW, cosine schedule after `warmup` steps).

    `train_size` scenes (the laptop-scale training indices 0 .. train_size − 1); `eval_size` held-out test scenes.
    """

    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    train_size: int = 4000
    steps: int = 600
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup: int = 30
    eval_size: int = 50
    figure_images: int = 6


SMOKE_SPEC = LlavaSpec(text_width=16, text_layers=1, text_heads=2, train_size=32, steps=3, batch_size=8, warmup=1,
                       eval_size=2, figure_images=2)  # fmt: skip


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`VOCABULARY` (lower-cased; ``<s>`` prepended; ``<image>`` special)."""
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCABULARY)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def llava_processor(tower: CLIPVisionModelWithProjection) -> LlavaProcessor:
    """A `LlavaProcessor` for `tower`'s images (the laptop-scale image processor) and :func:`word_tokenizer`."""
    return LlavaProcessor(
        image_processor=image_processor_for(tower.config.image_size), tokenizer=word_tokenizer(),
        patch_size=tower.config.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLS, dropped by "default" selection, as llava-hf processors count it
    )  # fmt: skip


def build_llava(
    tower: CLIPVisionModelWithProjection, processor: LlavaProcessor, spec: LlavaSpec, seed: int
) -> LlavaForConditionalGeneration:
    """A randomly initialised (seeded) tiny LLaVA whose vision config is `tower`'s and whose tower holds its weights."""
    tokenizer = processor.tokenizer
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.text_width, intermediate_size=2 * spec.text_width,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_heads,
        max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    side = tower.config.image_size // tower.config.patch_size
    config = LlavaConfig(
        vision_config=tower.config.to_dict(), text_config=text, image_token_index=processor.image_token_id,
        image_seq_length=side * side,
    )  # fmt: skip
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(config)
    llava.generation_config.update(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return swap_llava_vision_tower(llava, tower).eval()


def training_batch(processor: LlavaProcessor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` ``(N, L)`` of prompt + shape word + end of sequence for shape labels ``(N,)``.

    The prompt's ids are the processor's, exactly as :func:`llava_relevance` builds them (image tokens included);
    only the answer and the end token are supervised (−100 elsewhere).
    """
    tokenizer = processor.tokenizer
    image = np.zeros((processor.image_processor.crop_size["height"],) * 2 + (3,), np.uint8)
    prompt = processor(images=image, text=llava_prompt(processor, PROMPT), return_tensors="pt")["input_ids"][0]
    words = torch.tensor(tokenizer.convert_tokens_to_ids(list(SHAPES)))
    answers = torch.stack([words[labels], torch.full_like(labels, tokenizer.eos_token_id)], dim=1)
    input_ids = torch.cat([prompt.expand(len(labels), -1), answers], dim=1)
    targets = torch.cat([torch.full((len(labels), prompt.numel()), -100), answers], dim=1)
    return input_ids, targets


def train_language_side(
    llava: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    images: list,
    shapes: torch.Tensor,
    spec: LlavaSpec,
    seed: int,
) -> list[float]:
    """Train the projector and the language model in place (the tower frozen); returns each step's loss (nats)."""
    llava.model.vision_tower.requires_grad_(False)
    trained = [p for name, p in llava.named_parameters() if "vision_tower" not in name]
    optimizer = torch.optim.AdamW(trained, lr=spec.learning_rate, weight_decay=0.0)
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    input_ids, targets = training_batch(processor, shapes)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    llava.train()
    for step in tqdm(range(spec.steps), desc="training the language side", leave=False):
        scale = (step + 1) / spec.warmup if step < spec.warmup else 0.5 * (1 + math.cos(math.pi * step / spec.steps))
        for group in optimizer.param_groups:
            group["lr"] = spec.learning_rate * scale
        batch = torch.randint(len(shapes), (spec.batch_size,), generator=generator)
        loss = llava(input_ids=input_ids[batch], pixel_values=pixels[batch], labels=targets[batch]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    llava.eval()
    return losses


def explain_scenes(
    llava: LlavaForConditionalGeneration, processor: LlavaProcessor, scenes, keep_maps: int
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Answer and map every scene with every :data:`MAP_SETTINGS` entry.

    Returns one row per scene (answer, correctness, and per map setting the :func:`map_summary` of the first answer
    token's map against the object mask, plus its image share), and the first `keep_maps` maps of each setting
    ``(keep_maps, rows, columns)``.
    """
    rows, kept = [], {name: [] for name in MAP_SETTINGS}
    for i, (image, mask, label) in enumerate(zip(scenes["image"], scenes["mask"], scenes["label"])):
        truth = SHAPES[label % len(SHAPES)]
        row = {"shape": truth, "maps": {}}
        for name, options in MAP_SETTINGS.items():
            explanation = llava_relevance(llava, processor, image.convert("RGB"), PROMPT, max_new_tokens=2, **options)
            token_map = explanation.maps[0]  # the first answer token: the shape word when the model answers one
            row["answer"] = explanation.answer
            row["maps"][name] = {
                **map_summary(token_map, torch.from_numpy(np.asarray(mask) > 0)),
                "image_share": explanation.image_share[0].item(),
            }
            if i < keep_maps:
                kept[name].append(token_map)
        row["correct"] = row["answer"].split()[:1] == [truth]
        rows.append(row)
    return rows, {name: torch.stack(maps) for name, maps in kept.items() if maps}


def summarise(rows: list[dict]) -> dict:
    """Accuracy and, per map setting, the mean of each metric over the scenes."""
    summary = {"accuracy": float(np.mean([r["correct"] for r in rows])), "maps": {}}
    for name in MAP_SETTINGS:
        keys = [*MAP_METRICS, "image_share"]
        summary["maps"][name] = {k: float(np.mean([r["maps"][name][k] for r in rows])) for k in keys}
    return summary


def paired_differences(base_rows: list[dict], aft_rows: list[dict]) -> dict:
    """Per map setting and metric: mean of (AFT − base) over the same scenes, its standard error, and the number of
    scenes where AFT is higher, lower."""
    out = {}
    for name in MAP_SETTINGS:
        out[name] = {}
        for metric in MAP_METRICS:
            d = np.array([a["maps"][name][metric] - b["maps"][name][metric] for a, b in zip(aft_rows, base_rows)])
            se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
            out[name][metric] = {"mean": float(d.mean()), "se": se, "higher": int((d > 0).sum()),
                                 "lower": int((d < 0).sum())}  # fmt: skip
    return out


def write_figure(pixels: torch.Tensor, maps: dict, titles: list[str], path: str) -> None:
    """Rows: test scenes; columns: image, then the :data:`FIGURE_COLUMNS` LLaVAs' attention, then their relevancy.

    `maps`: ``(language side, tower) -> map setting -> (N, rows, columns)``."""
    shown, labels = {"LLaVA attention": "attention", "LLaVA relevancy": "relevancy"}, list(FIGURE_COLUMNS)
    grid = {(title, label): maps[FIGURE_COLUMNS[label]][name] for title, name in shown.items() for label in labels}
    atomic_write(path, lambda p: saliency_grid(pixels, grid, labels, list(shown), p, cell=128, titles=titles))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="Folder for results.json.")
    parser.add_argument("--figure", default=DEFAULT_FIGURE, help="PNG path of the base-vs-AFT figure.")
    parser.add_argument("--tower_cache", default=None, help="Folder keeping the built towers between runs.")
    parser.add_argument("--seed", type=int, default=0, help="Laptop-scale seed of the towers (and of the LLaVA).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the laptop-scale towers exactly).")
    parser.add_argument("--smoke", action="store_true", help="Toy sizes, seconds: checks the pipeline only.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = SMOKE_SPEC if args.smoke else LlavaSpec()
    config = tower_config(args.smoke)
    start, seconds = time.perf_counter(), {}

    clock = time.perf_counter()
    towers = load_or_build_towers(config, args.seed, args.tower_cache)
    seconds["towers"] = time.perf_counter() - clock
    processor = llava_processor(towers.base)

    clock = time.perf_counter()
    train = make_scenes(args.seed, spec.train_size, config.scenes)
    test = make_scenes(args.seed, spec.eval_size, config.scenes, start=SPLIT_OFFSETS["test"])
    seconds["scenes"] = time.perf_counter() - clock

    clock = time.perf_counter()
    llavas = {("random", "base"): build_llava(towers.base, processor, spec, args.seed)}
    llavas["own", "aft"] = swap_llava_vision_tower(copy.deepcopy(llavas["random", "base"]), towers.aft)
    llavas["trained", "base"] = copy.deepcopy(llavas["random", "base"])
    shapes = torch.tensor(train["label"]) % len(SHAPES)
    images = [image.convert("RGB") for image in train["image"]]
    losses = {tower: train_language_side(llavas[side, tower], processor, images, shapes, spec, args.seed)
              for side, tower in (("trained", "base"), ("own", "aft"))}  # fmt: skip
    seconds["train_language_side"] = time.perf_counter() - clock
    for side in ("trained", "random"):
        # Same language side, AFT tower: only the tower's weights differ.
        llavas[side, "aft"] = swap_llava_vision_tower(copy.deepcopy(llavas[side, "base"]), towers.aft)

    clock = time.perf_counter()
    rows, maps = {}, {}
    for side, tower in tqdm(llavas, desc="explaining", leave=False):
        keep = spec.figure_images if (side, tower) in FIGURE_COLUMNS.values() else 0
        rows[side, tower], maps[side, tower] = explain_scenes(llavas[side, tower], processor, test, keep)
    rows["own", "base"] = rows["trained", "base"]  # the base tower's own language side is the trained one
    seconds["explain"] = time.perf_counter() - clock

    masks = np.stack([np.asarray(m) > 0 for m in test["mask"]])
    results = {
        "command": "python experiments/llava_maps/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "tower_config": config.to_dict(),
        "llava_spec": dataclasses.asdict(spec),
        "seed": args.seed,
        "prompt": PROMPT,
        "answer_token": "the first generated token (the shape word when the answer is one)",
        "tower_pretrain_final_loss": towers.pretrain_final_loss,
        "tower_build_seconds": towers.seconds,
        "towers_from_cache": towers.world is None,
        "language_side_loss": {  # nats per supervised token (shape word and end token), trained on each tower
            tower: {"first_10": float(np.mean(curve[:10])), "last_50": float(np.mean(curve[-50:]))}
            for tower, curve in losses.items()
        },
        "mask_share": float(masks.mean()),
        "summary": {side: {tower: summarise(rows[side, tower]) for tower in TOWERS} for side in LANGUAGE_SIDES},
        "aft_minus_base": {side: paired_differences(rows[side, "base"], rows[side, "aft"]) for side in LANGUAGE_SIDES},
        "per_image": {f"{side}/{tower}": rows[side, tower] for side, tower in llavas},
        "seconds": seconds,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": args.threads,
        },  # fmt: skip
    }
    shown = spec.figure_images
    figure_images = [image.convert("RGB") for image in list(test["image"])[:shown]]
    pixels = torch.from_numpy(np.stack([np.asarray(i) for i in figure_images])).permute(0, 3, 1, 2).float() / 255
    # Row titles: the true shape, then each column's answer, all shortened to 3 letters to fit under the image.
    answers = [[row["answer"][:3] or "-" for row in rows[key][:shown]] for key in FIGURE_COLUMNS.values()]
    titles = [f"{r['shape'][:3]}: " + " ".join(a) for r, a in zip(rows["trained", "base"], zip(*answers))]
    os.makedirs(args.output, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.figure)), exist_ok=True)
    write_figure(pixels, maps, titles, args.figure)
    seconds["total"] = time.perf_counter() - start
    write_json_atomic(os.path.join(args.output, "results.json"), results)
    print(report_markdown(results))
    return results


def report_markdown(results: dict) -> str:
    """The summary table: accuracy and each map setting's metrics, base → AFT, per language side."""
    lines = [f"Mask share (energy pointing game of a uniform map): {results['mask_share']:.3f}", ""]
    header = ["language side", "map", "accuracy base → AFT", *(f"{m} base → AFT (Δ ± se)" for m in MAP_METRICS)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for side in LANGUAGE_SIDES:
        base, aft = results["summary"][side]["base"], results["summary"][side]["aft"]
        for name in MAP_SETTINGS:
            delta = results["aft_minus_base"][side][name]
            cells = [
                f"{base['maps'][name][m]:.3f} → {aft['maps'][name][m]:.3f} "
                f"({delta[m]['mean']:+.3f} ± {delta[m]['se']:.3f})"
                for m in MAP_METRICS
            ]
            lines.append(
                f"| {side} | {name} | {base['accuracy']:.2f} → {aft['accuracy']:.2f} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
