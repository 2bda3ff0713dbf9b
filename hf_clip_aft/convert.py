"""Import open_clip-format CLIP image encoders (the OpenAI ViT layout) as transformers models.

The paper's AFT checkpoints and RobustVLM's FARE/TeCoA encoders are open_clip ``visual`` state dicts: OpenAI's
``VisionTransformer`` parameter names (``conv1``, ``transformer.resblocks.N.attn.in_proj_weight``, ``proj``, ...).
:func:`convert_open_clip_visual` renames them to a `CLIPVisionModelWithProjection` whose architecture comes from a
transformers CLIP checkpoint (the *base*), so that the result is a drop-in for the rest of the library.

What the weights do not store comes from the base: the number of attention heads and the MLP activation (OpenAI
CLIPs use ``quick_gelu``, open_clip's LAION-trained ones ``gelu``): pass the transformers port of the CLIP the
checkpoint was fine-tuned from. Both layouts use LayerNorm eps 1e-5 and apply the post-LayerNorm to the class token.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    CLIPConfig,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    PreTrainedModel,
)

from .model_configs import HUB_IDS, clip_config
from .modeling import VISION_TRANSFORMER_PREFIX, vision_config_with_projection

StateDict = Mapping[str, torch.Tensor]

# Checkpoint dicts that nest the weights: training checkpoints (`state_dict`) and TeCoA's released files.
_NESTING_KEYS = ("state_dict", "vision_encoder_state_dict")
# Prefixes that wrap every key: DDP/DataParallel, torch.compile, and wrappers holding the tower as `.model`.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
# The image tower inside a full open_clip/OpenAI CLIP state dict; the other keys there are the text tower.
_VISUAL_PREFIX = "visual."

_GLOBAL_KEYS = {
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "class_embedding": "vision_model.embeddings.class_embedding",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
}
# (D_vision, D_proj), applied as x @ proj; transformers' Linear stores the transpose.
_PROJ_KEY, _PROJ_TARGET = "proj", "visual_projection.weight"
_BLOCK = "transformer.resblocks.{}."
_HF_BLOCK = "vision_model.encoder.layers.{}."
_BLOCK_KEYS = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# nn.MultiheadAttention packs the q, k and v projections, in that order, along the output dimension.
_PACKED_KEYS = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
_BLOCK_INDEX = re.compile(r"^transformer\.resblocks\.(\d+)\.")
# What torch.load(weights_only=True) names when a pickle holds an object other than tensors and containers.
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")

# OpenAI's ModifiedResNet image encoders, by residual blocks per stage.
_RESNETS = {
    (3, 4, 6, 3): "RN50",
    (3, 4, 23, 3): "RN101",
    (4, 6, 10, 6): "RN50x4",
    (6, 8, 18, 8): "RN50x16",
    (3, 15, 36, 10): "RN50x64",
}


class _VitShape(NamedTuple):
    """The shape-determining hyper-parameters of a CLIP ViT image tower (sizes in channels, pixels, layers)."""

    width: int
    layers: int
    patch: int
    image_size: int
    mlp: int
    projection: int

    def describe(self) -> str:
        return (
            f"width {self.width}, {self.layers} layers, patch {self.patch}, {self.image_size} px, "
            f"MLP {self.mlp}, projection {self.projection}"
        )


def convert_open_clip_visual(
    state_dict_or_path: StateDict | str | os.PathLike,
    base: str | os.PathLike | PreTrainedModel | CLIPConfig | CLIPVisionConfig,
) -> CLIPVisionModelWithProjection:
    """A float32 `CLIPVisionModelWithProjection` holding an open_clip ViT image encoder's weights.

    Args:
        state_dict_or_path: the weights, or a ``.pt``/``.pth``/``.bin`` (loaded with ``weights_only=True``) or
            ``.safetensors`` file holding them. Accepted: a bare ``visual`` state dict, a full open_clip/OpenAI CLIP
            state dict (``visual.`` keys; the text tower is ignored), keys wrapped in ``module.``, ``_orig_mod.``
            or ``model.``, and dicts nesting the weights under ``state_dict`` or ``vision_encoder_state_dict``
            (TeCoA).
        base: the architecture: a transformers CLIP checkpoint (Hub id or local path; only its config is read),
            a `CLIPModel`/`CLIPVisionModelWithProjection`, or a `CLIPConfig`/`CLIPVisionConfig`. Its attention
            heads and activation are used as is (the weights do not store them); every weight shape must match.

    Raises:
        ValueError: a ModifiedResNet (RN50, ...) checkpoint, keys outside the ViT layout, missing keys, or shapes
            that do not fit the base (the message names the architecture the checkpoint has).
    """
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state_dict_or_path = _read_checkpoint(Path(state_dict_or_path))
    state_dict = _vision_state_dict(state_dict_or_path)
    _refuse_resnet(state_dict)
    layers = _check_vit_keys(state_dict)
    config = _vision_config(base)
    converted, sources = open_clip_to_transformers(state_dict, layers)
    model = CLIPVisionModelWithProjection(config)
    _check_fits(converted, sources, model.state_dict(), _checkpoint_shape(state_dict, layers), _config_shape(config))
    model.load_state_dict(converted, strict=True)
    return model.eval()


def open_clip_to_transformers(state_dict: StateDict, layers: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename an OpenAI-layout ViT state dict (no prefix) to transformers' `CLIPVisionModelWithProjection` names.

    Returns the renamed tensors (the packed q/k/v projections split, ``proj`` transposed) and, for messages, the
    source key of each new key.
    """
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for key, target in _GLOBAL_KEYS.items():
        converted[target], sources[target] = state_dict[key], key
    converted[_PROJ_TARGET], sources[_PROJ_TARGET] = state_dict[_PROJ_KEY].t(), _PROJ_KEY
    for i in range(layers):
        block, hf_block = _BLOCK.format(i), _HF_BLOCK.format(i)
        for key, target in _BLOCK_KEYS.items():
            converted[hf_block + target], sources[hf_block + target] = state_dict[block + key], block + key
        for key, suffix in _PACKED_KEYS.items():
            for name, part in zip(("q", "k", "v"), state_dict[block + key].chunk(3, dim=0)):
                target = f"{hf_block}self_attn.{name}_proj.{suffix}"
                converted[target], sources[target] = part, block + key
    return converted, sources


