"""The AFT encoder inside LLaVA: swap a fine-tuned CLIP vision tower into a LLaVA / LLaVA-NeXT checkpoint.

In transformers, ``LlavaForConditionalGeneration.model.vision_tower`` (and LLaVA-NeXT's) is a `CLIPVisionModel` for
the CLIP-based checkpoints; LLaVA reads its hidden states at ``vision_feature_layer`` (−2) and never uses a
projection head or the final layer norm's output. Swapping copies the fine-tuned transformer's weights into that
module, in the LLaVA's dtype and on its device; everything else (language model, projector, config, processor) is
the original checkpoint's. Load the real checkpoint with ``from_pretrained`` first and swap in memory: saving then
writes the checkpoint's own on-disk key layout (``save_original_format``), which older transformers and other tools
read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    PretrainedConfig,
)

from ..modeling import VISION_TRANSFORMER_PREFIX, quiet_transformers
from .export import (
    merged_vision_tower,
    private_strings,
    publishability_problems,
    scrub_tokenizer_config,
    staged_folder,
    vision_config_mismatch,
)

LLAVA_CLASSES = (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)
_TOWER_KEY = "vision_tower."


def vision_tower_state(vision: str | Path | nn.Module) -> tuple[CLIPVisionConfig, dict[str, torch.Tensor]]:
    """The CLIP vision transformer's config and weights, keyed as `CLIPVisionModel`'s state dict.

    `vision`: a Hub id or path of an AFT export (any CLIP checkpoint with a vision tower), a `CLIPModel`,
    `CLIPVisionModel`, `CLIPVisionModelWithProjection`, or a peft model around the latter (merged first).
    """
    if isinstance(vision, (str, Path)):
        with quiet_transformers():  # the text tower and projection it skips are expected
            vision, info = CLIPVisionModel.from_pretrained(vision, output_loading_info=True)
        if info["missing_keys"]:
            raise ValueError(f"The vision checkpoint lacks tower weights {sorted(info['missing_keys'])}: is it CLIP?")
    if hasattr(vision, "merge_and_unload"):
        vision = merged_vision_tower(vision)
    if isinstance(vision, CLIPVisionModel):
        return vision.config, vision.state_dict()
    if isinstance(vision, (CLIPModel, CLIPVisionModelWithProjection)):
        config = vision.config.vision_config if isinstance(vision, CLIPModel) else vision.config
        prefix = VISION_TRANSFORMER_PREFIX
        return config, {k[len(prefix) :]: v for k, v in vision.state_dict().items() if k.startswith(prefix)}
    raise TypeError(
        f"vision must be a Hub id or path, a CLIPModel, CLIPVisionModel or CLIPVisionModelWithProjection; got "
        f"{type(vision).__name__}."
    )


def check_llava_vision_fit(llava_config: PretrainedConfig, vision_config: CLIPVisionConfig) -> None:
    """Raise ValueError unless a tower of `vision_config` can replace the vision tower of a LLaVA of `llava_config`.

    Cheap (configs only): run it before loading a multi-gigabyte LLaVA.
    """
    tower_config = getattr(llava_config, "vision_config", None)
    if getattr(tower_config, "model_type", None) != "clip_vision_model":
        raise ValueError(
            f"This LLaVA's vision tower is a {getattr(tower_config, 'model_type', None)!r}, not a CLIP vision model: "
            "an AFT CLIP tower can only replace a CLIP one."
        )
    mismatch = vision_config_mismatch(vision_config, tower_config)
    if mismatch:
        details = ", ".join(f"{name} {ours} (yours) vs {theirs} (LLaVA's)" for name, (ours, theirs) in mismatch.items())
        raise ValueError(
            f"The vision tower does not fit this LLaVA: {details}. Fine-tune the CLIP the LLaVA was built on (e.g. "
            "openai/clip-vit-large-patch14-336 for LLaVA-1.5) and swap that; a ViT-B/16 cannot replace a ViT-L/14-336."
        )


def swap_llava_vision_tower(
    llava_model: LlavaForConditionalGeneration | LlavaNextForConditionalGeneration,
    vision: str | Path | nn.Module,
) -> LlavaForConditionalGeneration | LlavaNextForConditionalGeneration:
    """Put a fine-tuned CLIP vision tower into `llava_model` (in place) and return it.

    Args:
        llava_model: a LLaVA or LLaVA-NeXT model with a CLIP vision tower, loaded with ``from_pretrained``
            (not offloaded: every weight must be materialised).
        vision: the AFT tower: a Hub id or path of an exported CLIP folder, a `CLIPModel`, `CLIPVisionModel`,
            `CLIPVisionModelWithProjection` (or a peft model around one).

    Raises:
        TypeError: `llava_model` is not a LLaVA / LLaVA-NeXT model.
        ValueError: the towers differ in architecture or image size (e.g. a ViT-B/16 into a ViT-L/14-336 LLaVA).
    """
    if not isinstance(llava_model, LLAVA_CLASSES):
        raise TypeError(
            f"llava_model must be a LlavaForConditionalGeneration or LlavaNextForConditionalGeneration, got "
            f"{type(llava_model).__name__}."
        )
    tower = llava_model.model.vision_tower
    config, state = vision_tower_state(vision)
    check_llava_vision_fit(llava_model.config, config)
    if any(p.is_meta for p in tower.parameters()):
        raise ValueError("The LLaVA's vision tower is offloaded (meta tensors): load the LLaVA without disk offload.")
    with torch.no_grad():
        tower.load_state_dict(state, strict=True)  # copies into the tower's own dtype and device
    return llava_model


def save_llava(llava_model: nn.Module, output_dir: str | Path, processor=None) -> Path:
    """Save a LLaVA (and its processor) so that it reloads with stock transformers; written via a staging folder.

    The weights keep the on-disk layout of the checkpoint the model was loaded from.
    """
    with staged_folder(output_dir) as staging:
        llava_model.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)
            scrub_tokenizer_config(staging)
    return Path(output_dir)


def saved_tower_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The vision tower's tensors in a saved LLaVA folder, keyed as `CLIPVisionModel`'s state dict.

    Works for both on-disk layouts (``vision_tower.vision_model.*`` of llava-hf checkpoints and the flat
    ``vision_tower.*`` of models saved from scratch, with or without a ``model.`` prefix).
    """
    weights = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                if _TOWER_KEY in key:
                    name = key.split(_TOWER_KEY, 1)[1]
                    weights[name.removeprefix(VISION_TRANSFORMER_PREFIX)] = f.get_tensor(key)
    return weights


