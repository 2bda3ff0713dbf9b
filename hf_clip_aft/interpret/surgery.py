"""Training-free dense maps of a CLIP image encoder: CLIP Surgery and the last-block family (NACLIP, SCLIP).

CLIP's patch tokens, compared with a class prompt, light up the background more than the object; these methods
change the ViT's forward pass at inference time (no new weights) so that the patch tokens stay local:

- ``clip_surgery``: architecture surgery of Li et al., "A Closer Look at the Explainability of Contrastive
  Language-Image Pre-training" (arXiv 2304.05653; code: github.com/xmed-lab/CLIP_Surgery). The last
  :data:`SURGERY_DEPTH` encoder blocks (all of them in a shallower tower) get a second path. In each such block q, k
  and v come from ``layer_norm1`` of the *original* path's hidden state; the original path runs the block unchanged;
  the new path adds ``out_proj(softmax(v vᵀ · scale) v)`` (same heads, scale and biases, q and k replaced by v) to
  its own running state and skips the MLP. The new path starts from the hidden state entering the first modified
  block, and its CLS token is replaced by the original path's at the end, so the image embedding is stock CLIP's.
  The class scores then go through :func:`feature_surgery`.
- ``naclip``: the last block of Hajimiri et al., "Pay Attention to Your Neighbours: Training-Free Open-Vocabulary
  Semantic Segmentation" (WACV 2025; code: github.com/sinahmr/NACLIP, ``arch='reduced'``, ``attn_strategy='naclip'``):
  ``softmax(k kᵀ · scale + ω) v`` with ω a Gaussian neighbourhood prior on the patch grid
  (``ω_ij = exp(−‖p_i − p_j‖² / 2σ²)``, σ = :data:`NACLIP_GAUSSIAN_STD` patches, over the whole grid, and 0 in the
  CLS row and column), then ``out_proj``, with neither the residual connection nor the MLP of that block.
- ``sclip``: the last block of Wang et al., "SCLIP: Rethinking Self-Attention for Dense Vision-Language Inference"
  (ECCV 2024; code: github.com/wangf3014/SCLIP): correlative self-attention
  ``(softmax(q qᵀ · scale) + softmax(k kᵀ · scale)) v``, keeping the block's residual connection and MLP as the
  official code does.
- ``patch_similarity``: the control: the unmodified model's patch tokens through ``post_layernorm`` and the visual
  projection.

Every method ends the same way: patch features, L2-normalised, against the class text embeddings, the patch grid
upsampled bilinearly to the image: the raw class scores (:func:`dense_scores`), whose per-pixel arg-max is the
segmentation, as in NACLIP's and SCLIP's code; for display, per image and class a min-max over the patches to
[0, 1] (:func:`dense_maps`, CLIP Surgery's ``get_similarity_map``).

CLIP Surgery's redundant feature. With a fixed set of C ≥ 2 classes (segmentation: the dataset's classes) it is the
paper's multi-class feature, the mean over the classes of the weighted element-wise products. For one target per
image (:func:`target_maps`, the saliency maps) it is the single-class rule of the authors' demo: the text embedding
of the empty prompt (the class-name slot of every template left empty, :func:`empty_prompt_embedding`), so that an
image's map depends on its image and target only, not on the other images of its batch.

The changes are forward hooks on the stock modules (:func:`patched_attention`): the weights are never touched,
sdpa and eager attention both work (the new attention is computed here, from the q/k/v projections), peft-wrapped
layers are used as they are, and leaving the block removes the hooks, restoring the model exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection
from transformers.models.clip.modeling_clip import CLIPAttention

from ..modeling import PROMPT_TEMPLATES, class_text_embeddings, eval_mode, vision_transformer
from .registry import MapMethod, register_map_method

SURGERY_DEPTH = 6  # encoder blocks (counted from the last) that get CLIP Surgery's v-v path, as in the paper
NACLIP_GAUSSIAN_STD = 5.0  # patches: the std of NACLIP's neighbourhood prior (the official default)
FEATURE_SURGERY_TEMPERATURE = 2.0  # CLIP Surgery's t in softmax(t · cos(CLS, class)) for the class weights
PATCHED_METHODS = ("clip_surgery", "naclip", "sclip")
DENSE_METHODS = (*PATCHED_METHODS, "patch_similarity")


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-state input of a hooked call, whether it was passed by position or by name."""
    return args[0] if args else kwargs["hidden_states"]


