"""Export: the drop-in `CLIPModel` folder of a fine-tuned vision tower."""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

from torch import nn
from transformers import AutoProcessor, CLIPModel, CLIPVisionModelWithProjection


def merged_vision_tower(trained: nn.Module) -> CLIPVisionModelWithProjection:
    """The trained tower as a plain `CLIPVisionModelWithProjection`: LoRA/DoRA adapters merged into a copy."""
    if hasattr(trained, "merge_and_unload"):  # a peft model; merge a copy so that training state is untouched
        trained = copy.deepcopy(trained).merge_and_unload()
    if isinstance(trained, CLIPModel):
        return trained
    if not isinstance(trained, CLIPVisionModelWithProjection):
        raise TypeError(f"Cannot export a {type(trained).__name__}: expected a CLIPVisionModelWithProjection.")
    return trained


def export_clip(
    trained: nn.Module,
    base: str | CLIPModel,
    output_dir: str | Path,
    processor=None,
) -> Path:
    """Write a complete `CLIPModel` folder: `trained`'s vision tower and projection, `base`'s text tower.

    Args:
        trained: the fine-tuned `CLIPVisionModelWithProjection` (or a peft model around one, merged on export, or a
            `CLIPModel` whose vision side is taken).
        base: the original CLIP checkpoint (Hub id, local path or `CLIPModel`): text tower, logit scale, and the
            processor and tokenizer files when `processor` is not given.
        output_dir: the folder to write; it is written in a temporary folder beside it first, so a failure leaves
            no half-written export.
        processor: the processor to save with the model (a `CLIPProcessor`).
    """
    if base is None:
        raise ValueError(
            "export_clip needs the base CLIP checkpoint for the text tower and processor: pass its Hub id or path."
        )
    vision = merged_vision_tower(trained)
    base_model = CLIPModel.from_pretrained(base) if isinstance(base, str) else base
    clip = copy.deepcopy(base_model)
    state = {k: v for k, v in vision.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    missing, unexpected = clip.load_state_dict(state, strict=False)
    if unexpected or any(k.startswith(("vision_model.", "visual_projection.")) for k in missing):
        raise ValueError(f"The trained tower does not fit the base CLIP: unexpected {unexpected}, missing {missing}.")
    if processor is None:
        processor = AutoProcessor.from_pretrained(base if isinstance(base, str) else base.config._name_or_path)

    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        clip.config._name_or_path = ""  # the saved config must not carry a local path
        clip.save_pretrained(staging)
        processor.save_pretrained(staging)
        output_dir.mkdir(exist_ok=True)
        for item in staging.iterdir():
            target = output_dir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir
