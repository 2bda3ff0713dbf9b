"""Model cards: README.md of an exported AFT CLIP (and of a LLaVA with an AFT vision tower).

A CLIP card is rendered from the run's :class:`~hf_clip_aft.release.record.TrainingRecord` plus, optionally, the
evaluation suite's report, through the Jinja templates in ``hf_clip_aft/model_cards/`` (also reachable as
``model_cards/`` at the repository root) and huggingface_hub's `ModelCard`, `ModelCardData` and `EvalResult`, so that
the metadata and the ``model-index`` parse back on the Hub. Evaluation numbers come only from the evaluation suite's
JSON (``recipes/evaluate.py``), read and checked by :mod:`hf_clip_aft.interpret.results`; with none, the card has
no numbers. A card names no local path: local datasets and models appear by folder name only.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, is_offline_mode

from ..config import no_op_reasons
from .export import CARD_NAME
from .names import is_local_path, on_hub, public_name
from .record import TrainingRecord

logger = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).parents[1] / "model_cards"
CLIP_TEMPLATE = TEMPLATES_DIR / "clip_aft.md.jinja"
LLAVA_TEMPLATE = TEMPLATES_DIR / "llava_aft.md.jinja"
# The saliency comparison recipes/evaluate.py writes beside its results.json; the card shows it when present.
EVAL_FIGURE_NAME = "saliency_grid.png"
TAGS = ["clip", "adversarial-training", "interpretability", "hf_clip_aft"]
SALIENCY_FIGURE_STEM = "saliency_comparison"

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


@dataclass
class CardOptions:
    """What a CLIP card says beyond the training record and the evaluation report.

    Attributes:
        repo_id: the Hub repository the card is for (used in the usage snippets and as the model name).
        license: the license; by default the base model's, read from its card (omitted when unknown).
        eval_model: the report's name for this model, when the report holds more models than it and the base.
        saliency_figure: an image file (a saliency comparison), copied into the model folder by :func:`write_card`;
            by default the ``saliency_grid.png`` that ``recipes/evaluate.py`` wrote beside the report, if any.
        space_id: a Space showing this model (``namespace/name``, e.g. the comparison page of
            :mod:`~hf_clip_aft.release.space`), linked from the card.
    """

    repo_id: str | None = None
    license: str | None = None
    eval_model: str | None = None
    saliency_figure: str | Path | None = None
    space_id: str | None = None


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
    schedule = hp.get("attack_schedule", "pgd")  # records before the schedules existed: PGD
    if schedule != "pgd" or hp.get("attack_early_stop"):
        extra = {"free": f", m = {hp.get('attack_replays')} replays", "pgd": ", early stopping"}.get(schedule, "")
        rows.append(("Attack schedule", f"{schedule}{extra}", "attack_schedule"))
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
        (
            "Schedule",
            f"{hp['lr_scheduler_type']}, linear warm-up over {warmup_text}",
            "lr_scheduler_type, warmup_steps",
        ),
        ("Weight decay", f"{hp['weight_decay']:g}", "weight_decay"),
        ("Gradient clipping", f"max L2 norm {hp['max_grad_norm']:g}", "max_grad_norm"),
        (
            "Batch size",
            (
                f"{global_batch} images = {hp['per_device_train_batch_size']} per device × "
                f"{hp['gradient_accumulation_steps']} accumulation steps × {hp['num_processes']} "
                f"process{'es' if hp['num_processes'] != 1 else ''}"
            ),
            "per_device_train_batch_size, gradient_accumulation_steps",
        ),
        ("Training length", length, "max_steps" if hp["max_steps"] > 0 else "num_train_epochs"),
        ("Precision", str(hp["precision"]), "bf16, fp16, tf32"),
        ("Seed", str(hp["seed"]), "seed"),
    ]  # fmt: skip
    return rows


def format_duration(seconds: float) -> str:
    """``"2 h 03 min (7380 s)"``."""
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min ({seconds:.0f} s)"


def _monitor_rows(summary: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The card's "Interpretability during training" table from a record's ``training_evaluation``."""
    if not summary:
        return None
    base, final, best = summary["base"], summary["final"], summary["best"]
    rows = [(name, f"{base[name]:.4f}", f"{final[name]:.4f}", f"{best[name]:.4f}") for name in base if name in final]
    return {**summary, "rows": rows}


def read_eval_report(path: str | Path) -> dict[str, Any]:
    """The evaluation suite's results file, read and validated by :func:`hf_clip_aft.interpret.results.load_results`.

    Raises ValueError naming the first field that breaks the schema.
    """
    # Imported here: only a card with results needs the evaluation package (training never loads it).
    from ..interpret.results import load_results

    return load_results(path)


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


def _from_template(
    card_data: ModelCardData, template: Path, model_name: str, repo_id: str | None, **fields: Any
) -> ModelCard:
    """A card from one of our templates, with what every card shows: its name, repo id and the citations."""
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=model_name,
        model_id=repo_id or model_name,
        paper_bibtex=PAPER_BIBTEX,
        library_bibtex=LIBRARY_BIBTEX % version("hf_clip_aft"),
        **fields,
    )


