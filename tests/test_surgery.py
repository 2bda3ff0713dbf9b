"""Training-free maps (CLIP Surgery, NACLIP, SCLIP) against directly written references, on random tiny towers;
and seeded tie-breaking of the faithfulness curves that compare map families."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import CLIPModel, CLIPTokenizer, CLIPVisionModelWithProjection

from hf_clip_aft.interpret.faithfulness import curve_auc, deletion_ranks, faithfulness_curve
from hf_clip_aft.interpret.registry import get_map_method
from hf_clip_aft.interpret.saliency import saliency
from hf_clip_aft.interpret.surgery import (
    DENSE_METHODS,
    PATCHED_METHODS,
    clip_surgery_features,
    dense_maps,
    empty_prompt_embedding,
    feature_surgery,
    neighbourhood_prior,
    patched_attention,
    target_maps,
)
from hf_clip_aft.model_configs import clip_config
from hf_clip_aft.modeling import encode_images

TINY = "hf_clip_aft/assets/tiny-clip"
PROCESSOR = SimpleNamespace(image_mean=[0.48, 0.46, 0.41], image_std=[0.27, 0.26, 0.28])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: with several threads, synchronisation costs far more than the arithmetic (40x on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tower(layers: int = 2, attention: str = "sdpa", seed: int = 0) -> CLIPVisionModelWithProjection:
    """A random tiny tower (width 32, 2 heads, 16-pixel patches, 64-pixel images) with weights large enough that
    attention is far from uniform."""
    config = clip_config("tiny").vision_config
    config.num_hidden_layers = layers
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection._from_config(config, attn_implementation=attention).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0, 0.3)
    return model


def _pixels(batch: int = 2, height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _inputs(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(PROCESSOR.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(PROCESSOR.image_std).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(*x.shape[:2], heads, -1).transpose(1, 2)


def _attention_out(attention, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    out = (weights @ values).transpose(1, 2)
    return attention.out_proj(out.reshape(*out.shape[:2], -1))


def _reference_tokens(model, pixels, last_block) -> torch.Tensor:
    """The tower's tokens with every block but the last run by hand (q kᵀ attention, residuals, MLP), the last by
    `last_block(layer, x) -> tokens`."""
    tower = model.vision_model
    x = tower.pre_layrnorm(tower.embeddings(_inputs(pixels), interpolate_pos_encoding=True))
    for layer in tower.encoder.layers[:-1]:
        x = _stock_block(layer, x)
    return last_block(tower.encoder.layers[-1], x)


def _stock_block(layer, x: torch.Tensor) -> torch.Tensor:
    attention = layer.self_attn
    normed = layer.layer_norm1(x)
    q, k, v = (_split(p(normed), attention.num_heads) for p in (attention.q_proj, attention.k_proj, attention.v_proj))
    x = x + _attention_out(attention, (q @ k.transpose(-1, -2) * attention.scale).softmax(-1), v)
    return x + layer.mlp(layer.layer_norm2(x))


def _reference_surgery(model, pixels, depth: int) -> torch.Tensor:
    """CLIP Surgery's published dual-path forward (xmed-lab/CLIP_Surgery, ResidualAttentionBlock), written out."""
    tower = model.vision_model
    x = tower.pre_layrnorm(tower.embeddings(_inputs(pixels), interpolate_pos_encoding=True))
    layers = tower.encoder.layers
    first = max(len(layers) - depth, 0)
    new = None
    for index, layer in enumerate(layers):
        if index == first:
            new = x
        if index >= first:
            attention = layer.self_attn
            v = _split(attention.v_proj(layer.layer_norm1(x)), attention.num_heads)
            new = new + _attention_out(attention, (v @ v.transpose(-1, -2) * attention.scale).softmax(-1), v)
        x = _stock_block(layer, x)
    tokens = torch.cat([x[:, :1], new[:, 1:]], dim=1)
    return model.visual_projection(tower.post_layernorm(tokens))


