"""Model cards: README.md of an exported AFT CLIP (and of a LLaVA with an AFT vision tower).

Cards are rendered from the Jinja templates in ``hf_clip_aft/model_cards/`` (also reachable as ``model_cards/`` at
the repository root) through huggingface_hub's `ModelCard`, `ModelCardData` and `EvalResult`, so that the metadata
and the ``model-index`` parse back on the Hub. Evaluation numbers come only from the evaluation suite's JSON
(``recipes/evaluate.py``); with none, the card has no numbers. A card names no local path: local datasets and
models appear by folder name only.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, is_offline_mode

from .config import AFTConfig
from .export import CARD_NAME, TRAINING_INFO_NAME, hub_id, is_local_path
from .interpret.results import SCHEMA as EVAL_SCHEMA

logger = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).parent / "model_cards"
CLIP_TEMPLATE = TEMPLATES_DIR / "clip_aft.md.jinja"
LLAVA_TEMPLATE = TEMPLATES_DIR / "llava_aft.md.jinja"
# The saliency comparison recipes/evaluate.py writes beside its results.json; the card shows it when present.
EVAL_FIGURE_NAME = "saliency_grid.png"
TRAINING_SCHEMA = "hf_clip_aft.training/v1"
TAGS = ["clip", "adversarial-training", "interpretability", "hf_clip_aft"]
SALIENCY_FIGURE_STEM = "saliency_comparison"

# The AFT fields of AFTConfig and the TrainingArguments the card reports, in the card's order.
_HYPERPARAMETERS = (
    "attack_eps", "attack_step_size", "attack_steps", "attack_norm", "attack_eta", "noise_sigma", "loss_type",
    "clean_weight", "embedding_normalize", "prompt_template", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim", "max_grad_norm",
    "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps", "seed",
)  # fmt: skip

PAPER_BIBTEX = """@inproceedings{gong2025boosting,
  title     = {Boosting the Visual Interpretability of {CLIP} via Adversarial Fine-tuning},
  author    = {Gong, Shizhan and Lei, Haoyu and Dou, Qi and Farnia, Farzan},
  booktitle = {The Thirteenth International Conference on Learning Representations (ICLR)},
  year      = {2025}
}"""
LIBRARY_BIBTEX = """@software{hf_clip_aft,
  title   = {hf\\_clip\\_aft: adversarial fine-tuning of {CLIP} on the Hugging Face stack},
  version = {%s}
}"""


def public_name(name: str | None) -> str | None:
    """`name` when it is a Hub id; a local path's last component otherwise (a card names no local path)."""
    if not name:
        return None
    return Path(str(name).rstrip("/\\")).name if is_local_path(name) else str(name)


def _on_hub(name: str | None) -> bool:
    return bool(name) and hub_id(name) is not None