def render_card(
    record: TrainingRecord,
    eval_report: Mapping[str, Any] | None = None,
    options: CardOptions | None = None,
    *,
    figure_name: str | None = None,
    has_adapter: bool = False,
) -> ModelCard:
    """The model card of an exported AFT CLIP.

    Args:
        record: the run's training record.
        eval_report: the evaluation suite's report (:func:`read_eval_report`); this model's results become the
            model-index.
        options: repository, license and which of the report's models this is (:class:`CardOptions`).
        figure_name: file name, inside the model folder, of a saliency comparison figure.
        has_adapter: whether the folder holds the LoRA/DoRA adapter in ``adapter/``.
    """
    options = options or CardOptions()
    base, base_is_hub = record.base_model, bool(record.base_model_on_hub)
    repo_id = options.repo_id
    model_name = (repo_id or "").split("/")[-1] or (f"{base.split('/')[-1]}-AFT" if base else "clip-aft")

    results, rows = [], []
    if eval_report is not None and eval_report["results"]:
        ours = select_eval_model(eval_report, options.eval_model, base)
        results = eval_results(eval_report, ours)
        rows = _result_rows(eval_report, ours, base)
    datasets = [record.dataset] if record.dataset_on_hub else []
    if eval_report is not None and on_hub(eval_report["dataset"]["name"]):
        datasets.append(eval_report["dataset"]["name"])
    license = options.license or (base_license(base) if base_is_hub else None)

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
    hp = record.hyperparameters
    return _from_template(
        card_data,
        CLIP_TEMPLATE,
        model_name,
        repo_id,
        base_model=base,
        base_is_hub=base_is_hub,
        dataset=record.dataset,
        license=license,
        hp=hp,
        not_aft=no_op_reasons(hp) if hp else None,
        rows=hyperparameter_rows(hp) if hp else None,
        training_time=format_duration(record.train_runtime_s) if record.train_runtime_s else None,
        hardware=record.hardware,
        global_steps=record.global_steps,
        weights_source=record.weights_source,
        versions=record.versions,
        monitor=_monitor_rows(record.training_evaluation),
        results=rows,
        eval_dataset=eval_report and {**eval_report["dataset"], "name": public_name(eval_report["dataset"]["name"])},
        saliency_figure=figure_name,
        has_adapter=has_adapter,
        space_id=options.space_id,
    )


def write_card(
    folder: str | Path,
    record: TrainingRecord | None = None,
    eval_results_path: str | Path | None = None,
    options: CardOptions | None = None,
) -> ModelCard:
    """Write README.md (the card) into an exported model folder, copying the saliency figure in (if any).

    Args:
        folder: the export (:func:`~hf_clip_aft.release.export.export_clip`).
        record: the training record; by default the one saved in `folder` (none: a card without training details).
        eval_results_path: the evaluation suite's ``results.json``.
        options: see :class:`CardOptions`.
    """
    folder = Path(folder)
    options = options or CardOptions()
    if record is None:
        record = TrainingRecord.load(folder) or TrainingRecord()
    figure = options.saliency_figure
    if figure is None and eval_results_path is not None:
        candidate = Path(eval_results_path).parent / EVAL_FIGURE_NAME
        figure = candidate if candidate.is_file() else None
    figure_name = None
    if figure is not None:
        figure_name = f"{SALIENCY_FIGURE_STEM}{Path(figure).suffix.lower()}"
        if Path(figure).resolve() != (folder / figure_name).resolve():
            shutil.copyfile(figure, folder / figure_name)
    card = render_card(
        record,
        read_eval_report(eval_results_path) if eval_results_path else None,
        options,
        figure_name=figure_name,
        has_adapter=(folder / "adapter").is_dir(),
    )
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
    bases = [m for m in (llava_model, vision_model) if on_hub(m)]
    license = license or (base_license(llava_model) if on_hub(llava_model) else None)
    model_name = (repo_id or "").split("/")[-1] or f"{llava.split('/')[-1]}-aft"
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=bases or None,
        license=license,
        tags=["llava", *TAGS],
    )
    return _from_template(
        card_data,
        LLAVA_TEMPLATE,
        model_name,
        repo_id,
        llava_model=llava,
        llava_is_hub=on_hub(llava_model),
        vision_model=vision,
        vision_is_hub=on_hub(vision_model),
        license=license,
        vision_feature_layer=vision_feature_layer,
    )


def check_card(folder: str | Path) -> ModelCard:
    """The folder's README.md, parsed back as the Hub will (metadata and model-index); ValueError if it does not."""
    path = Path(folder) / CARD_NAME
    if not path.is_file():
        raise ValueError(f"{path} is missing: write the model card first (write_card).")
    text = path.read_text()
    card = ModelCard.load(path, ignore_metadata_errors=False)
    if "model-index" in text and not card.data.eval_results:
        raise ValueError(f"{path}: the model-index does not parse back into evaluation results.")
    return card