def _read_checkpoint(path: Path) -> Mapping:
    """The tensors of a safetensors file, or of a pickled checkpoint read with ``weights_only=True`` (tensors and
    plain containers only: unpickling anything else could run code). Damaged files and pickles holding other
    objects are refused with a ValueError that says which, without the loading error's own advice."""
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {str(path)!r}.")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{path.name} is not a readable safetensors file ({error}): it is damaged or incomplete (an "
                "interrupted download or copy?), or not safetensors at all. Download it again."
            ) from None
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - garbage makes the unpickler fail in many ways (Index-, KeyError...)
            # torch's own message advises weights_only=False, i.e. running the file's code: it is not repeated.
            found = _UNSUPPORTED_GLOBAL.search(str(error))
            if found:
                raise ValueError(
                    f"{path.name} holds Python objects besides tensors (e.g. {found.group(1)}), and this library "
                    "only reads tensors from pickled checkpoints (unpickling objects can run arbitrary code). Get "
                    "the weights as .safetensors, or re-save just the state dict of tensors where it was written: "
                    "safetensors.torch.save_file(state_dict, 'model.safetensors')."
                ) from None
            raise ValueError(
                f"{path.name} is not a readable PyTorch checkpoint ({type(error).__name__}): it is damaged, "
                "truncated or not a checkpoint at all. Download it again, or pass the .safetensors file."
            ) from None
    raise ValueError(f"Unsupported checkpoint file {path.name!r}: expected .pt, .pth, .bin or .safetensors.")


