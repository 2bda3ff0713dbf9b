"""Where LLaVA's answer looks: a relevance map over the image patches for every generated answer token.

LLaVA (``LlavaForConditionalGeneration``) replaces each image placeholder token of the prompt by one projected
vision-tower feature: the hidden state of the patch token at ``vision_feature_layer`` (−2 for LLaVA-1.5), with the
CLS token dropped under the ``"default"`` feature selection. So the language model's relevance of an answer token to
the image-token positions is a map over the patch grid. Two methods, both from one teacher-forced forward pass over
prompt + answer (the greedy answer is generated first; with a causal mask, the query that produced answer token
``k`` is position ``prompt_length − 1 + k``, whose attention equals the one seen during cached generation):

- ``"attention"`` (the attention visualisers' map): that query's attention over the input, averaged over heads, the
  attention to the first token (the "attention sink", mostly BOS) removed and the rest renormalised to sum 1, then
  averaged over layers; read at the image-token positions.
- ``"relevancy"`` (Chefer et al., 2021, "Generic attention-model explainability", rules 5-6, as LVLM-Interpret
  applies them to LLaVA): with ``Ā_l = mean_heads((∂y/∂A_l ⊙ A_l)⁺)`` for the answer token's logit ``y``, the
  relevance ``R = (I + Ā_L) ⋯ (I + Ā_1)``; the map is the query's row of ``R − I`` at the image positions. One
  backward pass per answer token; only the row is propagated (``O(L n²)``, not ``O(L n³)``).

With ``vision_weighting``, the image-token map is carried back through the vision tower's own layers up to the one
LLaVA reads (its features mix patches): by attention rollout for ``"attention"`` and by the same Chefer rule on the
tower's attention for ``"relevancy"``. Without it, image token ``j`` is patch ``j``.

LLaVA-NeXT (anyres tiling: a base view plus crops, unpadded and interleaved with newline tokens) is refused: mapping
its tokens back to the image is not handled.

The model runs in its own dtype (bf16 on a GPU, fp32 on a CPU); maps are computed in float32. Attention weights need
eager attention: it is switched on for the call and the previous implementation restored. No weight is changed and
no ``.grad`` is written (gradients are taken with ``torch.autograd.grad`` on the attention tensors only).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import LlavaForConditionalGeneration

from ..modeling import eval_mode
from .metrics import energy_pointing_game, gini_index, pointing_game, top_fraction_iou
from .vit_maps import attention_rollout

METHODS = ("attention", "relevancy")
MAX_NEW_TOKENS_LIMIT = 256  # each answer token costs a backward pass for "relevancy" and a row of every attention


@dataclass
class LlavaExplanation:
    """What :func:`llava_relevance` returns for one image and prompt.

    Attributes:
        answer: the generated answer (special tokens skipped).
        token_ids: the generated token ids, in order (a final end-of-sequence token included).
        tokens: each generated token's text.
        maps: ``(T, rows, columns)`` float32 relevance of each generated token over the patch grid, non-negative.
        image_share: ``(T,)`` share of each token's (renormalised) attention or relevance that lies on the image
            tokens, in [0, 1], before any vision weighting.
        method: ``"attention"`` or ``"relevancy"``.
        vision_weighting: whether the map was carried back through the vision tower.
    """

    answer: str
    token_ids: list[int]
    tokens: list[str]
    maps: torch.Tensor
    image_share: torch.Tensor
    method: str
    vision_weighting: bool


# ---------------------------------------------------------------------------------------------------------------
# Pure functions: the math, testable on planted tensors.
# ---------------------------------------------------------------------------------------------------------------


def image_token_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Sorted positions ``(P,)`` of `image_token_id` in the 1-D `input_ids`, wherever the processor put them."""
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be one sequence (1-D), got shape {tuple(input_ids.shape)}.")
    positions = (input_ids == image_token_id).nonzero().flatten()
    if positions.numel() == 0:
        raise ValueError(
            f"No image token (id {image_token_id}) in the prompt: the processor did not insert the image. Put the "
            "processor's image token (e.g. '<image>') in the prompt, or use its chat template."
        )
    return positions


def attention_to_tokens(
    attentions: Sequence[torch.Tensor],
    queries: torch.Tensor,
    drop_first_token: bool = True,
) -> torch.Tensor:
    """``(T, n)`` attention of each query over the n input tokens: heads averaged, the first token's share removed
    and the rest renormalised to sum 1, then layers averaged.

    Args:
        attentions: one ``(heads, n, n)`` (or ``(1, heads, n, n)``) softmax attention per layer.
        queries: ``(T,)`` query positions (the rows read).
        drop_first_token: remove the attention to position 0 (the attention sink) before renormalising.
    """
    rows = torch.stack([a.reshape(-1, *a.shape[-2:])[:, queries].float().mean(dim=0) for a in attentions])
    if drop_first_token:
        rows[..., 0] = 0
        rows = rows / rows.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
    return rows.mean(dim=0)


