"""Importing open_clip ViT image encoders: the converted transformers model computes the OpenAI forward pass."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPModel, CLIPProcessor

from hf_clip_aft.cli import run_command
from hf_clip_aft.convert import convert_open_clip_visual
from hf_clip_aft.model_configs import clip_config
from hf_clip_aft.release.export import validate_export

VISION = clip_config("tiny").vision_config
LN_EPS = 1e-5


def open_clip_state_dict(
    width: int = VISION.hidden_size,
    layers: int = VISION.num_hidden_layers,
    patch: int = VISION.patch_size,
    image_size: int = VISION.image_size,
    projection: int = VISION.projection_dim,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random weights in the OpenAI/open_clip ``VisionTransformer`` layout (``model.visual.state_dict()``)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, offset: float = 0.0) -> torch.Tensor:
        if device == "meta":
            return torch.empty(shape, device="meta")
        return offset + 0.1 * torch.randn(shape, generator=generator)

    state = {
        "conv1.weight": rand(width, 3, patch, patch),
        "class_embedding": rand(width),
        "positional_embedding": rand((image_size // patch) ** 2 + 1, width),
        "ln_pre.weight": rand(width, offset=1.0),
        "ln_pre.bias": rand(width),
        "ln_post.weight": rand(width, offset=1.0),
        "ln_post.bias": rand(width),
        "proj": rand(width, projection),
    }
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        state.update(
            {
                block + "ln_1.weight": rand(width, offset=1.0),
                block + "ln_1.bias": rand(width),
                block + "attn.in_proj_weight": rand(3 * width, width),
                block + "attn.in_proj_bias": rand(3 * width),
                block + "attn.out_proj.weight": rand(width, width),
                block + "attn.out_proj.bias": rand(width),
                block + "ln_2.weight": rand(width, offset=1.0),
                block + "ln_2.bias": rand(width),
                block + "mlp.c_fc.weight": rand(4 * width, width),
                block + "mlp.c_fc.bias": rand(4 * width),
                block + "mlp.c_proj.weight": rand(width, 4 * width),
                block + "mlp.c_proj.bias": rand(width),
            }
        )
    return state


def reference_forward(state: dict[str, torch.Tensor], pixel_values: torch.Tensor, heads: int) -> torch.Tensor:
    """OpenAI CLIP's ``VisionTransformer.forward``, written from its definition: projected class-token embedding."""
    width, _, patch, _ = state["conv1.weight"].shape
    x = F.conv2d(pixel_values, state["conv1.weight"], stride=patch).flatten(2).transpose(1, 2)  # (B, grid², D)
    cls = state["class_embedding"].expand(x.shape[0], 1, width)
    x = torch.cat([cls, x], dim=1) + state["positional_embedding"]
    x = F.layer_norm(x, (width,), state["ln_pre.weight"], state["ln_pre.bias"], LN_EPS)
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (width,), state[p + "ln_1.weight"], state[p + "ln_1.bias"], LN_EPS).transpose(0, 1)
        attn, _ = F.multi_head_attention_forward(
            h, h, h, width, heads,
            state[p + "attn.in_proj_weight"], state[p + "attn.in_proj_bias"],
            None, None, False, 0.0,
            state[p + "attn.out_proj.weight"], state[p + "attn.out_proj.bias"],
            training=False, need_weights=False,
        )  # fmt: skip
        x = x + attn.transpose(0, 1)
        h = F.layer_norm(x, (width,), state[p + "ln_2.weight"], state[p + "ln_2.bias"], LN_EPS)
        h = F.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
    return F.layer_norm(x[:, 0], (width,), state["ln_post.weight"], state["ln_post.bias"], LN_EPS) @ state["proj"]


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return open_clip_state_dict()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, VISION.image_size, VISION.image_size, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def expected(state, pixels) -> torch.Tensor:
    return reference_forward(state, pixels, VISION.num_attention_heads)


def image_embeds(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixels).image_embeds


@pytest.mark.parametrize("base", ["config", "model", "path"])
def test_converted_model_matches_openai_forward(state, pixels, expected, tiny_clip_path, base):
    base = {"config": clip_config("tiny"), "model": CLIPModel(clip_config("tiny")), "path": tiny_clip_path}[base]
    model = convert_open_clip_visual(state, base)
    torch.testing.assert_close(image_embeds(model, pixels), expected, atol=1e-5, rtol=1e-5)


def test_converted_model_does_not_alias_the_checkpoint(state):
    model = convert_open_clip_visual(state, clip_config("tiny"))
    with torch.no_grad():
        model.vision_model.pre_layrnorm.weight.add_(1.0)
    assert not torch.equal(model.vision_model.pre_layrnorm.weight, state["ln_pre.weight"])


