"""Export: the drop-in `CLIPModel` folder of a fine-tuned vision tower, and the checks it must pass.

An export folder holds the fine-tuned vision tower and projection, the base model's text tower and logit scale, the
processor in the Hub's CLIP layout (``preprocessor_config.json`` and tokenizer files, which transformers 4.x, 5.x
and the original LLaVA code all read), and, for a LoRA/DoRA run, the adapter in ``adapter/``. Weights are
safetensors only. The folder loads with plain transformers as `CLIPModel`, `CLIPVisionModel` and
`CLIPVisionModelWithProjection`, and no saved file names a local path: it is what gets pushed to the Hub.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from huggingface_hub import get_token
from torch import nn
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    CLIPModel,
    CLIPProcessor,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

from ..modeling import (
    TEXT_PREFIXES,
    VISION_PREFIXES,
    VISION_PROJECTION_PREFIX,
    load_vision_tower,
    quiet_transformers,
    vision_config_with_projection,
)
from .names import hub_id
from .record import LEGACY_RECORD_NAME, RECORD_NAME, TrainingRecord

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
CARD_NAME = "README.md"
# What an export writes besides the processor files: a previous export's copies must not survive next to new ones
# (a stale shard index or adapter would be loaded instead of, or along with, the new weights).
_EXPORT_OWNED = (
    "model*.safetensors", "model.safetensors.index.json", ADAPTER_DIR, CARD_NAME, RECORD_NAME, LEGACY_RECORD_NAME,
)  # fmt: skip
# Training state and pickled weights: never part of a drop-in folder.
_NOT_PUBLISHABLE = (
    "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.h5", "*.msgpack",
    "checkpoint-*", "trainer_state.json", "optimizer*", "scheduler*", "rng_state*",
)  # fmt: skip
# Loading arguments that transformers 5 writes back into tokenizer_config.json; they describe this machine's copy.
_LOADING_KWARGS = (
    "is_local", "local_files_only", "cache_dir", "token", "use_auth_token", "_commit_hash", "name_or_path",
)  # fmt: skip
_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{30,}")
# The architecture fields a vision tower's weights depend on (and the input size its position embedding encodes).
VISION_ARCH_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size",
    "num_channels", "hidden_act", "layer_norm_eps",
)  # fmt: skip


def vision_config_mismatch(ours, theirs) -> dict[str, tuple[Any, Any]]:
    """``{field: (ours, theirs)}`` for the architecture fields on which two `CLIPVisionConfig` differ."""
    return {
        name: (getattr(ours, name, None), getattr(theirs, name, None))
        for name in VISION_ARCH_FIELDS
        if getattr(ours, name, None) != getattr(theirs, name, None)
    }


def merged_vision_tower(trained: nn.Module) -> CLIPVisionModelWithProjection | CLIPModel:
    """The trained tower as a plain transformers model: LoRA/DoRA adapters merged into a copy."""
    if hasattr(trained, "merge_and_unload"):  # a peft model; merge a copy so that training state is untouched
        trained = copy.deepcopy(trained).merge_and_unload()
    if not isinstance(trained, (CLIPVisionModelWithProjection, CLIPModel)):
        raise TypeError(
            f"Cannot export a {type(trained).__name__}: expected a CLIPVisionModelWithProjection (or a peft model "
            "around one) or a CLIPModel."
        )
    return trained


def _processor_with_tokenizer(processor, base_name: str | None):
    """The processor to save: a bare image processor gains the base's tokenizer (zero-shot use needs both)."""
    if processor is None:
        if base_name is None:
            raise ValueError("No processor given and the base model has no name to load one from: pass `processor`.")
        return AutoProcessor.from_pretrained(base_name)
    if getattr(processor, "tokenizer", None) is not None or base_name is None:
        return processor
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_name)
    except (OSError, ValueError) as err:
        logger.warning("The export has no tokenizer (none loads from %s: %s); zero-shot use needs one.", base_name, err)
        return processor
    return CLIPProcessor(image_processor=processor, tokenizer=tokenizer)


def _save_adapter(peft_model: nn.Module, folder: Path, base_id: str | None) -> None:
    """The LoRA/DoRA adapter in `folder`, its config naming the base by Hub id only (never a local path)."""
    peft_model.save_pretrained(folder)
    (folder / CARD_NAME).unlink(missing_ok=True)  # peft's placeholder card; the export's card covers the adapter
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_id
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def scrub_tokenizer_config(folder: Path) -> None:
    """Drop the loading arguments (``is_local``, ``cache_dir``, ...) transformers writes into tokenizer_config.json."""
    path = folder / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        kept = {k: v for k, v in config.items() if k not in _LOADING_KWARGS}
        path.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n")