def chefer_layer_relevance(attention: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Chefer et al.'s rule 5: ``Ā = mean_heads((∇A ⊙ A)⁺)``, ``(n, n)`` from ``(heads, n, n)`` (or with a batch
    dimension of 1) attention and its gradient."""
    product = gradient.reshape(-1, *gradient.shape[-2:]).float() * attention.reshape(-1, *attention.shape[-2:]).float()
    return product.clamp(min=0).mean(dim=0)


def propagate_row(row: torch.Tensor, layer_matrices: Sequence[torch.Tensor], residual: bool) -> torch.Tensor:
    """``row · M_L ⋯ M_1``: rows of a product of per-layer matrices, without forming the product.

    `layer_matrices` are listed first layer first; ``M_l = I + Ā_l`` when `residual` (Chefer's rule 6,
    ``R ← R + Ā R``), else ``M_l = Ā_l``. `row` is ``(n,)`` or ``(T, n)``.
    """
    for matrix in reversed(layer_matrices):
        row = row + row @ matrix if residual else row @ matrix
    return row


def patch_relevance(
    token_maps: torch.Tensor,
    first_patch_token: int,
    vision_flow: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(T, patches)`` maps from ``(T, P)`` relevance over LLaVA's image tokens.

    Image token ``j`` is vision token ``j + first_patch_token`` (1 when LLaVA drops CLS, ``"default"``; 0 when it
    keeps it, ``"full"``). `vision_flow` ``(N + 1, N + 1)`` maps the read layer's tokens back to the input tokens
    (rollout or Chefer relevance of the tower); without it each token stands for its own patch (CLS dropped).
    """
    tokens = token_maps.new_zeros(token_maps.shape[0], token_maps.shape[1] + first_patch_token)
    tokens[:, first_patch_token:] = token_maps
    if vision_flow is not None:
        tokens = tokens @ vision_flow.to(tokens)
    return tokens[:, 1:]


def to_patch_grid(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(T, P)`` -> ``(T, rows, columns)``, checking that P fills the grid (row-major, as ViT patches are)."""
    if maps.shape[-1] != grid[0] * grid[1]:
        raise ValueError(f"{maps.shape[-1]} patch values do not fill a {grid[0]}x{grid[1]} patch grid.")
    return maps.reshape(maps.shape[0], *grid)


def word_token_indices(pieces: Sequence[str], word: str) -> list[int]:
    """Indices of the tokens whose text overlaps the first case-insensitive occurrence of `word` in the text that
    the `pieces` (each token's added text, in order) spell; empty when the word does not occur."""
    text = "".join(pieces).lower()
    start = text.find(word.strip().lower())
    if not word.strip() or start < 0:
        return []
    end = start + len(word.strip())
    indices, offset = [], 0
    for i, piece in enumerate(pieces):
        if offset < end and offset + len(piece) > start:
            indices.append(i)
        offset += len(piece)
    return indices


# ---------------------------------------------------------------------------------------------------------------
# The model side.
# ---------------------------------------------------------------------------------------------------------------


def check_llava_architecture(name: str) -> None:
    """Raise unless `name` is ``"LlavaForConditionalGeneration"`` (LLaVA-NeXT's tiling is not handled). Cheap: a
    checkpoint's ``config.architectures`` entry can be checked before the model is loaded."""
    if name == LlavaForConditionalGeneration.__name__:
        return
    if "Next" in name or "Onevision" in name:
        raise NotImplementedError(
            f"{name} tiles the image (anyres: a base view plus crops, unpadded, with newline tokens between rows); "
            "mapping those image tokens back to the image is not handled. Use a LLaVA-1.5 checkpoint "
            "(LlavaForConditionalGeneration, e.g. llava-hf/llava-1.5-7b-hf)."
        )
    raise TypeError(f"model must be a LlavaForConditionalGeneration, got {name}.")


def check_llava_model(model) -> None:
    """Raise unless `model` is a `LlavaForConditionalGeneration` (see :func:`check_llava_architecture`)."""
    if not isinstance(model, LlavaForConditionalGeneration):
        check_llava_architecture(type(model).__name__)


def vision_read_layers(llava_config) -> int:
    """How many vision-tower layers run before the hidden state LLaVA reads (``vision_feature_layer``; the
    deepest one when it reads several)."""
    count = llava_config.vision_config.num_hidden_layers + 1  # hidden_states: the embeddings, then each layer
    layers = llava_config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    return max(layer % count for layer in layers)


def image_grid(llava_config, num_image_tokens: int) -> tuple[tuple[int, int], int]:
    """The patch grid ``(rows, columns)`` and the vision index of the first image token, checked against the
    number of image tokens in the prompt (one image per prompt)."""
    vision = llava_config.vision_config
    side = vision.image_size // vision.patch_size
    strategy = llava_config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy={strategy!r} is not handled; expected 'default' or 'full'.")
    first_patch_token = 1 if strategy == "default" else 0
    expected = side * side + 1 - first_patch_token
    if num_image_tokens != expected:
        raise ValueError(
            f"The prompt holds {num_image_tokens} image tokens, but one {vision.image_size}-pixel image in "
            f"{vision.patch_size}-pixel patches gives {expected} ({strategy!r} feature selection). Pass exactly one "
            "image, and a processor whose patch_size and vision_feature_select_strategy match the model's config."
        )
    return (side, side), first_patch_token


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Run the block with eager attention everywhere (the only one that returns attention weights), then restore
    each sub-model's previous implementation."""
    config = model.config
    previous = {"": config._attn_implementation}
    for name in ("text_config", "vision_config"):
        previous[name] = getattr(config, name)._attn_implementation
    if set(previous.values()) == {"eager"}:
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def llava_prompt(processor, prompt: str) -> str:
    """The text to give the processor: `prompt` as is if it holds the image token, else a user turn with the image
    first through the processor's chat template, else ``"<image>\\n" + prompt``."""
    image_token = processor.image_token
    if image_token in prompt:
        return prompt
    if getattr(processor, "chat_template", None):
        conversation = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": prompt}],
            }
        ]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"{image_token}\n{prompt}"