def full_open_clip(state):
    # Top-level text-tower keys reuse the visual names with other shapes; they must be ignored.
    text = {"positional_embedding": torch.zeros(77, 8), "transformer.resblocks.0.ln_1.weight": torch.zeros(8)}
    return {**{f"visual.{k}": v for k, v in state.items()}, **text, "logit_scale": torch.tensor(4.6)}


CONTAINERS = {
    "pt": lambda state, path: torch.save(state, path.with_suffix(".pt")),
    "safetensors": lambda state, path: save_file(state, path.with_suffix(".safetensors")),
    "open_clip_full_model_bin": lambda state, path: torch.save(full_open_clip(state), path.with_suffix(".bin")),
    "tecoa_wrapper": lambda state, path: torch.save(
        {"vision_encoder_state_dict": state, "epoch": 9}, path.with_suffix(".pth")
    ),
    "ddp_training_checkpoint": lambda state, path: torch.save(
        {"epoch": 2, "state_dict": {f"module.visual.{k}": v for k, v in state.items()}}, path.with_suffix(".pt")
    ),
}


@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_checkpoint_containers(state, pixels, expected, tmp_path, container):
    CONTAINERS[container](state, tmp_path / "checkpoint")
    (path,) = tmp_path.iterdir()
    model = convert_open_clip_visual(path, clip_config("tiny"))
    torch.testing.assert_close(image_embeds(model, pixels), expected, atol=1e-5, rtol=1e-5)


def test_wrong_shape_names_key_shapes_and_checkpoint_architecture():
    state = open_clip_state_dict(patch=8, layers=3)
    with pytest.raises(ValueError) as error:
        convert_open_clip_visual(state, clip_config("tiny"))
    message = str(error.value)
    assert "conv1.weight has shape (32, 3, 8, 8) where the base expects (32, 3, 16, 16)" in message
    assert "the checkpoint has 3 layers, the base 2" in message
    assert "patch_size=8" in message and "num_hidden_layers=3" in message


def test_wrong_base_suggests_the_matching_checkpoint():
    # ViT-B/16 shapes on the meta device: the shape check raises before any weight is read.
    state = open_clip_state_dict(width=768, layers=12, patch=16, image_size=224, projection=512, device="meta")
    with pytest.raises(ValueError, match=r"conv1\.weight has shape \(768, 3, 16, 16\).*'openai/clip-vit-base-patch16'"):
        convert_open_clip_visual(state, clip_config("tiny"))


def test_resnet_checkpoint_is_refused():
    blocks = {1: 3, 2: 4, 3: 6, 4: 3}
    state = {"visual.conv1.weight": torch.zeros(32, 3, 3, 3), "visual.attnpool.c_proj.weight": torch.zeros(1024, 2048)}
    state |= {f"visual.layer{s}.{b}.conv1.weight": torch.zeros(1) for s, n in blocks.items() for b in range(n)}
    with pytest.raises(ValueError, match=r"no CLIP-ResNet class") as error:
        convert_open_clip_visual(state, clip_config("tiny"))
    assert "RN50: blocks per stage (3, 4, 6, 3), output dim 1024" in str(error.value)


def test_unmapped_and_missing_keys_are_refused(state):
    layer_scale = {**state, "transformer.resblocks.0.ls_1.gamma": torch.ones(32)}
    with pytest.raises(ValueError, match=r"not part of the OpenAI/open_clip ViT layout.*resblocks\.0\.ls_1\.gamma"):
        convert_open_clip_visual(layer_scale, clip_config("tiny"))
    no_projection = {k: v for k, v in state.items() if k != "proj"}
    with pytest.raises(ValueError, match=r"lacks 1 keys of the OpenAI/open_clip ViT layout: proj\."):
        convert_open_clip_visual(no_projection, clip_config("tiny"))


def test_recipe_writes_a_clip_folder_with_the_converted_vision_tower(state, pixels, expected, tiny_clip_path, tmp_path):
    torch.save(state, tmp_path / "aft_tiny.pt")
    main = partial(run_command, "convert")  # what recipes/convert.py runs
    argv = ["--checkpoint", str(tmp_path / "aft_tiny.pt"), "--base", tiny_clip_path, "--output", str(tmp_path / "out")]
    output = main(argv)
    clip, base = CLIPModel.from_pretrained(output), CLIPModel.from_pretrained(tiny_clip_path)
    with torch.no_grad():
        torch.testing.assert_close(clip.get_image_features(pixel_values=pixels).pooler_output, expected)
    for name, tensor in base.text_model.state_dict().items():
        assert torch.equal(clip.text_model.state_dict()[name], tensor), name
    CLIPProcessor.from_pretrained(output)
    # The card says where the weights came from, by file name (a card names no local path).
    card = (output / "README.md").read_text()
    assert "converted from the open_clip checkpoint `aft_tiny.pt`" in card and str(tmp_path) not in card
    validate_export(output)
    with pytest.raises(ValueError, match="exactly one of --checkpoint"):
        main(["--base", tiny_clip_path, "--output", str(tmp_path / "none")])