def validate_llava_folder(folder: str | Path, expected: dict[str, torch.Tensor]) -> None:
    """Check a saved LLaVA before publishing it: a LLaVA config, the expected tower weights, nothing private.

    `expected` is the swapped-in tower's state (:func:`vision_tower_state`); the saved tensors must equal it in
    the saved dtype. Raises ValueError listing every problem.
    """
    folder = Path(folder)
    problems = publishability_problems(folder)
    architectures = AutoConfig.from_pretrained(folder).architectures or []
    if not {cls.__name__ for cls in LLAVA_CLASSES} & set(architectures):
        problems.append(f"config.json describes {architectures}, not a LLaVA / LLaVA-NeXT model")
    saved = saved_tower_weights(folder)
    missing = sorted(set(expected) - set(saved))
    if missing:
        problems.append(f"vision tower weights missing from the safetensors files: {missing}")
    common = set(expected) & set(saved)
    differ = sorted(k for k in common if not torch.equal(saved[k], expected[k].to("cpu", saved[k].dtype)))
    if differ:
        problems.append(f"saved vision tower weights differ from the fine-tuned ones: {differ}")
    problems += [f"names a local path or token: {leak}" for leak in private_strings(folder)]
    if problems:
        raise ValueError(f"{folder} is not a valid LLaVA folder:\n- " + "\n- ".join(problems))