def legacy_processor_layout(folder: Path) -> None:
    """Drop a processor_config.json that only repeats preprocessor_config.json (and names the processor class).

    transformers 4.x cannot read the nested image-processor entry transformers 5 writes there, and both versions
    load a CLIP processor from preprocessor_config.json and the tokenizer files alone (the Hub's CLIP layout).
    """
    path = folder / "processor_config.json"
    repeated = path.is_file() and (folder / "preprocessor_config.json").is_file()
    if repeated and set(json.loads(path.read_text())) <= {"image_processor", "processor_class"}:
        path.unlink()


# What a training run of this library leaves in its output_dir besides an export: checkpoints, the folder
# push_to_hub exports to (`AFTTrainer`'s HUB_FOLDER), TensorBoard logs. Hidden entries (staging folders, editor and
# OS metadata) never count as someone else's.
_RUN_OWNED = ("checkpoint-*", "_hub", "runs", ".*")


def foreign_entries(folder: str | Path) -> list[str]:
    """The entries of `folder` that this library did not write, sorted; [] when there is nothing to protect.

    That is: a missing or empty folder, one holding a training record (an export, or a checkpoint of this
    library's), or one holding only what a training run writes (checkpoints, ``_hub``, ``runs``) gives [].
    """
    folder = Path(folder)
    if not folder.is_dir() or any((folder / name).is_file() for name in (RECORD_NAME, LEGACY_RECORD_NAME)):
        return []
    return sorted(e.name for e in folder.iterdir() if not any(fnmatch.fnmatch(e.name, p) for p in _RUN_OWNED))


def fsync_tree(folder: str | Path) -> None:
    """Flush every file under `folder`, and the folders' entries, to disk (before a rename publishes them)."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(root)


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _staging_prefix(output_dir: Path) -> str:
    return f".{output_dir.name}.staging-"


def remove_staging_leftovers(output_dir: str | Path) -> list[Path]:
    """Delete the staging folders that interrupted writes of `output_dir` left beside it; return them.

    Matches this module's staging names (``.<name>.staging-*``) and those of earlier versions (``.<name>-`` and
    the 8 characters `tempfile.mkdtemp` adds).
    """
    output_dir = Path(output_dir)
    legacy = re.compile(re.escape(f".{output_dir.name}-") + r"[a-z0-9_]{8}$")
    parent = output_dir.parent
    leftovers = [
        p
        for p in (parent.iterdir() if parent.is_dir() else ())
        if p.is_dir() and (p.name.startswith(_staging_prefix(output_dir)) or legacy.match(p.name))
    ]
    for path in leftovers:
        logger.warning("Removing %s, left by an interrupted write of %s.", path, output_dir)
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


@contextmanager
def staged_folder(output_dir: str | Path) -> Iterator[Path]:
    """A temporary folder beside `output_dir` whose contents replace those of `output_dir` if the block succeeds.

    Nothing half-written is ever visible as a model folder:

    - a new (or empty) `output_dir` appears with one rename of the complete, fsynced staging folder;
    - an existing one (it may also hold training checkpoints, which must stay) first loses its ``config.json``,
      so that it does not load as a model while the new files move in, and gets the new ``config.json`` last.
      Files a previous export left there (weights, shard index, adapter, card) are removed, so that no stale file
      sits beside the new ones.

    A failure in the block leaves `output_dir` untouched. Staging folders of interrupted runs are removed at the
    next call (:func:`remove_staging_leftovers`).
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_staging_leftovers(output_dir)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(output_dir), dir=output_dir.parent))
    try:
        yield staging
        fsync_tree(staging)
        if output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        if not output_dir.exists():
            staging.rename(output_dir)
        else:
            _move_into(staging, output_dir)
        fsync_dir(output_dir.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into(staging: Path, output_dir: Path) -> None:
    """Replace `output_dir`'s export files by `staging`'s, ``config.json`` out first and in last."""
    (output_dir / "config.json").unlink(missing_ok=True)
    new = {item.name for item in staging.iterdir()}
    for item in output_dir.iterdir():
        if item.name not in new and any(fnmatch.fnmatch(item.name, p) for p in _EXPORT_OWNED):
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    for item in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
        target = output_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)
    fsync_dir(output_dir)


