"""Where LLaVA's answer looks, with its original vision tower and with an AFT tower swapped in.

    python recipes/llava_explain.py --llava llava-hf/llava-1.5-7b-hf --vision org/clip-aft-vit-l-14-336 \\
        --images <folder or dataset> --prompt "What is the main object in this picture?" --output llava-maps/
    hf-clip-aft llava_explain recipes/configs/llava_explain.yaml

For each image, the original LLaVA and the same LLaVA with the AFT tower (`swap_llava_vision_tower`) answer the
prompt greedily; each answer token's relevance over the image patches is computed by
`hf_clip_aft.interpret.llava_relevance.llava_relevance`. Writes:

- ``<output>/figures/<nnnn>_<name>.png``: rows are the summary map (the whole answer, or ``--word``) then one row
  per answer token (both answers' tokens named in the row title); columns are the image, the original tower's map
  and the AFT tower's map;
- ``<output>/overview.png``: one row per image with the two summary maps;
- ``<output>/results.json`` (schema ``hf_clip_aft.llava_explain/v1``): settings, both answers and tokens, each
  summary map's peak patch, Gini sparsity and image share, with a mask column the suite's localisation metrics
  (pointing game, energy pointing game, top-k% IoU), and their means per tower.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

from hf_clip_aft import swap_llava_vision_tower
from hf_clip_aft.data import (
    find_image_column,
    images_to_pixels,
    load_image_dataset,
    open_image,
    prepare_dataset,
)
from hf_clip_aft.files import atomic_write, write_json_atomic
from hf_clip_aft.interpret.batches import check_mask_size, find_mask_column, localisation_masks, open_mask
from hf_clip_aft.interpret.figures import saliency_grid
from hf_clip_aft.interpret.llava_relevance import (
    MAX_NEW_TOKENS_LIMIT,
    METHODS,
    LlavaExplanation,
    check_llava_architecture,
    explained_tokens,
    llava_relevance,
    map_summary,
)

SCHEMA = "hf_clip_aft.llava_explain/v1"
TOWERS = ("original", "aft")
TOWER_LABELS = {"original": "original tower", "aft": "AFT tower"}
LOCALISATION = ("pointing_game", "energy_pointing_game", "top_k_iou")


@dataclass
class LlavaExplainArguments:
    llava: str = field(metadata={"help": "LLaVA-1.5 checkpoint in transformers format (Hub id or folder)."})
    vision: str = field(metadata={"help": "The AFT CLIP to swap in (an exported folder or its Hub repo)."})
    images: str = field(metadata={"help": "A folder of images (imagefolder) or a Hub dataset id."})
    output: str = field(metadata={"help": "Folder for results.json, overview.png and figures/."})
    prompt: str = field(
        default="What is the main object in this picture?",
        metadata={"help": "The question; the image token and the processor's chat template are added if absent."},
    )
    max_new_tokens: int = field(
        default=16,
        metadata={"help": f"Answer length cap in tokens (1 to {MAX_NEW_TOKENS_LIMIT})."},
    )
    word: str | None = field(
        default=None,
        metadata={"help": "Summarise the tokens of this word when an answer contains it (else the whole answer)."},
    )
    method: str = field(
        default="attention",
        metadata={"help": "attention (head/layer-averaged, first token removed) or relevancy (Chefer's rule)."},
    )
    vision_weighting: bool = field(
        default=False,
        metadata={"help": "Carry the maps back through the vision tower up to the layer LLaVA reads."},
    )
    split: str = field(default="train", metadata={"help": "Dataset split."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name, if any."})
    image_column: str | None = field(
        default=None,
        metadata={"help": "Image column; the first Image column if unset."},
    )
    mask_column: str | None = field(
        default=None,
        metadata={"help": "Object-mask column for localisation metrics; 'mask'/'segmentation'/'annotation' if unset."},
    )
    limit: int | None = field(
        default=None,
        metadata={"help": "Explain only the first N images (dataset order)."},
    )
    figure_tokens: int = field(
        default=8,
        metadata={"help": "Answer tokens shown as rows of each image's figure."},
    )
    iou_fraction: float = field(
        default=0.2,
        metadata={"help": "Share of top pixels compared with the mask (IoU)."},
    )
    device: str = field(
        default="auto",
        metadata={"help": "auto (cuda if available, else cpu), cpu, cuda, cuda:1..."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "auto (bfloat16 on a GPU, float32 on a CPU) or a dtype."},
    )


ARGUMENTS = (LlavaExplainArguments,)


def _load(args: LlavaExplainArguments) -> tuple[LlavaForConditionalGeneration, object]:
    config = AutoConfig.from_pretrained(args.llava)
    hint = " (the AFT CLIP goes to --vision)" if config.model_type == "clip" else ""
    for name in config.architectures or []:
        try:
            check_llava_architecture(name)  # before loading gigabytes
        except (TypeError, NotImplementedError) as err:
            raise type(err)(f"--llava {args.llava!r}: {err}{hint}") from err
    if config.model_type != "llava":
        raise TypeError(
            f"--llava {args.llava!r} holds a {config.model_type!r} model, not a LLaVA-1.5 one (model_type 'llava', "
            f"e.g. llava-hf/llava-1.5-7b-hf){hint}."
        )
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if device.startswith("cuda") else "float32"
    model = LlavaForConditionalGeneration.from_pretrained(args.llava, dtype=dtype, attn_implementation="eager")
    return model.to(device).eval(), AutoProcessor.from_pretrained(args.llava)


def _rows(args: LlavaExplainArguments):
    """``(name, image, mask or None)`` for each image, in dataset order."""
    dataset = load_image_dataset(args.images, args.dataset_config, split=args.split)
    image_column = find_image_column(dataset.features, args.image_column)
    mask_column = find_mask_column(dataset.features, image_column, args.mask_column)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"limit={args.limit} must be a positive number of images (or omitted for all).")
        dataset = dataset.select(range(min(args.limit, len(dataset))))
    dataset = prepare_dataset(dataset, image_column)
    if mask_column is not None:
        dataset = prepare_dataset(dataset, mask_column)
    rows = []
    for index, row in enumerate(dataset):
        value = row[image_column]
        stem = Path(value.get("path") or "").stem if isinstance(value, dict) else ""
        name = f"{index:04d}_{stem}" if stem else f"{index:04d}"
        image = open_image(value)
        mask = None if mask_column is None else open_mask(row[mask_column])
        if mask is not None:
            check_mask_size(image, mask, f"row {index} ({name})")
        rows.append((name, image, mask))
    return rows, mask_column


def _method_label(args: LlavaExplainArguments) -> str:
    return f"LLaVA {args.method}" + (" + tower" if args.vision_weighting else "")


def _tower_entry(explanation: LlavaExplanation, args, special_ids, mask) -> tuple[dict, torch.Tensor]:
    """One tower's entry for one image; `mask` is None or ``(objects, annotated)`` of :func:`localisation_masks`."""
    indices, explained = explained_tokens(explanation, args.word, special_ids)
    summary_map = explanation.maps[indices].mean(dim=0)
    objects, annotated = (None, None) if mask is None else (mask[0][0], mask[1][0])
    entry = {
        "answer": explanation.answer,
        "tokens": explanation.tokens,
        "token_ids": explanation.token_ids,
        "explained": explained,
        "explained_tokens": indices,
        "image_share": explanation.image_share[indices].mean().item(),
        **map_summary(summary_map, objects, args.iou_fraction, annotated),
    }
    return entry, summary_map