def hardware_description(device: torch.device | str, num_processes: int = 1) -> str:
    """``"<processes> × <device name>"``, e.g. ``"8 × NVIDIA H100 80GB HBM3"`` or ``"2 × CPU"``."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "xpu":
        name = torch.xpu.get_device_name(device)
    else:
        name = {"cpu": "CPU", "mps": "Apple GPU (MPS)"}.get(device.type, device.type)
    return f"{num_processes} × {name}"


def _precision(args: AFTConfig) -> str:
    precision = "bf16 mixed precision" if args.bf16 else "fp16 mixed precision" if args.fp16 else "fp32"
    return precision + (", TF32 matmuls" if args.tf32 else "")


def training_summary(
    args: AFTConfig | Mapping[str, Any] | None,
    *,
    base_model: str | None = None,
    dataset_name: str | None = None,
    train_runtime: float | None = None,
    hardware: str | None = None,
    global_steps: int | None = None,
    weights_source: str | None = None,
) -> dict[str, Any]:
    """What a card says about training, as JSON-able data (saved beside the card as ``aft_training.json``).

    Args:
        args: the run's `AFTConfig`, or a summary saved earlier (its entries are kept unless overridden here), or
            None when the training details are unknown.
        base_model: the Hub id of the CLIP that was fine-tuned (a local path is reduced to its folder name).
        dataset_name: the training dataset (Hub id, or a local folder, reduced to its name).
        train_runtime: wall-clock training time in seconds.
        hardware: e.g. :func:`hardware_description`'s ``"8 × NVIDIA H100 80GB HBM3"``.
        global_steps: optimiser steps run.
        weights_source: for weights imported rather than trained here, the checkpoint they came from (a Hub
            repo and file, or a local file, reduced to its name).
    """
    if isinstance(args, AFTConfig):
        hp = {name: getattr(args, name) for name in _HYPERPARAMETERS}
        hp = {k: getattr(v, "value", v) for k, v in hp.items()}  # enums (scheduler, optimiser) as their names
        hp.update(num_processes=args.world_size, precision=_precision(args))
        versions = {p: version(p) for p in ("hf_clip_aft", "transformers", "torch")}
        summary: dict[str, Any] = {"hyperparameters": hp, "versions": versions}
    elif isinstance(args, Mapping):
        if args.get("schema") != TRAINING_SCHEMA:
            raise ValueError(f"Not a training summary (schema {args.get('schema')!r}, expected {TRAINING_SCHEMA!r}).")
        summary = dict(args)
    elif args is None:
        summary = {"hyperparameters": None, "versions": None}
    else:
        raise TypeError(f"args must be an AFTConfig, a saved training summary or None, got {type(args).__name__}.")
    overrides = {
        "base_model": public_name(base_model),
        "base_model_on_hub": _on_hub(base_model) if base_model else None,
        "dataset": public_name(dataset_name),
        "dataset_on_hub": _on_hub(dataset_name) if dataset_name else None,
        "train_runtime_s": train_runtime,
        "hardware": hardware,
        "global_steps": global_steps,
        "weights_source": public_name(weights_source),
    }
    summary.update({k: v for k, v in overrides.items() if v is not None})
    for key in overrides:
        summary.setdefault(key, None)
    summary["schema"] = TRAINING_SCHEMA
    return summary


def load_training_summary(folder: str | Path) -> dict[str, Any] | None:
    """The training summary of a checkpoint folder, or None when it holds none.

    Read from ``aft_training.json`` (saved with an export's card), else rebuilt from a Trainer checkpoint's
    ``training_args.bin`` and ``trainer_state.json`` (without the base model, dataset, hardware and time, which
    those files do not record).
    """
    folder = Path(folder)
    if (folder / TRAINING_INFO_NAME).is_file():
        return json.loads((folder / TRAINING_INFO_NAME).read_text())
    if not (folder / "training_args.bin").is_file():
        return None
    # The run's own pickled AFTConfig, which Trainer also unpickles to resume: a file this user wrote.
    args = torch.load(folder / "training_args.bin", weights_only=False)
    state_path = folder / "trainer_state.json"
    steps = json.loads(state_path.read_text()).get("global_step") if state_path.is_file() else None
    if not isinstance(args, AFTConfig):
        return None
    # The software versions installed now need not be those the run used.
    return {**training_summary(args, global_steps=steps), "versions": None}


def _budget(value: float, symbol: str) -> str:
    return f"{symbol} = {value:g}/255 (≈ {value / 255:.4f} in [0, 1] pixels)"


def hyperparameter_rows(hp: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(what, value with units, AFTConfig field)`` rows for the card's hyper-parameter table."""
    rows = [
        ("Attack radius", _budget(hp["attack_eps"], "ε"), "attack_eps"),
        ("PGD step size", _budget(hp["attack_step_size"], "α"), "attack_step_size"),
        ("PGD steps", f"K = {hp['attack_steps']}", "attack_steps"),
        ("Perturbation budget", str(hp["attack_norm"]), "attack_norm"),
    ]
    if hp["attack_norm"] in ("huber", "elastic"):
        rows.append(("Norm penalty scale", _budget(hp["attack_eta"], "η"), "attack_eta"))
    rows += [
        ("Smoothing noise std", _budget(hp["noise_sigma"], "σ"), "noise_sigma"),
        ("Outer loss", str(hp["loss_type"]), "loss_type"),
        ("Clean-loss weight", f"w = {hp['clean_weight']:g}", "clean_weight"),
        ("L2-normalised embeddings", "yes" if hp["embedding_normalize"] else "no", "embedding_normalize"),
    ]
    if hp["loss_type"] == "tecoa":
        rows.append(("Class prompt", f"`{hp['prompt_template']}`", "prompt_template"))
    warmup = hp["warmup_steps"]
    warmup_text = f"{warmup:.0%} of the optimiser steps" if 0 < warmup < 1 else f"{int(warmup)} optimiser steps"
    global_batch = hp["per_device_train_batch_size"] * hp["gradient_accumulation_steps"] * hp["num_processes"]
    length = f"{hp['max_steps']} optimiser steps" if hp["max_steps"] > 0 else f"{hp['num_train_epochs']:g} epochs"
    rows += [
        (
            "Optimiser",
            f"{hp['optim']}, β₁ = {hp['adam_beta1']:g}, β₂ = {hp['adam_beta2']:g}, ε = {hp['adam_epsilon']:g}",
            "optim, adam_beta1, adam_beta2, adam_epsilon",
        ),
        ("Peak learning rate", f"{hp['learning_rate']:g}", "learning_rate"),
        ("Schedule", f"{hp['lr_scheduler_type']}, linear warm-up over {warmup_text}", "lr_scheduler_type, warmup_steps"),
        ("Weight decay", f"{hp['weight_decay']:g}", "weight_decay"),
        ("Gradient clipping", f"max L2 norm {hp['max_grad_norm']:g}", "max_grad_norm"),
        (
            "Batch size",
            f"{global_batch} images = {hp['per_device_train_batch_size']} per device × "
            f"{hp['gradient_accumulation_steps']} accumulation steps × {hp['num_processes']} "
            f"process{'es' if hp['num_processes'] != 1 else ''}",
            "per_device_train_batch_size, gradient_accumulation_steps",
        ),
        ("Training length", length, "max_steps" if hp["max_steps"] > 0 else "num_train_epochs"),
        ("Precision", str(hp["precision"]), "bf16, fp16, tf32"),
        ("Seed", str(hp["seed"]), "seed"),
    ]  # fmt: skip
    return rows


def format_duration(seconds: float) -> str:
    """``"2 h 03 min (7380 s)"``."""
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours} h {rest // 60:02d} min ({seconds:.0f} s)"


def load_eval_report(path: str | Path) -> dict[str, Any]:
    """The evaluation suite's JSON, checked: its schema, and results with a model, task, metric and finite value.

    Read leniently (the suite's own validator is strict): malformed result entries are dropped with a warning
    rather than failing a release over one bad line.
    """
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"Cannot read the evaluation results {path}: {err}") from err
    if not isinstance(report, dict) or report.get("schema") != EVAL_SCHEMA:
        found = report.get("schema") if isinstance(report, dict) else type(report).__name__
        raise ValueError(f"{path} is not an evaluation report (schema {found!r}, expected {EVAL_SCHEMA!r}).")
    if not isinstance(report.get("dataset"), dict) or not report["dataset"].get("name"):
        raise ValueError(f"{path}: the report names no dataset (dataset.name).")
    results = []
    for entry in report.get("results") or []:
        ok = isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("model", "task", "metric"))
        ok = ok and isinstance(entry.get("value"), (int, float)) and math.isfinite(entry["value"])
        if ok:
            results.append(entry)
        else:
            logger.warning("Skipping a malformed evaluation result in %s: %r", path, entry)
    return {**report, "results": results}