def _heads(x: torch.Tensor, attention: CLIPAttention) -> torch.Tensor:
    """``(B, T, D)`` projections -> ``(B, heads, T, head_dim)``."""
    return x.view(*x.shape[:2], attention.num_heads, attention.head_dim).transpose(1, 2)


def _similarity_weights(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(x xᵀ · scale)`` over the last axis, in float32 like transformers' eager attention."""
    return torch.softmax(torch.matmul(x, x.transpose(-1, -2)).float() * scale, dim=-1)


def _attend(attention: CLIPAttention, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out_proj`` of the heads' ``weights @ values`` merged back to ``(B, T, D)``."""
    out = torch.matmul(weights.to(values.dtype), values).transpose(1, 2)
    return attention.out_proj(out.reshape(*out.shape[:2], -1))


def value_value_attention(attention: CLIPAttention, normed: torch.Tensor) -> torch.Tensor:
    """CLIP Surgery's new path through one block: ``out_proj(softmax(v vᵀ · scale) v)``, ``(B, T, D)``.

    `normed` is ``layer_norm1`` of the original path's hidden state (what the block's attention reads).
    """
    values = _heads(attention.v_proj(normed), attention)
    return _attend(attention, _similarity_weights(values, attention.scale), values)


def neighbourhood_prior(grid: tuple[int, int], std: float = NACLIP_GAUSSIAN_STD) -> torch.Tensor:
    """NACLIP's additive attention prior ``(1 + N, 1 + N)`` for a patch grid ``(rows, columns)``, N = rows · columns.

    ``ω_ij = exp(−‖p_i − p_j‖² / 2σ²)`` with ``p`` the (row, column) of a patch and σ = `std` in patches; the CLS
    row and column are 0. The official code builds the same values by convolving one-hot maps with a
    ``(2 rows − 1) × (2 columns − 1)`` Gaussian window, which covers every offset on the grid.
    """
    if std <= 0:
        raise ValueError(f"naclip_gaussian_std={std} must be positive (in patches; NACLIP uses 5).")
    rows, columns = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    positions = torch.stack([rows.flatten(), columns.flatten()], dim=-1).float()
    squared = (positions.unsqueeze(1) - positions.unsqueeze(0)).pow(2).sum(dim=-1)
    prior = torch.zeros(squared.shape[0] + 1, squared.shape[0] + 1)
    prior[1:, 1:] = torch.exp(-squared / (2 * std**2))
    return prior


def naclip_attention(
    attention: CLIPAttention, normed: torch.Tensor, grid: tuple[int, int], std: float = NACLIP_GAUSSIAN_STD
) -> torch.Tensor:
    """NACLIP's last-block attention ``out_proj(softmax(k kᵀ · scale + ω) v)``, ``(B, 1 + N, D)``.

    ω is :func:`neighbourhood_prior` (added after the scale, unscaled, as in the official code).
    """
    keys = _heads(attention.k_proj(normed), attention)
    values = _heads(attention.v_proj(normed), attention)
    logits = torch.matmul(keys, keys.transpose(-1, -2)).float() * attention.scale
    weights = torch.softmax(logits + neighbourhood_prior(grid, std).to(logits.device), dim=-1)
    return _attend(attention, weights, values)


def sclip_attention(attention: CLIPAttention, normed: torch.Tensor) -> torch.Tensor:
    """SCLIP's correlative self-attention ``out_proj((softmax(q qᵀ · scale) + softmax(k kᵀ · scale)) v)``."""
    queries = _heads(attention.q_proj(normed), attention)
    keys = _heads(attention.k_proj(normed), attention)
    values = _heads(attention.v_proj(normed), attention)
    weights = _similarity_weights(queries, attention.scale) + _similarity_weights(keys, attention.scale)
    return _attend(attention, weights, values)


def _surgery_hooks(tower: CLIPVisionModel, depth: int) -> list[RemovableHandle]:
    """CLIP Surgery's dual path as hooks: the original path is the stock forward, untouched."""
    layers = tower.encoder.layers
    first = max(len(layers) - depth, 0)
    state: dict[str, torch.Tensor] = {}

    def start(_layer, args, kwargs):
        state["tokens"] = _hidden_states(args, kwargs)

    def add_path(attention, args, kwargs, _output):
        state["tokens"] = state["tokens"] + value_value_attention(attention, _hidden_states(args, kwargs))

    def finish(_encoder, _args, _kwargs, output):
        # The new path's patch tokens with the original path's CLS token: the image embedding stays stock CLIP's.
        output.last_hidden_state = torch.cat([output.last_hidden_state[:, :1], state.pop("tokens")[:, 1:]], dim=1)
        return output

    handles = [layers[first].register_forward_pre_hook(start, with_kwargs=True)]
    handles += [layer.self_attn.register_forward_hook(add_path, with_kwargs=True) for layer in layers[first:]]
    handles.append(tower.encoder.register_forward_hook(finish, with_kwargs=True))
    return handles


def _naclip_hooks(tower: CLIPVisionModel, std: float) -> list[RemovableHandle]:
    """NACLIP's reduced last block as hooks: the block's output becomes its new attention alone."""
    patch = tower.config.patch_size
    grid: dict[str, tuple[int, int]] = {}

    def record_grid(_embeddings, args, kwargs):
        height, width = (args[0] if args else kwargs["pixel_values"]).shape[-2:]
        grid["size"] = (height // patch, width // patch)

    def replace(layer, args, kwargs, _output):
        normed = layer.layer_norm1(_hidden_states(args, kwargs))
        return naclip_attention(layer.self_attn, normed, grid["size"], std)

    return [
        tower.embeddings.register_forward_pre_hook(record_grid, with_kwargs=True),
        tower.encoder.layers[-1].register_forward_hook(replace, with_kwargs=True),
    ]


def _sclip_hooks(tower: CLIPVisionModel) -> list[RemovableHandle]:
    """SCLIP's last block as a hook on its attention: residual and MLP run as usual around it."""

    def replace(attention, args, kwargs, output):
        return sclip_attention(attention, _hidden_states(args, kwargs)), *output[1:]

    return [tower.encoder.layers[-1].self_attn.register_forward_hook(replace, with_kwargs=True)]


@contextmanager
def patched_attention(
    model: nn.Module,
    method: str = "clip_surgery",
    *,
    surgery_depth: int = SURGERY_DEPTH,
    naclip_gaussian_std: float = NACLIP_GAUSSIAN_STD,
) -> Iterator[None]:
    """Run `model`'s vision tower with `method`'s forward for the duration of the block, then restore it exactly.

    Inside the block the tower's ``last_hidden_state`` holds the method's tokens (before ``post_layernorm``):
    ``clip_surgery``'s new-path tokens with the original CLS token (the pooled output and image embedding are stock
    CLIP's, bit for bit), or the tokens after ``naclip``'s or ``sclip``'s last block (their pooled output changes
    too). Only forward hooks are added, and removed on leaving: weights, modules and attributes are never changed.

    Args:
        model: a `CLIPModel`, `CLIPVisionModel` or `CLIPVisionModelWithProjection`, or a wrapper (peft, DDP).
        method: one of :data:`PATCHED_METHODS` (see the module docstring for each paper).
        surgery_depth: how many of the last encoder blocks get CLIP Surgery's v-v path (all, if fewer).
        naclip_gaussian_std: σ of NACLIP's neighbourhood prior, in patches.
    """
    if method not in PATCHED_METHODS:
        raise ValueError(f"method={method!r} is not one of {PATCHED_METHODS}.")
    if surgery_depth < 1:
        raise ValueError(f"surgery_depth={surgery_depth} must be at least 1 (CLIP Surgery uses 6 blocks).")
    if naclip_gaussian_std <= 0:
        raise ValueError(f"naclip_gaussian_std={naclip_gaussian_std} must be positive (in patches; NACLIP uses 5).")
    tower = vision_transformer(model)
    if method == "clip_surgery":
        handles = _surgery_hooks(tower, surgery_depth)
    elif method == "naclip":
        handles = _naclip_hooks(tower, naclip_gaussian_std)
    else:
        handles = _sclip_hooks(tower)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _visual_projection(model: nn.Module) -> nn.Module:
    """The image projection of `model` (identity for a bare `CLIPVisionModel`, whose features stay in its width)."""
    for module in model.modules():
        if isinstance(module, (CLIPModel, CLIPVisionModelWithProjection)):
            return module.visual_projection
    return nn.Identity()


def _projected_tokens(model: nn.Module, pixels: torch.Tensor, image_processor) -> torch.Tensor:
    """``(B, 1 + N, D)`` float32: the pooled image embedding, then every patch token through ``post_layernorm``
    and the visual projection, from the vision tower's forward as currently patched (any image size)."""
    tower = vision_transformer(model)
    mean = torch.tensor(image_processor.image_mean, device=pixels.device, dtype=pixels.dtype).view(1, -1, 1, 1)
    std = torch.tensor(image_processor.image_std, device=pixels.device, dtype=pixels.dtype).view(1, -1, 1, 1)
    outputs = tower(pixel_values=(pixels - mean) / std, interpolate_pos_encoding=True)
    projection = _visual_projection(model)
    # The CLS row goes through the same ops, on the same shapes, as the stock image embedding: equal bit for bit.
    image_embeds = projection(outputs.pooler_output).unsqueeze(1)
    patches = projection(tower.post_layernorm(outputs.last_hidden_state[:, 1:]))
    return torch.cat([image_embeds, patches], dim=1).float()


def clip_surgery_features(
    model: nn.Module, pixels: torch.Tensor, *, image_processor, surgery_depth: int = SURGERY_DEPTH
) -> torch.Tensor:
    """CLIP Surgery's image features ``(B, 1 + N, D)`` (float32, not normalised): row 0 is stock CLIP's image
    embedding (bit for bit), rows 1.. the architecture-surgery patch tokens through ``post_layernorm`` and the
    visual projection, N = (H // patch) · (W // patch) in row-major order. Computed in eval mode (the model's
    previous modes restored).

    Args:
        model: a `CLIPModel`, `CLIPVisionModelWithProjection` or `CLIPVisionModel` (then D is the tower's width).
        pixels: ``(B, 3, H, W)`` in [0, 1], any size of at least one patch (position embeddings are interpolated).
        image_processor: the model's image processor (its mean and std normalise the pixels).
        surgery_depth: how many of the last encoder blocks get the v-v path.
    """
    with eval_mode(model), patched_attention(model, "clip_surgery", surgery_depth=surgery_depth):
        return _projected_tokens(model, pixels, image_processor)


def feature_surgery(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    redundant: torch.Tensor | None = None,
    temperature: float = FEATURE_SURGERY_TEMPERATURE,
) -> torch.Tensor:
    """CLIP Surgery's class scores ``(B, N, C)`` of the patch tokens, with the feature all classes share removed.

    Image features F ``(B, 1 + N, D)`` (row 0 the image embedding) and text features T ``(C, D)`` are
    L2-normalised. With C ≥ 2 classes and no `redundant`: ``p = softmax(t · F₀ Tᵀ)`` over classes,
    ``w = p / mean_c p``; per patch f and class c the element-wise products ``f ⊙ T_c · w_c``, minus their mean over
    the classes (the redundant feature), summed over D. The sum is linear, so it is computed as
    ``w_c f·T_c − mean_c′ (w_c′ f·T_c′)`` without the ``(B, N, C, D)`` tensor. With `redundant` r ``(D,)`` (the
    L2-normalised embedding of an empty prompt, in the paper): ``f · (T_c − r)``.

    Args:
        image_features: :func:`clip_surgery_features` (or any ``(B, 1 + N, D)`` tokens with the embedding first).
        text_features: class text embeddings ``(C, D)``.
        redundant: ``(D,)`` or ``(1, D)`` redundant text embedding; required when C = 1.
        temperature: t of the class weights (the paper uses 2).
    """
    features = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.to(device=features.device, dtype=torch.float32), dim=-1)
    patches = features[:, 1:]
    if redundant is not None:
        redundant = F.normalize(redundant.to(device=features.device, dtype=torch.float32).reshape(1, -1), dim=-1)
        return patches @ (text - redundant).T
    if text.shape[0] < 2:
        raise ValueError(
            f"feature_surgery got {text.shape[0]} class; with one class pass redundant= (the L2-normalised text "
            "embedding of an empty prompt, as CLIP Surgery does), or pass at least two classes."
        )
    probs = torch.softmax(temperature * features[:, 0] @ text.T, dim=-1)  # (B, C)
    weighted = (patches @ text.T) * (probs / probs.mean(dim=-1, keepdim=True)).unsqueeze(1)  # (B, N, C)
    return weighted - weighted.mean(dim=-1, keepdim=True)


def _patch_features(
    model: nn.Module,
    pixels: torch.Tensor,
    method: str,
    image_processor,
    surgery_depth: int,
    naclip_gaussian_std: float,
) -> torch.Tensor:
    """``(B, 1 + N, D)`` features of `method` (:data:`DENSE_METHODS`)."""
    if method == "patch_similarity":
        return _projected_tokens(model, pixels, image_processor)
    with patched_attention(model, method, surgery_depth=surgery_depth, naclip_gaussian_std=naclip_gaussian_std):
        return _projected_tokens(model, pixels, image_processor)


def _upsample_scores(scores: torch.Tensor, grid: tuple[int, int], patch: int, size: tuple[int, int]) -> torch.Tensor:
    """Patch scores ``(B, N, C)`` -> ``(B, C, H, W)``: bilinear upsampling of the grid over the pixels the patches
    cover, and the last row/column repeated over any remainder of the image the ViT's patches leave out."""
    grid_maps = scores.transpose(1, 2).reshape(scores.shape[0], scores.shape[2], *grid)
    covered = (grid[0] * patch, grid[1] * patch)
    maps = F.interpolate(grid_maps, size=covered, mode="bilinear", align_corners=False)
    return F.pad(maps, (0, size[1] - covered[1], 0, size[0] - covered[0]), mode="replicate")


def _min_max(scores: torch.Tensor) -> torch.Tensor:
    """Patch scores ``(B, N, C)`` min-max scaled to [0, 1] per image and class over the patches (a constant class
    scores 0 everywhere)."""
    low, high = scores.amin(dim=1, keepdim=True), scores.amax(dim=1, keepdim=True)
    return (scores - low) / (high - low).clamp(min=torch.finfo(scores.dtype).tiny)


def _check_dense(model: nn.Module, pixels: torch.Tensor, class_text_embeds: torch.Tensor, method: str) -> int:
    """Validate a dense call; returns the patch size."""
    if method not in DENSE_METHODS:
        raise ValueError(f"method={method!r} is not one of {DENSE_METHODS}.")
    if class_text_embeds.dim() != 2:
        raise ValueError(f"class_text_embeds must have shape (C, D); got {tuple(class_text_embeds.shape)}.")
    patch = vision_transformer(model).config.patch_size
    if min(pixels.shape[-2:]) < patch:
        raise ValueError(f"Image size {pixels.shape[-2]}x{pixels.shape[-1]} is smaller than one {patch}x{patch} patch.")
    return patch


@torch.no_grad()
def patch_scores(
    model: nn.Module,
    pixels: torch.Tensor,
    class_text_embeds: torch.Tensor,
    method: str = "clip_surgery",
    *,
    image_processor,
    redundant_embeds: torch.Tensor | None = None,
    surgery_depth: int = SURGERY_DEPTH,
    naclip_gaussian_std: float = NACLIP_GAUSSIAN_STD,
) -> torch.Tensor:
    """Raw class scores ``(B, N, C)`` (float32) of the N patches, in row-major order, with the model in eval mode.

    The patch features of `method` (L2-normalised) against each class text embedding: ``clip_surgery`` through
    :func:`feature_surgery` (multi-class rule, or ``f · (T_c − r)`` with `redundant_embeds` r), the others by cosine
    similarity. Arguments as :func:`dense_scores`.
    """
    _check_dense(model, pixels, class_text_embeds, method)
    with eval_mode(model):
        features = _patch_features(model, pixels, method, image_processor, surgery_depth, naclip_gaussian_std)
    if method == "clip_surgery":
        return feature_surgery(features, class_text_embeds, redundant=redundant_embeds)
    text = F.normalize(class_text_embeds.to(device=features.device, dtype=torch.float32), dim=-1)
    return F.normalize(features[:, 1:], dim=-1) @ text.T


def dense_scores(
    model: nn.Module,
    pixels: torch.Tensor,
    class_text_embeds: torch.Tensor,
    method: str = "clip_surgery",
    *,
    image_processor,
    redundant_embeds: torch.Tensor | None = None,
    surgery_depth: int = SURGERY_DEPTH,
    naclip_gaussian_std: float = NACLIP_GAUSSIAN_STD,
    **options,
) -> torch.Tensor:
    """Raw class scores ``(B, C, H, W)`` (float32) at every pixel, for open-vocabulary segmentation: the arg-max over
    C is the predicted class, the decision rule of NACLIP's and SCLIP's code (cosine similarities upsampled
    bilinearly, no per-class rescaling). Cosine similarities in [−1, 1] for ``naclip``, ``sclip`` and
    ``patch_similarity``; :func:`feature_surgery` scores for ``clip_surgery``. The registry's ``dense_fn``.

    Args:
        model: a `CLIPModel` or `CLIPVisionModelWithProjection` (or a peft/DDP wrapper of one), sdpa or eager; run in
            eval mode, its previous mode restored.
        pixels: ``(B, 3, H, W)`` in [0, 1], any size of at least one patch (position embeddings are interpolated).
        class_text_embeds: ``(C, D)`` class text embeddings (e.g. prompt ensembles).
        method: one of :data:`DENSE_METHODS`.
        image_processor: the model's image processor (its mean and std normalise the pixels).
        redundant_embeds: ``clip_surgery`` only: the redundant text embedding ``(D,)`` to subtract (the empty
            prompt's, :func:`empty_prompt_embedding`) instead of the multi-class redundant feature (needed when
            C = 1).
        surgery_depth: ``clip_surgery``'s number of modified last blocks.
        naclip_gaussian_std: σ of ``naclip``'s neighbourhood prior, in patches.
        options: other methods' options, ignored.
    """
    patch = _check_dense(model, pixels, class_text_embeds, method)
    scores = patch_scores(
        model,
        pixels,
        class_text_embeds,
        method,
        image_processor=image_processor,
        redundant_embeds=redundant_embeds,
        surgery_depth=surgery_depth,
        naclip_gaussian_std=naclip_gaussian_std,
    )
    size = (pixels.shape[-2], pixels.shape[-1])
    return _upsample_scores(scores, (size[0] // patch, size[1] // patch), patch, size)


def dense_maps(
    model: nn.Module,
    pixels: torch.Tensor,
    class_text_embeds: torch.Tensor,
    method: str = "clip_surgery",
    *,
    image_processor,
    redundant_embeds: torch.Tensor | None = None,
    surgery_depth: int = SURGERY_DEPTH,
    naclip_gaussian_std: float = NACLIP_GAUSSIAN_STD,
    **options,
) -> torch.Tensor:
    """One map per class ``(B, C, H, W)`` (float32, each in [0, 1]) for display and localisation: the patch scores
    of :func:`patch_scores`, min-max normalised per image and class over the patches (as CLIP Surgery's
    ``get_similarity_map``), the patch grid upsampled bilinearly to the image. Arguments as :func:`dense_scores`.

    The rescaling changes which class is highest at a pixel: segment with :func:`dense_scores`, not these maps.
    """
    patch = _check_dense(model, pixels, class_text_embeds, method)
    scores = patch_scores(
        model,
        pixels,
        class_text_embeds,
        method,
        image_processor=image_processor,
        redundant_embeds=redundant_embeds,
        surgery_depth=surgery_depth,
        naclip_gaussian_std=naclip_gaussian_std,
    )
    size = (pixels.shape[-2], pixels.shape[-1])
    return _upsample_scores(_min_max(scores), (size[0] // patch, size[1] // patch), patch, size)


def empty_prompt_embedding(model: nn.Module, tokenizer, templates: tuple[str, ...] = PROMPT_TEMPLATES) -> torch.Tensor:
    """CLIP Surgery's redundant feature for one class: the L2-normalised text embedding ``(D,)`` of the empty class
    name in the prompt `templates` (the authors' demo: ``encode_text_with_prompt_ensemble(model, [""])``, with the
    same ensemble as the class prompts)."""
    return class_text_embeddings(model, tokenizer, [""], templates)[0]


def target_maps(
    model: nn.Module,
    pixels: torch.Tensor,
    text_embeds: torch.Tensor,
    method: str = "clip_surgery",
    *,
    image_processor,
    empty_prompt_embeds: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """Maps ``(B, H, W)`` in [0, 1] for one target text embedding per image (the registry's ``fn``).

    Each image's map is its target's :func:`dense_maps` map, a function of the image and its target only (not of
    the rest of the batch). ``clip_surgery`` needs `empty_prompt_embeds`, the redundant feature of the paper's
    single-class rule (:func:`empty_prompt_embedding`, with the class prompts' templates): ``f · (T − r)``. Other
    `options` go to :func:`dense_maps`.
    """
    if text_embeds.dim() != 2 or text_embeds.shape[0] != pixels.shape[0]:
        raise ValueError(
            f"text_embeds of shape {tuple(text_embeds.shape)} for {pixels.shape[0]} images; pass one target text "
            "embedding per image, (B, D) (e.g. class_embeds[labels])."
        )
    if method == "clip_surgery" and empty_prompt_embeds is None:
        raise ValueError(
            "clip_surgery maps for one target need empty_prompt_embeds=, CLIP Surgery's redundant feature: "
            "hf_clip_aft.interpret.surgery.empty_prompt_embedding(model, tokenizer, templates), with the templates "
            "of the class prompts (the evaluation and the page pass it)."
        )
    classes, targets = torch.unique(text_embeds, dim=0, return_inverse=True)
    maps = dense_maps(
        model, pixels, classes, method, image_processor=image_processor, redundant_embeds=empty_prompt_embeds, **options
    )
    return maps[torch.arange(maps.shape[0], device=maps.device), targets.to(maps.device)]


_DESCRIPTIONS = {
    "clip_surgery": (
        "CLIP Surgery",
        "v-v attention path in the last 6 blocks + feature surgery (Li et al., arXiv 2304.05653)",
    ),
    "naclip": ("NACLIP", "last block: k-k attention + Gaussian neighbourhood prior, no residual/MLP (WACV 2025)"),
    "sclip": ("SCLIP", "last block: correlative q-q + k-k self-attention (Wang et al., ECCV 2024)"),
    "patch_similarity": (
        "Patch similarity",
        "the unmodified model's patch tokens vs the text, the control for the training-free methods",
    ),
}
for _name, (_label, _description) in _DESCRIPTIONS.items():
    register_map_method(
        MapMethod(
            name=_name,
            label=_label,
            family="training-free",
            needs="none",
            description=_description,
            fn=partial(target_maps, method=_name),
            dense_fn=partial(dense_scores, method=_name),
            default=False,  # opt-in: `--methods all` keeps the gradient and attention maps (`all training-free`)
        )
    )