def _token_pieces(tokenizer, token_ids: list[int]) -> list[str]:
    """Each token's added text: the growth of the decoded prefix (keeps the spaces that single-token decoding of
    SentencePiece tokens drops)."""
    texts = [tokenizer.decode(token_ids[: i + 1]) for i in range(len(token_ids))]
    return [text[len(before) :] for before, text in zip([""] + texts[:-1], texts)]


def llava_relevance(
    model: LlavaForConditionalGeneration,
    processor,
    image: Image.Image,
    prompt: str,
    *,
    method: str = "attention",
    vision_weighting: bool = False,
    max_new_tokens: int = 16,
    drop_first_token: bool = True,
) -> LlavaExplanation:
    """Generate LLaVA's greedy answer to `prompt` about `image` and map each answer token's relevance over the patches.

    Args:
        model: a `LlavaForConditionalGeneration` (any dtype and device; eager attention and eval mode are switched
            on for the call, and the previous implementation and modes restored).
        processor: its `LlavaProcessor`.
        image: a PIL image.
        prompt: the question; the image token and the chat template are added when the prompt lacks them
            (:func:`llava_prompt`).
        method: ``"attention"`` (head-, layer-averaged attention, first token removed) or ``"relevancy"`` (Chefer's
            gradient-weighted rule); see the module docstring.
        vision_weighting: carry the map back through the vision tower's layers up to the one LLaVA reads.
        max_new_tokens: answer length cap, 1 to :data:`MAX_NEW_TOKENS_LIMIT`.
        drop_first_token: ``"attention"`` only: remove the attention to the first token before renormalising.

    Raises:
        NotImplementedError: a LLaVA-NeXT model. ValueError: a bad `method` or `max_new_tokens`, or a prompt without
        exactly one image's tokens.
    """
    check_llava_model(model)
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}.")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise ValueError(f"max_new_tokens={max_new_tokens} must lie in [1, {MAX_NEW_TOKENS_LIMIT}].")
    config = model.config
    weight = next(model.parameters())
    inputs = processor(images=image, text=llava_prompt(processor, prompt), return_tensors="pt")
    input_ids = inputs["input_ids"].to(weight.device)
    pixels = inputs["pixel_values"].to(weight.device, weight.dtype)
    positions = image_token_positions(input_ids[0], config.image_token_id)
    grid, first_patch_token = image_grid(config, positions.numel())

    with eval_mode(model), eager_attention(model):
        with torch.no_grad():
            sequence = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=pixels,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                suppress_tokens=[config.image_token_id],  # a generated image token would break the teacher forcing
            )
        answer_ids = sequence[0, input_ids.shape[1] :]
        queries = torch.arange(answer_ids.numel(), device=sequence.device) + input_ids.shape[1] - 1
        gradients = method == "relevancy"
        with torch.set_grad_enabled(gradients):
            # Pixels as a graph leaf: the attention depends on them even when every weight is frozen.
            leaf = pixels.detach().requires_grad_(gradients)
            out = model(
                input_ids=sequence,
                attention_mask=torch.ones_like(sequence),
                pixel_values=leaf,
                output_attentions=True,
            )
            text_attn = list(out.attentions)
            vision_attn = list(out.image_outputs.attentions or ())[: vision_read_layers(config)]
            if vision_weighting and not vision_attn and vision_read_layers(config):
                raise RuntimeError("The vision tower returned no attention weights; is its attention eager?")
            if gradients:
                maps, shares = _relevancy(out.logits[0], sequence[0], queries, positions, text_attn,
                                          vision_attn if vision_weighting else [], first_patch_token)  # fmt: skip
            else:
                rows = attention_to_tokens(text_attn, queries, drop_first_token)
                token_maps, shares = rows[:, positions], rows[:, positions].sum(dim=-1)
                flow = (
                    attention_rollout([a.detach() for a in vision_attn])[0]
                    if vision_weighting and vision_attn
                    else None
                )
                maps = patch_relevance(token_maps, first_patch_token, flow)
    token_ids = answer_ids.tolist()
    tokenizer = processor.tokenizer
    return LlavaExplanation(
        answer=tokenizer.decode(token_ids, skip_special_tokens=True).strip(),
        token_ids=token_ids,
        tokens=_token_pieces(tokenizer, token_ids),
        maps=to_patch_grid(maps.detach().clamp(min=0), grid).float().cpu(),
        image_share=shares.detach().float().cpu(),
        method=method,
        vision_weighting=vision_weighting and bool(vision_attn),
    )