def _settings_text(settings: Any) -> str:
    if not isinstance(settings, dict):
        return ""
    items = [f"{k}={public_name(v) if isinstance(v, str) else v}" for k, v in settings.items()]
    return ", ".join(item for item, v in zip(items, settings.values()) if isinstance(v, (str, int, float, bool)))


def select_eval_model(report: Mapping[str, Any], eval_model: str | None, base_model: str | None) -> str:
    """Which of the report's models is this one: `eval_model`, or the only one that is not the base model."""
    models = sorted({r["model"] for r in report["results"]})
    if eval_model is not None:
        if eval_model not in models:
            raise ValueError(f"eval_model={eval_model!r} has no results in the report; its models: {models}.")
        return eval_model
    candidates = [m for m in models if m != base_model]
    if len(candidates) != 1:
        raise ValueError(f"Cannot tell which of {models} is this model: pass eval_model (--eval_model) naming it.")
    return candidates[0]


def eval_results(report: Mapping[str, Any], model: str) -> list[EvalResult]:
    """The `EvalResult` entries (the card's model-index) of `model`'s results in an evaluation report."""
    dataset = report["dataset"]
    name = public_name(dataset["name"])
    out = []
    for r in report["results"]:
        if r["model"] != model:
            continue
        label = r["metric"] + (f" ({r['method']})" if r.get("method") else "")
        settings = _settings_text(r.get("settings"))
        out.append(
            EvalResult(
                task_type=r["task"],
                task_name=r["task"].replace("-", " ").capitalize(),
                dataset_type=name,
                dataset_name=name,
                dataset_config=dataset.get("config"),
                dataset_split=dataset.get("split"),
                metric_type=r["metric"],
                metric_value=float(r["value"]),
                metric_name=label + (f" [{settings}]" if settings else ""),
            )
        )
    return out