def _image_figure(pixels, explanations, summaries, entries, args, path: Path) -> None:
    """Rows: the summary map, then the first ``figure_tokens`` answer tokens; columns: image, original, AFT."""
    original, aft = explanations["original"], explanations["aft"]
    count = min(args.figure_tokens, max(len(original.token_ids), len(aft.token_ids)))
    kind = {entries[t]["explained"] for t in TOWERS}
    titles = [f"'{args.word}'" if kind == {"word"} else "answer"]
    maps = {}
    for tower in TOWERS:
        token_maps = explanations[tower].maps
        blank = torch.zeros_like(token_maps[0]) if len(token_maps) else torch.zeros_like(summaries[tower])
        rows = [summaries[tower]] + [token_maps[i] if i < len(token_maps) else blank for i in range(count)]
        maps[_method_label(args), TOWER_LABELS[tower]] = torch.stack(rows)
    for i in range(count):
        pair = [e.tokens[i].strip() if i < len(e.tokens) else "-" for e in (original, aft)]
        titles.append(f"{i}: {pair[0]}|{pair[1]}")
    grid = pixels.expand(len(titles), -1, -1, -1)
    labels = [TOWER_LABELS[t] for t in TOWERS]
    atomic_write(
        path,
        lambda p: saliency_grid(grid, maps, labels, [_method_label(args)], p, cell=128, titles=titles),
    )