def export_clip(
    trained: nn.Module,
    base: str | CLIPModel,
    output_dir: str | Path,
    processor=None,
    record: TrainingRecord | None = None,
    adapter_from: str | Path | None = None,
) -> Path:
    """Write a complete `CLIPModel` folder: `trained`'s vision tower and projection, `base`'s text tower.

    Args:
        trained: the fine-tuned `CLIPVisionModelWithProjection`, a peft model around one (merged into a copy on
            export; the adapter is also saved in ``adapter/``), or a `CLIPModel` whose vision side is taken.
        base: the original CLIP checkpoint (Hub id, local path or `CLIPModel`): text tower, logit scale, and the
            processor and tokenizer files when `processor` is not given.
        output_dir: the folder to write; it is written in a temporary folder beside it first, so a failure leaves
            no half-written export. Files of a previous export there are replaced.
        processor: the processor to save with the model (a `CLIPProcessor`; a bare image processor gets the base's
            tokenizer added).
        record: the training record, saved with the model as ``training_record.json`` (the card reads it).
        adapter_from: an ``adapter/`` folder to copy into the export (when re-exporting an export that has one).

    Returns:
        `output_dir`, which :func:`validate_export` accepts.
    """
    if base is None:
        raise ValueError(
            "export_clip needs the base CLIP checkpoint for the text tower and processor: pass its Hub id or path."
        )
    vision = merged_vision_tower(trained)
    base_model = CLIPModel.from_pretrained(base) if isinstance(base, str) else base
    vision_config = vision.config.vision_config if isinstance(vision, CLIPModel) else vision.config
    mismatch = vision_config_mismatch(vision_config, base_model.config.vision_config)
    if mismatch:
        raise ValueError(
            f"The trained tower does not fit the base CLIP ({{field: (trained, base)}} = {mismatch}): pass the "
            "checkpoint the tower was fine-tuned from as `base`."
        )
    clip = copy.deepcopy(base_model)
    state = {k: v for k, v in vision.state_dict().items() if k.startswith(VISION_PREFIXES)}
    missing, unexpected = clip.load_state_dict(state, strict=False)
    if unexpected or any(k.startswith(VISION_PREFIXES) for k in missing):
        raise ValueError(f"The trained tower does not fit the base CLIP: unexpected {unexpected}, missing {missing}.")
    base_name = base if isinstance(base, str) else base.config._name_or_path or None
    processor = _processor_with_tokenizer(processor, base_name)
    clip.config.vision_config = vision_config_with_projection(clip.config)
    clip.config._name_or_path = ""  # the saved config must not carry a local path

    with staged_folder(output_dir) as staging:
        clip.save_pretrained(staging)
        processor.save_pretrained(staging)
        scrub_tokenizer_config(staging)
        image_processor = getattr(processor, "image_processor", processor)
        image_processor.save_pretrained(staging)  # preprocessor_config.json, for transformers 4.x and LLaVA's code
        legacy_processor_layout(staging)
        if hasattr(trained, "merge_and_unload"):
            _save_adapter(trained, staging / ADAPTER_DIR, hub_id(base))
        if adapter_from is not None:
            shutil.copytree(adapter_from, staging / ADAPTER_DIR, dirs_exist_ok=True)
        if record is not None:
            record.save(staging)
    return Path(output_dir)


def export_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    base_model: str | None = None,
    record: TrainingRecord | None = None,
) -> Path:
    """Export any AFT checkpoint folder to a clean drop-in folder (see :func:`export_clip`), with `record` in it.

    `checkpoint` is one of: an export folder (a `CLIPModel`, possibly among training state; its ``adapter/`` is
    kept), a vision-only checkpoint (``checkpoint-N`` of a full fine-tuning run), or a peft adapter folder
    (``checkpoint-N`` of a LoRA/DoRA run). The last two need the base CLIP (`base_model`, Hub id or path; an adapter
    names its own when it was saved from a Hub model) for the text tower.
    """
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    if checkpoint.resolve() == output_dir.resolve():
        raise ValueError(f"output_dir must differ from the checkpoint folder {checkpoint}: pick a new folder.")
    adapter_config = checkpoint / "adapter_config.json"
    config_path = checkpoint / "config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        base_model = base_model or json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base_model:
            raise ValueError(f"{checkpoint} holds a peft adapter: pass base_model, the CLIP it was trained on.")
        trained = PeftModel.from_pretrained(load_vision_tower(base_model), checkpoint)
        base: str | CLIPModel = base_model
    elif config_path.is_file() and json.loads(config_path.read_text()).get("model_type") == "clip":
        with quiet_transformers():
            trained = base = CLIPModel.from_pretrained(checkpoint)  # the folder's text tower is the base's
    elif config_path.is_file() and json.loads(config_path.read_text()).get("model_type") == "clip_vision_model":
        if base_model is None:
            raise ValueError(f"{checkpoint} holds a vision tower only: pass base_model, the CLIP it was trained from.")
        trained, base = load_vision_tower(str(checkpoint)), base_model
    else:
        raise ValueError(
            f"{checkpoint} is not a CLIP checkpoint: expected a config.json of model_type 'clip' or "
            "'clip_vision_model', or a peft adapter_config.json."
        )
    try:
        processor = AutoProcessor.from_pretrained(checkpoint)
    except (OSError, ValueError):
        processor = None  # the checkpoint has no processor files: export_clip takes the base's
    adapter = checkpoint / ADAPTER_DIR if (checkpoint / ADAPTER_DIR).is_dir() and not adapter_config.is_file() else None
    return export_clip(trained, base, output_dir, processor=processor, record=record, adapter_from=adapter)


