"""A tiny LLaVA built from configs, for offline tests: random weights, the shipped tiny CLIP's tower shape."""

from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaProcessor,
)

from hf_clip_aft.model_configs import clip_config

IMAGE_TOKEN = 127
NUM_PATCHES = (64 // 16) ** 2  # the tiny tower's 64-pixel images in 16-pixel patches


def tiny_llava_config(vision_config=None, cls=LlavaConfig, vocab_size=128, image_token=IMAGE_TOKEN):
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    vision = vision_config or clip_config("tiny").vision_config
    extra = {"image_grid_pinpoints": [[64, 64]]} if cls is LlavaNextConfig else {"image_seq_length": NUM_PATCHES}
    return cls(vision_config=vision, text_config=text, image_token_index=image_token, **extra)


def tiny_llava_with_processor(
    clip_path: str,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random tiny LLaVA and a processor whose tokenizer (the tiny CLIP's, plus ``<image>``) matches its
    vocabulary and image token, so that prompts go through the real processor."""
    tokenizer = AutoTokenizer.from_pretrained(clip_path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil.from_pretrained(clip_path), tokenizer=tokenizer, patch_size=16,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,  # CLS, as llava-hf processors
    )  # fmt: skip
    config = tiny_llava_config(vocab_size=len(tokenizer), image_token=processor.image_token_id)
    return LlavaForConditionalGeneration(config).eval(), processor