def _result_rows(report: Mapping[str, Any], model: str, base_model: str | None) -> list[dict[str, str]]:
    """Every model's results as table rows (this model, the base, and whatever else was evaluated with them)."""

    def who(m: str) -> str:
        return "**this model**" if m == model else f"base ({public_name(m)})" if m == base_model else public_name(m)

    rows = [
        {
            "model": who(r["model"]),
            "task": r["task"],
            "metric": r["metric"],
            "method": r.get("method") or "",
            "settings": _settings_text(r.get("settings")),
            "value": f"{r['value']:.4g}",
        }
        for r in report["results"]
    ]
    return sorted(rows, key=lambda row: (row["task"], row["metric"], row["method"], row["settings"], row["model"]))


def base_license(base_model: str | None) -> str | None:
    """The license declared in the base model's card (a local folder's README.md, or the Hub), None if unknown."""
    if not base_model:
        return None
    if is_local_path(base_model):
        readme = Path(base_model) / CARD_NAME
        return ModelCard.load(readme).data.license if readme.is_file() else None
    if is_offline_mode():
        return None
    try:
        info = HfApi().model_info(base_model, timeout=10)
    except Exception as err:  # noqa: BLE001 - a best-effort lookup: any failure means "license unknown"
        logger.warning("Could not read the license of %s from the Hub (%s); the card omits it.", base_model, err)
        return None
    return info.card_data.license if info.card_data else None


def render_model_card(
    args: AFTConfig | Mapping[str, Any] | None = None,
    *,
    base_model: str | None = None,
    dataset_name: str | None = None,
    train_runtime: float | None = None,
    hardware: str | None = None,
    global_steps: int | None = None,
    weights_source: str | None = None,
    eval_results_path: str | Path | None = None,
    eval_model: str | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    saliency_figure: str | None = None,
    has_adapter: bool = False,
) -> ModelCard:
    """The model card of an exported AFT CLIP.

    Args:
        args, base_model, dataset_name, train_runtime, hardware, global_steps, weights_source: see
            :func:`training_summary`.
        eval_results_path: the evaluation suite's JSON; its results for this model become the model-index.
        eval_model: the report's name for this model, when the report holds more than it and the base.
        repo_id: the Hub repository the card is for (used in the usage snippets and as the model name).
        license: the license; by default the base model's, read from its card (omitted when unknown).
        saliency_figure: file name, inside the model folder, of a saliency comparison figure.
        has_adapter: whether the folder holds the LoRA/DoRA adapter in ``adapter/``.
    """
    summary = training_summary(
        args,
        base_model=base_model,
        dataset_name=dataset_name,
        train_runtime=train_runtime,
        hardware=hardware,
        global_steps=global_steps,
        weights_source=weights_source,
    )
    base, base_is_hub = summary["base_model"], bool(summary["base_model_on_hub"])
    dataset = summary["dataset"]
    model_name = (repo_id or "").split("/")[-1] or (f"{base.split('/')[-1]}-AFT" if base else "clip-aft")

    results, rows = [], []
    report = load_eval_report(eval_results_path) if eval_results_path else None
    if report is not None and report["results"]:
        ours = select_eval_model(report, eval_model, base)
        results = eval_results(report, ours)
        rows = _result_rows(report, ours, base)
    datasets = [dataset] if summary["dataset_on_hub"] else []
    if report is not None and _on_hub(report["dataset"]["name"]):
        datasets.append(report["dataset"]["name"])
    license = license or (base_license(base) if base_is_hub else None)

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        base_model=base if base_is_hub else None,
        datasets=list(dict.fromkeys(datasets)) or None,
        license=license,
        tags=TAGS,
        model_name=model_name if results else None,
        eval_results=results or None,
    )
    hp = summary["hyperparameters"]
    return ModelCard.from_template(
        card_data,
        template_path=str(CLIP_TEMPLATE),
        model_name=model_name,
        model_id=repo_id or model_name,
        base_model=base,
        base_is_hub=base_is_hub,
        dataset=dataset,
        license=license,
        hp=hp,
        rows=hyperparameter_rows(hp) if hp else None,
        training_time=format_duration(summary["train_runtime_s"]) if summary["train_runtime_s"] else None,
        hardware=summary["hardware"],
        global_steps=summary["global_steps"],
        weights_source=summary["weights_source"],
        versions=summary["versions"],
        results=rows,
        eval_dataset=report and {**report["dataset"], "name": public_name(report["dataset"]["name"])},
        saliency_figure=saliency_figure,
        has_adapter=has_adapter,
        paper_bibtex=PAPER_BIBTEX,
        library_bibtex=LIBRARY_BIBTEX % version("hf_clip_aft"),
    )