def _relevancy(
    logits: torch.Tensor,
    sequence: torch.Tensor,
    queries: torch.Tensor,
    positions: torch.Tensor,
    text_attn: list[torch.Tensor],
    vision_attn: list[torch.Tensor],
    first_patch_token: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chefer relevancy of each answer token: ``(T, patches)`` maps (carried through the tower's layers by the same
    rule when `vision_attn` is given) and ``(T,)`` image shares."""
    maps, shares = [], []
    for query in queries.tolist():
        score = logits[query, sequence[query + 1]]
        grads = torch.autograd.grad(score, text_attn + vision_attn, retain_graph=True)
        cams = [chefer_layer_relevance(a.detach(), g) for a, g in zip(text_attn, grads)]
        start = torch.zeros(sequence.numel(), device=cams[0].device)
        start[query] = 1
        row = propagate_row(start, cams, residual=True)
        row[query] -= 1  # R − I: the token's relevance to itself is not the image's
        shares.append(row[positions].sum() / row.sum().clamp_min(torch.finfo(row.dtype).tiny))
        flow = None
        if vision_attn:
            vision_cams = [chefer_layer_relevance(a.detach(), g) for a, g in zip(vision_attn, grads[len(text_attn) :])]
            flow = propagate_row(
                torch.eye(vision_cams[0].shape[-1], device=row.device),
                vision_cams,
                residual=True,
            )
        maps.append(patch_relevance(row[positions][None], first_patch_token, flow))
    return torch.cat(maps), torch.stack(shares)


def explained_tokens(
    explanation: LlavaExplanation, word: str | None, special_ids: Sequence[int]
) -> tuple[list[int], str]:
    """Which answer tokens a summary map averages, and what they are: the tokens of `word` (``"word"``) when it
    occurs in the answer, else every token that is not special (``"answer"``; all tokens if all are special)."""
    if word:
        indices = word_token_indices(explanation.tokens, word)
        if indices:
            return indices, "word"
    special = set(special_ids)
    indices = [i for i, token in enumerate(explanation.token_ids) if token not in special]
    return indices or list(range(len(explanation.token_ids))), "answer"


def map_summary(
    saliency_map: torch.Tensor,
    mask: torch.Tensor | None = None,
    iou_fraction: float = 0.2,
    annotated: torch.Tensor | None = None,
) -> dict:
    """Summary numbers of one ``(rows, columns)`` patch map: its peak patch and Gini sparsity; with a boolean
    ``(H, W)`` object mask, the suite's localisation metrics on the map upsampled (bilinear) to the mask, over the
    `annotated` pixels (``(H, W)`` boolean, default all); they are left out when no pixel is annotated or none is
    object (nothing to point at)."""
    values = saliency_map.float()
    peak = int(values.argmax())
    summary = {
        "peak_patch": [peak // values.shape[1], peak % values.shape[1]],
        "gini": gini_index(values[None]).item(),
    }
    annotated = torch.ones_like(mask, dtype=torch.bool) if annotated is None and mask is not None else annotated
    if mask is not None and (mask.bool() & annotated.bool()).any():
        upsampled = F.interpolate(
            values[None, None],
            size=tuple(mask.shape),
            mode="bilinear",
            align_corners=False,
        )[0]
        masks, valid = mask[None].bool(), annotated[None].bool()
        summary["pointing_game"] = pointing_game(upsampled, masks, valid).item()
        summary["energy_pointing_game"] = energy_pointing_game(upsampled.clamp(min=0), masks, valid).item()
        summary["top_k_iou"] = top_fraction_iou(upsampled, masks, iou_fraction, valid).item()
    return summary