def _json_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _json_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_strings(item)


def _names_local_path(value: str) -> bool:
    if os.path.isabs(value):
        return len(Path(value).parts) >= 3  # "/home/x", not a lone "/" separator
    return value.startswith("~") or (("/" in value or os.sep in value) and os.path.exists(value))


def private_strings(folder: str | Path) -> list[str]:
    """Local paths and access tokens found in the text files of `folder` (``"file: what"`` each).

    JSON configs are checked value by value for paths (``tokenizer.json`` is vocabulary, not configuration, and is
    skipped); every text file (the model card too) for this machine's home, working and temporary directories, for
    anything shaped like a Hub token, and for the token this machine is logged in with.
    """
    folder = Path(folder)
    markers = [m for m in {str(Path.home()), os.getcwd(), tempfile.gettempdir()} if len(Path(m).parts) >= 2]
    token = get_token()
    found = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.suffix == ".json" and path.name != "tokenizer.json":
            found += [f"{name}: {v}" for v in _json_strings(json.loads(path.read_text())) if _names_local_path(v)]
        if path.suffix in (".json", ".md", ".txt", ".jinja"):
            text = path.read_text(errors="replace")
            found += [f"{name}: {m}" for m in markers if m in text]
            if _TOKEN_PATTERN.search(text) or (token and token in text):
                found.append(f"{name}: an access token")
    return found


def publishability_problems(folder: str | Path) -> list[str]:
    """Why `folder` cannot be published as is: training state, pickled weights or stray sub-folders in it."""
    folder = Path(folder)
    problems = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if any(fnmatch.fnmatch(path.name, p) for p in _NOT_PUBLISHABLE):
            problems.append(f"{name}: training state or non-safetensors weights")
        elif path.is_dir() and path.parent == folder and path.name != ADAPTER_DIR:
            problems.append(f"{name}/: only an '{ADAPTER_DIR}/' sub-folder belongs in an export")
    return problems


def validate_export(folder: str | Path) -> None:
    """Check that `folder` is a publishable drop-in CLIP folder; raise ValueError listing every problem.

    It must load with no missing keys as `CLIPModel` (no unexpected keys either), `CLIPVisionModel` and
    `CLIPVisionModelWithProjection` (whose unexpected keys may only be the text side's, and the projection head's
    for `CLIPVisionModel`); its processor must load with an image processor and a tokenizer; and it must hold no
    training state, pickled weights or local paths.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json: it is not an export folder (see export_clip).")
    problems = publishability_problems(folder)
    allowed = {
        CLIPModel: (),
        CLIPVisionModelWithProjection: TEXT_PREFIXES,
        CLIPVisionModel: TEXT_PREFIXES + (VISION_PROJECTION_PREFIX,),
    }
    with quiet_transformers():
        for cls, skippable in allowed.items():
            try:
                _, info = cls.from_pretrained(folder, output_loading_info=True)
            except (OSError, ValueError, RuntimeError) as err:
                problems.append(f"{cls.__name__} cannot load it: {err}")
                continue
            if info["missing_keys"] or info["mismatched_keys"]:
                missing, mismatched = sorted(info["missing_keys"]), info["mismatched_keys"]
                problems.append(f"{cls.__name__}: missing keys {missing}, mismatched keys {mismatched}")
            unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith(skippable))
            if unexpected:
                problems.append(f"{cls.__name__}: unexpected keys {unexpected}")
        try:
            processor = AutoProcessor.from_pretrained(folder)
            if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
                problems.append(f"the processor is a {type(processor).__name__}, not a CLIPProcessor with a tokenizer")
        except (OSError, ValueError) as err:
            problems.append(f"the processor cannot load: {err}")
    problems += [f"names a local path or token: {leak}" for leak in private_strings(folder)]
    if problems:
        raise ValueError(f"{folder} is not a valid drop-in CLIP folder:\n- " + "\n- ".join(problems))