@pytest.mark.parametrize(("layers", "depth", "attention"), [(2, 6, "sdpa"), (3, 2, "eager"), (3, 2, "sdpa")])
def test_clip_surgery_equals_the_published_dual_path_and_keeps_the_stock_embedding(layers, depth, attention):
    model = _tower(layers, attention)
    pixels = _pixels()
    with torch.no_grad():
        features = clip_surgery_features(model, pixels, image_processor=PROCESSOR, surgery_depth=depth)
        reference = _reference_surgery(model, pixels, depth)
        stock = encode_images(model, pixels, PROCESSOR.image_mean, PROCESSOR.image_std, normalize=False)
    assert features.shape == (2, 1 + 16, 16)
    assert torch.allclose(features[:, 1:], reference[:, 1:], atol=1e-5)
    assert torch.equal(features[:, 0], stock)  # bit for bit
    # The surgery changes the patch tokens: the test would not pass with the stock tokens.
    with torch.no_grad():
        plain = model(pixel_values=_inputs(pixels)).last_hidden_state
    assert not torch.allclose(model.visual_projection(model.vision_model.post_layernorm(plain))[:, 1:], features[:, 1:])


def test_clip_surgery_on_a_full_clip_model_and_under_peft():
    clip = CLIPModel.from_pretrained(TINY).eval()
    pixels = _pixels()
    with torch.no_grad():
        features = clip_surgery_features(clip, pixels, image_processor=PROCESSOR)
        assert torch.equal(
            features[:, 0], encode_images(clip, pixels, PROCESSOR.image_mean, PROCESSOR.image_std, False)
        )
    lora = get_peft_model(_tower(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        features = clip_surgery_features(lora, pixels, image_processor=PROCESSOR)
        expected = lora(pixel_values=_inputs(pixels)).image_embeds
        # The LoRA update of v_proj reaches the v-v path: the merged model gives the same features.
        merged = clip_surgery_features(lora.merge_and_unload(), pixels, image_processor=PROCESSOR)
    assert torch.equal(features[:, 0], expected)
    assert torch.allclose(features, merged, atol=1e-5)
    # A bare CLIPVisionModel has no projection: features in the tower's width, row 0 its pooled output.
    bare = _tower().vision_model
    with torch.no_grad():
        features = clip_surgery_features(bare, pixels, image_processor=PROCESSOR)
        assert torch.equal(features[:, 0], bare(pixel_values=_inputs(pixels)).pooler_output)
    assert features.shape == (2, 17, 32)


def _official_prior(rows: int, columns: int, std: float) -> torch.Tensor:
    """NACLIP's construction (sinahmr/NACLIP, gaussian_window + get_attention_addition): one-hot maps convolved
    with a (2 rows − 1) × (2 columns − 1) Gaussian window, CLS row and column 0."""
    axes = [torch.arange(size * 2 - 1, dtype=torch.float) - (size - 1) for size in (rows, columns)]
    window = torch.exp(-(torch.stack(torch.meshgrid(*axes, indexing="ij")) ** 2).sum(0) / (2 * std**2))
    one_hot = torch.eye(rows * columns).view(rows * columns, 1, rows, columns)
    out = F.conv2d(one_hot, window[None, None], padding="same").view(rows * columns, rows * columns)
    return F.pad(out, (1, 0, 1, 0))


def test_neighbourhood_prior_equals_the_official_construction():
    assert torch.allclose(neighbourhood_prior((3, 5), 2.0), _official_prior(3, 5, 2.0), atol=1e-6)
    assert torch.allclose(neighbourhood_prior((4, 4), 5.0), _official_prior(4, 4, 5.0), atol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        neighbourhood_prior((2, 2), 0.0)


def _reference_naclip(layer, x, grid, std):
    attention = layer.self_attn
    normed = layer.layer_norm1(x)
    k, v = (_split(p(normed), attention.num_heads) for p in (attention.k_proj, attention.v_proj))
    logits = k @ k.transpose(-1, -2) * attention.scale + _official_prior(*grid, std)
    return _attention_out(attention, logits.softmax(-1), v)  # no residual, no MLP


def _reference_sclip(layer, x):
    attention = layer.self_attn
    normed = layer.layer_norm1(x)
    q, k, v = (_split(p(normed), attention.num_heads) for p in (attention.q_proj, attention.k_proj, attention.v_proj))
    weights = (q @ q.transpose(-1, -2) * attention.scale).softmax(-1) + (
        k @ k.transpose(-1, -2) * attention.scale
    ).softmax(-1)
    x = x + _attention_out(attention, weights, v)
    return x + layer.mlp(layer.layer_norm2(x))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_naclip_and_sclip_last_blocks_equal_their_references_on_a_non_square_image(attention):
    model = _tower(2, attention)
    pixels = _pixels(height=48, width=80)  # a 3 x 5 patch grid
    with torch.no_grad():
        for method, last_block in (
            ("naclip", lambda layer, x: _reference_naclip(layer, x, (3, 5), 1.5)),
            ("sclip", _reference_sclip),
        ):
            with patched_attention(model, method, naclip_gaussian_std=1.5):
                tokens = model(pixel_values=_inputs(pixels), interpolate_pos_encoding=True).last_hidden_state
            assert tokens.shape == (2, 1 + 15, 32)
            assert torch.allclose(tokens, _reference_tokens(model, pixels, last_block), atol=1e-5), method


@pytest.mark.parametrize("method", PATCHED_METHODS)
def test_leaving_the_patch_restores_the_model_exactly(method):
    model = _tower(3)
    pixels = _pixels()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(pixel_values=_inputs(pixels))
        with patched_attention(model, method, surgery_depth=2):
            inside = model(pixel_values=_inputs(pixels)).last_hidden_state
        with pytest.raises(RuntimeError, match="inside"), patched_attention(model, method):
            raise RuntimeError("an error inside the block")
        after = model(pixel_values=_inputs(pixels))
    assert not torch.allclose(inside, before.last_hidden_state)
    assert torch.equal(after.last_hidden_state, before.last_hidden_state)
    assert torch.equal(after.image_embeds, before.image_embeds)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
    assert not any(getattr(module, name) for module in model.modules() for name in hooks)


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (70, 50), (128, 96)])
def test_dense_maps_of_every_method_at_any_image_size(size):
    model = _tower()
    pixels = _pixels(1, *size)
    classes = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    for method in DENSE_METHODS:
        maps = dense_maps(model, pixels, classes, method, image_processor=PROCESSOR, unknown_option=1)
        assert maps.shape == (1, 3, *size), method
        assert maps.dtype == torch.float32
        assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
        # Min-max per class over the patches (bilinear upsampling between patch centres stays just inside [0, 1]).
        assert (maps.amax(dim=(2, 3)) > 0.9).all() and (maps.amin(dim=(2, 3)) < 0.1).all(), method
    with pytest.raises(ValueError, match="not one of"):
        dense_maps(model, pixels, classes, "gradcam", image_processor=PROCESSOR)


def test_feature_surgery_equals_the_element_wise_formula():
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, 1 + 6, 8, generator=generator)
    text = torch.randn(4, 8, generator=generator)
    scores = feature_surgery(image, text)
    # The paper's formulation, (B, N, C, D) products minus their class mean, summed over D.
    f, t = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    p = (2.0 * f[:, 0] @ t.T).softmax(-1)
    w = p / p.mean(-1, keepdim=True)
    products = f[:, 1:, None, :] * t[None, None] * w[:, None, :, None]
    assert torch.allclose(scores, (products - products.mean(dim=2, keepdim=True)).sum(-1), atol=1e-6)
    # With a redundant embedding r: f · (T − r).
    empty = torch.randn(8, generator=generator)
    expected = f[:, 1:] @ (t - F.normalize(empty, dim=0)).T
    assert torch.allclose(feature_surgery(image, text, redundant=empty), expected, atol=1e-6)
    with pytest.raises(ValueError, match="redundant"):
        feature_surgery(image, text[:1])