def _mean(values: list[float | None]) -> float | None:
    """The mean of the values present (None for an image without the number); None when there is none."""
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def main(args: LlavaExplainArguments) -> dict:
    """Explain both towers' answers for every image; write figures, overview and results to ``args.output``."""
    if args.method not in METHODS:
        raise ValueError(f"method={args.method!r} is not one of {METHODS}.")
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise ValueError(f"max_new_tokens={args.max_new_tokens} must lie in [1, {MAX_NEW_TOKENS_LIMIT}].")
    rows, mask_column = _rows(args)
    if not rows:
        raise ValueError(f"No images in {args.images} (split {args.split!r}).")
    model, processor = _load(args)
    special_ids = processor.tokenizer.all_special_ids
    explanations: dict[str, list[LlavaExplanation]] = {}
    for tower in TOWERS:
        if tower == "aft":
            swap_llava_vision_tower(model, args.vision)  # in memory only: nothing is saved
        explanations[tower] = [
            llava_relevance(
                model,
                processor,
                image,
                args.prompt,
                method=args.method,
                vision_weighting=args.vision_weighting,
                max_new_tokens=args.max_new_tokens,
            )
            for _, image, _ in tqdm(rows, desc=f"{TOWER_LABELS[tower]} answers")
        ]

    output = Path(args.output)
    (output / "figures").mkdir(parents=True, exist_ok=True)
    images, overview = [], {(_method_label(args), TOWER_LABELS[t]): [] for t in TOWERS}
    all_pixels = []
    for index, (name, image, mask_image) in enumerate(rows):
        pixels = images_to_pixels([image], processor.image_processor)
        mask = None if mask_image is None else localisation_masks([mask_image], processor.image_processor)
        entries, summaries, per_image = {}, {}, {}
        for tower in TOWERS:
            per_image[tower] = explanations[tower][index]
            entries[tower], summaries[tower] = _tower_entry(per_image[tower], args, special_ids, mask)
            overview[_method_label(args), TOWER_LABELS[tower]].append(summaries[tower])
        figure = output / "figures" / f"{name}.png"
        _image_figure(pixels, per_image, summaries, entries, args, figure)
        all_pixels.append(pixels)
        images.append({"name": name, "figure": f"figures/{figure.name}", **entries})

    labels = [TOWER_LABELS[t] for t in TOWERS]
    stacked = {key: torch.stack(maps) for key, maps in overview.items()}
    titles = [f"{image['original']['answer']} | {image['aft']['answer']}" for image in images]
    atomic_write(
        output / "overview.png",
        lambda p: saliency_grid(
            torch.cat(all_pixels),
            stacked,
            labels,
            [_method_label(args)],
            p,
            cell=128,
            titles=titles,
        ),
    )
    numbers = ["image_share", "gini"] + (list(LOCALISATION) if mask_column else [])
    means = {tower: {k: _mean([i[tower].get(k) for i in images]) for k in numbers} for tower in TOWERS}
    results = {
        "schema": SCHEMA,
        "settings": {**asdict(args), "mask_column": mask_column},
        "towers": {"original": args.llava, "aft": args.vision},
        "images": images,
        "mean": means,
        "difference_aft_minus_original": {
            k: None if means["aft"][k] is None else means["aft"][k] - means["original"][k] for k in numbers
        },
    }
    unscored = sum(LOCALISATION[0] not in image["original"] for image in images) if mask_column else 0
    if unscored:
        results["settings"]["notes"] = [
            f"localisation: {unscored} of {len(images)} images skipped: no annotated (mask value 255) or no object "
            "pixel in the crop."
        ]
        print(results["settings"]["notes"][0])
    write_json_atomic(output / "results.json", results)
    print(
        f"Wrote {output / 'results.json'}, {output / 'overview.png'} and {len(images)} figures in {output / 'figures'}"
    )
    return results