def _vision_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The image tower's tensors with every container and prefix removed."""
    while (nesting := next((k for k in _NESTING_KEYS if isinstance(checkpoint.get(k), Mapping)), None)) is not None:
        checkpoint = checkpoint[nesting]
    state_dict = dict(checkpoint)
    while state_dict:
        if any(k.startswith(_VISUAL_PREFIX) for k in state_dict):
            state_dict = {k[len(_VISUAL_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(_VISUAL_PREFIX)}
            continue
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            break
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    if not state_dict:
        raise ValueError("The checkpoint holds no weights (an empty state dict).")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"Checkpoint entry {key!r} is a {type(value).__name__}, not a tensor: pass the image encoder's state "
                "dict (a mapping of parameter names to tensors)."
            )
    return state_dict


def _refuse_resnet(state_dict: StateDict) -> None:
    if not any(k.startswith(("layer1.", "attnpool.")) for k in state_dict):
        return
    blocks = tuple(
        len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{stage}.")}) for stage in range(1, 5)
    )
    name = _RESNETS.get(blocks, "a ModifiedResNet")
    out = state_dict.get("attnpool.c_proj.weight")
    output = f", output dim {out.shape[0]}" if out is not None else ""
    raise ValueError(
        f"This is a CLIP ModifiedResNet image encoder ({name}: blocks per stage {blocks}{output}), not a ViT. "
        "transformers has no CLIP-ResNet class, so it cannot become a CLIPVisionModelWithProjection; load it with "
        "open_clip instead. Only ViT checkpoints (e.g. ViT-B/16, ViT-L/14) convert."
    )


def _vit_keys(layers: int) -> set[str]:
    block_keys = [*_BLOCK_KEYS, *_PACKED_KEYS]
    return {*_GLOBAL_KEYS, _PROJ_KEY, *(_BLOCK.format(i) + k for i in range(layers) for k in block_keys)}


def _check_vit_keys(state_dict: StateDict) -> int:
    """The number of residual blocks, after checking that the keys are exactly the OpenAI ViT layout's."""
    indices = {int(m.group(1)) for k in state_dict if (m := _BLOCK_INDEX.match(k))}
    layers = max(indices) + 1 if indices else 1
    expected = _vit_keys(layers)
    unmapped = sorted(set(state_dict) - expected)
    if unmapped:
        hint = (
            " These look like transformers CLIP keys already: load them with CLIPVisionModelWithProjection."
            "from_pretrained instead."
            if any(k.startswith(VISION_TRANSFORMER_PREFIX) for k in unmapped)
            else " Variants with LayerScale, attention pooling or a timm trunk have no transformers CLIP equivalent."
        )
        raise ValueError(
            f"{len(unmapped)} checkpoint keys are not part of the OpenAI/open_clip ViT layout that transformers' CLIP "
            f"implements: {_sample(unmapped)}.{hint}"
        )
    missing = sorted(expected - set(state_dict))
    if missing:
        raise ValueError(
            f"The checkpoint lacks {len(missing)} keys of the OpenAI/open_clip ViT layout: {_sample(missing)}. "
            "Pass the complete image encoder state dict (with its `proj` projection)."
        )
    return layers


def _vision_config(base) -> CLIPVisionConfig:
    """`base`'s vision config, with the projection size a `CLIPModel` built from it would use."""
    if isinstance(base, (str, os.PathLike)):
        base = AutoConfig.from_pretrained(base)
    if isinstance(base, PreTrainedModel):
        base = base.config
    if isinstance(base, CLIPConfig):
        return vision_config_with_projection(base)
    if isinstance(base, CLIPVisionConfig):
        return copy.deepcopy(base)
    raise TypeError(
        f"base must name a transformers CLIP checkpoint (Hub id or path) or be a CLIPModel, "
        f"CLIPVisionModelWithProjection, CLIPConfig or CLIPVisionConfig; got {type(base).__name__}."
    )


def _checkpoint_shape(state_dict: StateDict, layers: int) -> _VitShape:
    width, _, patch, _ = state_dict["conv1.weight"].shape
    grid = math.isqrt(state_dict["positional_embedding"].shape[0] - 1)  # positions: class token + grid² patches
    return _VitShape(
        width=width,
        layers=layers,
        patch=patch,
        image_size=grid * patch,
        mlp=state_dict[_BLOCK.format(0) + "mlp.c_fc.weight"].shape[0],
        projection=state_dict[_PROJ_KEY].shape[1],
    )


def _config_shape(config: CLIPVisionConfig) -> _VitShape:
    return _VitShape(
        width=config.hidden_size,
        layers=config.num_hidden_layers,
        patch=config.patch_size,
        image_size=config.image_size,
        mlp=config.intermediate_size,
        projection=config.projection_dim,
    )


def _check_fits(
    converted: StateDict, sources: Mapping[str, str], expected: StateDict, found: _VitShape, base: _VitShape
) -> None:
    mismatched = [
        f"{sources[k]} has shape {tuple(v.shape)} where the base expects {tuple(expected[k].shape)}"
        for k, v in converted.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if found.layers != base.layers:
        mismatched.insert(0, f"the checkpoint has {found.layers} layers, the base {base.layers}")
    if not mismatched:
        return
    raise ValueError(
        f"The checkpoint does not fit the base architecture: {'; '.join(mismatched[:3])}. "
        f"Checkpoint: {found.describe()}. Base: {base.describe()}. {_suggest_base(found)}"
    )


def _suggest_base(found: _VitShape) -> str:
    matches = [hub_id for name, hub_id in HUB_IDS.items() if _config_shape(_vision_config(clip_config(name))) == found]
    if matches:
        return (
            f"Pass base={matches[0]!r} (or the transformers port of the CLIP the checkpoint was fine-tuned from, "
            "whose activation and heads it needs)."
        )
    return (
        "Pass a transformers CLIP checkpoint with hidden_size={}, num_hidden_layers={}, patch_size={}, image_size={}, "
        "intermediate_size={}, projection_dim={}.".format(*found)
    )


def _sample(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")