def test_feature_surgery_removes_a_feature_shared_by_all_classes():
    """Both class texts share a strong direction e2 that every patch carries; the class-specific parts are e0, e1.
    The plain similarity is dominated by the shared direction; feature surgery scores it zero."""
    e = torch.eye(5)
    text = torch.stack([3 * e[2] + e[0], 3 * e[2] + e[1]])
    patches = torch.stack([5 * e[2] + e[0], 5 * e[2] + e[1], 5 * e[2] + e[3]])  # class 0, class 1, shared only
    image = torch.cat([e[4:5], patches]).unsqueeze(0)  # the embedding is equally (un)like both classes
    plain = F.normalize(patches, dim=-1) @ F.normalize(text, dim=-1).T
    assert plain.min() > 0.9  # every patch looks like every class
    scores = feature_surgery(image, text)[0]
    assert torch.allclose(scores[2], torch.zeros(2), atol=1e-6)  # the shared feature alone: no evidence
    assert scores[0].argmax() == 0 and scores[1].argmax() == 1
    assert scores[0, 0] > 0 and scores[1, 1] > 0


def _planted_tower() -> CLIPVisionModelWithProjection:
    """A tower whose tokens carry colour: hidden unit 0 = the patch's mean red, unit 1 = its mean blue; no position
    embeddings; identity q, k, v and out-projections (tokens attend to tokens of their colour); no MLP. The
    projection reads unit 0 into dimension 0 and unit 1 into dimension 1: text "red" is e0, "blue" is e1."""
    model = _tower(2)
    tower = model.vision_model
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for norm in (tower.pre_layrnorm, tower.post_layernorm):
            norm.weight.fill_(1)
        kernel = tower.embeddings.patch_embedding.weight  # (32, 3, 16, 16)
        kernel[0, 0], kernel[1, 2] = 1 / 256, 1 / 256
        for layer in tower.encoder.layers:
            layer.layer_norm1.weight.fill_(1)
            layer.layer_norm2.weight.fill_(1)
            attention = layer.self_attn
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj):
                projection.weight.copy_(torch.eye(32))
        model.visual_projection.weight[0, 0], model.visual_projection.weight[1, 1] = 1.0, 1.0
    return model