def write_model_card(
    folder: str | Path,
    args: AFTConfig | Mapping[str, Any] | None = None,
    *,
    base_model: str | None = None,
    dataset_name: str | None = None,
    train_runtime: float | None = None,
    hardware: str | None = None,
    global_steps: int | None = None,
    weights_source: str | None = None,
    eval_results_path: str | Path | None = None,
    eval_model: str | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    saliency_figure: str | Path | None = None,
) -> ModelCard:
    """Write README.md (the card) and ``aft_training.json`` (what the card says about training) into an export.

    Arguments as for :func:`render_model_card`, except `saliency_figure`: a path to an image file, copied into the
    folder as ``saliency_comparison.<ext>`` (by default the ``saliency_grid.png`` that ``recipes/evaluate.py``
    wrote beside `eval_results_path`, if any). Call it after :func:`~hf_clip_aft.export.export_clip`; with `args` None
    the summary saved by an earlier call (if any) is reused, so a card can be re-rendered later with new results.
    """
    folder = Path(folder)
    summary = training_summary(
        args if args is not None else load_training_summary(folder),
        base_model=base_model,
        dataset_name=dataset_name,
        train_runtime=train_runtime,
        hardware=hardware,
        global_steps=global_steps,
        weights_source=weights_source,
    )
    if saliency_figure is None and eval_results_path is not None:
        candidate = Path(eval_results_path).parent / EVAL_FIGURE_NAME
        saliency_figure = candidate if candidate.is_file() else None
    figure = None
    if saliency_figure is not None:
        figure = f"{SALIENCY_FIGURE_STEM}{Path(saliency_figure).suffix.lower()}"
        if Path(saliency_figure).resolve() != (folder / figure).resolve():
            shutil.copyfile(saliency_figure, folder / figure)
    card = render_model_card(
        summary,
        eval_results_path=eval_results_path,
        eval_model=eval_model,
        repo_id=repo_id,
        license=license,
        saliency_figure=figure,
        has_adapter=(folder / "adapter").is_dir(),
    )
    (folder / TRAINING_INFO_NAME).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    card.save(folder / CARD_NAME)
    return card


def render_llava_card(
    llava_model: str,
    vision_model: str,
    *,
    repo_id: str | None = None,
    license: str | None = None,
    vision_feature_layer: int | list[int] = -2,
) -> ModelCard:
    """The card of a LLaVA checkpoint whose CLIP vision tower was replaced by an AFT one.

    Args:
        llava_model: the original LLaVA (Hub id; a local path is reduced to its folder name).
        vision_model: the AFT CLIP whose vision tower was swapped in (Hub id or local export).
        repo_id: the Hub repository the card is for.
        license: the license; by default the original LLaVA's, read from its card (omitted when unknown).
        vision_feature_layer: the tower layer LLaVA reads (from the LLaVA config).
    """
    llava, vision = public_name(llava_model), public_name(vision_model)
    bases = [m for m in (llava_model, vision_model) if _on_hub(m)]
    license = license or (base_license(llava_model) if _on_hub(llava_model) else None)
    model_name = (repo_id or "").split("/")[-1] or f"{llava.split('/')[-1]}-aft"
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=bases or None,
        license=license,
        tags=["llava", *TAGS],
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(LLAVA_TEMPLATE),
        model_name=model_name,
        model_id=repo_id or model_name,
        llava_model=llava,
        llava_is_hub=_on_hub(llava_model),
        vision_model=vision,
        vision_is_hub=_on_hub(vision_model),
        license=license,
        vision_feature_layer=vision_feature_layer,
        paper_bibtex=PAPER_BIBTEX,
        library_bibtex=LIBRARY_BIBTEX % version("hf_clip_aft"),
    )


def check_card(folder: str | Path) -> ModelCard:
    """The folder's README.md, parsed back as the Hub will (metadata and model-index); ValueError if it does not."""
    path = Path(folder) / CARD_NAME
    if not path.is_file():
        raise ValueError(f"{path} is missing: write the model card first (write_model_card).")
    text = path.read_text()
    card = ModelCard.load(path, ignore_metadata_errors=False)
    if "model-index" in text and not card.data.eval_results:
        raise ValueError(f"{path}: the model-index does not parse back into evaluation results.")
    return card