def test_planted_region_gets_the_highest_map_values_for_every_method():
    model = _planted_tower()
    pixels = torch.zeros(1, 3, 128, 128)
    pixels[:, 2] = 1.0  # blue everywhere ...
    pixels[:, :, 32:80, 16:64] = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)  # ... but a red 3 x 3-patch region
    region = torch.zeros(128, 128, dtype=torch.bool)
    region[32:80, 16:64] = True
    classes = torch.eye(16)[:2]  # red, blue
    identity = SimpleNamespace(image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
    for method in DENSE_METHODS:
        maps = dense_maps(model, pixels, classes, method, image_processor=identity)[0]
        red, blue = maps[0], maps[1]
        assert region.flatten()[red.argmax()], method
        assert red[region].mean() > red[~region].mean() + 0.5, method
        assert blue[~region].mean() > blue[region].mean() + 0.5, method


def _demo_single_class_map(model, pixels: torch.Tensor, target: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """CLIP Surgery's demo for one text, written out: ``f @ (t − r)ᵀ`` on the L2-normalised surgery features, then
    ``get_similarity_map`` (min-max over the patches, bilinear upsampling of the grid)."""
    features = F.normalize(clip_surgery_features(model, pixels, image_processor=PROCESSOR), dim=-1)[:, 1:]
    similarity = (features * (target - empty)[:, None]).sum(-1)  # (B, N)
    low, high = similarity.amin(1, keepdim=True), similarity.amax(1, keepdim=True)
    grid = ((similarity - low) / (high - low)).view(-1, 1, 4, 4)
    return F.interpolate(grid, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]


def test_target_maps_follow_the_single_class_rule_and_do_not_depend_on_the_batch():
    """Each image's map is a function of the image and its own target: alone, or beside images of other classes
    (the multi-class redundant feature of the other targets made it change, r 0.77 between batch compositions)."""
    model = _tower()
    pixels = _pixels(3)
    classes = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(2)), dim=-1)
    empty = F.normalize(torch.randn(16, generator=torch.Generator().manual_seed(3)), dim=0)
    index = torch.tensor([1, 0, 1])
    for method in DENSE_METHODS:
        registered = get_map_method(method)
        assert (registered.family, registered.needs) == ("training-free", "none")
        maps = registered.fn(model, pixels, classes[index], image_processor=PROCESSOR, empty_prompt_embeds=empty)
        assert maps.shape == (3, 64, 64)
        for i in range(3):
            alone = registered.fn(model, pixels[i : i + 1], classes[index[i : i + 1]], image_processor=PROCESSOR,
                                  empty_prompt_embeds=empty)  # fmt: skip
            assert torch.allclose(maps[i], alone[0], atol=1e-5), method
        others = registered.fn(model, pixels, classes[[2, 2, 1]], image_processor=PROCESSOR, empty_prompt_embeds=empty)
        assert torch.allclose(maps[2], others[2], atol=1e-5), method  # same image and target, other batch-mates
        if method == "clip_surgery":
            assert torch.allclose(maps, _demo_single_class_map(model, pixels, classes[index], empty), atol=1e-5)
    with pytest.raises(ValueError, match="empty_prompt_embeds"):
        target_maps(model, pixels, classes[index], "clip_surgery", image_processor=PROCESSOR)
    with pytest.raises(ValueError, match="one target"):
        target_maps(model, pixels, classes[:2], "naclip", image_processor=PROCESSOR)


def test_empty_prompt_embedding_is_the_demos_prompt_ensemble_of_the_empty_name():
    clip = CLIPModel.from_pretrained(TINY).eval()
    tokenizer = CLIPTokenizer.from_pretrained(TINY)
    templates = ("a photo of a {}.", "a drawing of the {}.")
    tokens = tokenizer([t.format("") for t in templates], padding=True, return_tensors="pt")
    with torch.no_grad():
        each = F.normalize(clip.get_text_features(**tokens).pooler_output, dim=-1)
    assert torch.allclose(empty_prompt_embedding(clip, tokenizer, templates), F.normalize(each.mean(0), dim=0))


def test_dense_scores_are_the_raw_cosines_that_segmentation_takes_the_arg_max_of():
    """The registry's dense_fn gives the raw scores (NACLIP's logits): the min-max display maps pick another class
    on part of the pixels of a random tower."""
    model = _tower()
    pixels = _pixels(2)
    classes = F.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(4)), dim=-1)
    scores = get_map_method("patch_similarity").dense_fn(model, pixels, classes, image_processor=PROCESSOR)
    tokens = model(pixel_values=_inputs(pixels)).last_hidden_state[:, 1:]
    cosine = F.normalize(model.visual_projection(model.vision_model.post_layernorm(tokens)), dim=-1) @ classes.T
    grid = cosine.transpose(1, 2).reshape(2, 5, 4, 4)
    expected = F.interpolate(grid, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(scores, expected, atol=1e-5)
    for method in DENSE_METHODS:
        raw = get_map_method(method).dense_fn(model, pixels, classes, image_processor=PROCESSOR).argmax(dim=1)
        display = dense_maps(model, pixels, classes, method, image_processor=PROCESSOR).argmax(dim=1)
        assert (raw != display).any(), method


def test_explanations_run_in_eval_mode_and_restore_the_mode():
    """A dropout-carrying model in train mode gives the same map twice, and is handed back in train mode."""
    config = clip_config("tiny").vision_config
    config.attention_dropout = 0.5
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection._from_config(config, attn_implementation="eager").train()
    model.vision_model.encoder.layers[0].eval()  # a mixed-mode model keeps its mix
    pixels, target = _pixels(2), F.normalize(torch.randn(2, 16), dim=-1)
    empty = F.normalize(torch.randn(16), dim=0)
    modes = [module.training for module in model.modules()]
    for method in ("simple_gradient", "gradcam", "attention", "rollout", *DENSE_METHODS):
        first, second = (
            saliency(model, pixels, target, method, image_processor=PROCESSOR, empty_prompt_embeds=empty)
            for _ in range(2)
        )
        assert torch.equal(first, second), method
        assert [module.training for module in model.modules()] == modes, method
    for _ in range(2):
        maps = dense_maps(model, pixels, target, "naclip", image_processor=PROCESSOR)
        assert [module.training for module in model.modules()] == modes
    assert torch.equal(maps, dense_maps(model, pixels, target, "naclip", image_processor=PROCESSOR))


def test_faithfulness_ties_are_broken_at_random_not_in_row_major_order():
    """A constant map ranks no pixel above another. The score is the mean of the top (or the bottom) half of the
    image: with row-major tie order deleting the top half first, the two would get AUCs 0.25 and 0.75; with a
    random order both fall linearly (AUC ≈ 0.5)."""
    pixels = torch.ones(2, 3, 32, 32)
    flat = torch.ones(2, 32, 32)
    top = faithfulness_curve(lambda x: x[:, :, :16].mean(dim=(1, 2, 3)), pixels, flat, "deletion", 16)
    bottom = faithfulness_curve(lambda x: x[:, :, 16:].mean(dim=(1, 2, 3)), pixels, flat, "deletion", 16)
    assert torch.allclose(curve_auc(top), torch.full((2,), 0.5), atol=0.02)
    assert torch.allclose(curve_auc(top), curve_auc(bottom), atol=0.02)
    linear = 1 - torch.arange(17) / 16
    assert torch.allclose(top, linear.expand(2, -1), atol=0.05)
    # Deterministic for a seed; another seed changes only the order among ties.
    assert torch.equal(deletion_ranks(flat), deletion_ranks(flat))
    assert not torch.equal(deletion_ranks(flat, seed=0), deletion_ranks(flat, seed=1))
    distinct = torch.randperm(64, generator=torch.Generator().manual_seed(0)).float().view(1, 8, 8)
    assert torch.equal(deletion_ranks(distinct, seed=0), deletion_ranks(distinct, seed=1))
    assert deletion_ranks(distinct)[0, distinct.flatten().argmax()] == 0
