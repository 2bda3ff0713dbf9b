"""Write the offline demo model shipped in ``hf_clip_aft/assets/tiny-clip``.

A randomly initialised CLIP of the ``tiny`` architecture (64×64 images, 16×16 patches, width 32, 2 layers per
tower), a byte-level BPE tokenizer with no merges, and a CLIP image processor sized for 64-pixel inputs: a real
`CLIPModel` folder that every code path of the library loads like a Hub checkpoint, with no network.

    python recipes/make_tiny_clip.py --output hf_clip_aft/assets/tiny-clip
"""

from dataclasses import dataclass, field

import torch
from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from hf_clip_aft.cli import parse_args
from hf_clip_aft.data import clip_image_processor
from hf_clip_aft.model_configs import TINY_VOCAB_SIZE, clip_config


@dataclass
class TinyClipArguments:
    output: str = field(default="hf_clip_aft/assets/tiny-clip", metadata={"help": "Folder to write the model to."})
    seed: int = field(default=0, metadata={"help": "Seed of the random initialisation."})


def tiny_tokenizer() -> CLIPTokenizer:
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 2 * len(symbols), "<|endoftext|>": 2 * len(symbols) + 1})
    assert len(vocab) == TINY_VOCAB_SIZE
    # No merges: every word is spelt byte by byte, which is all a randomly initialised text tower needs.
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def main(args: TinyClipArguments) -> None:
    torch.manual_seed(args.seed)
    config = clip_config("tiny")
    model = CLIPModel(config)
    processor = CLIPProcessor(
        image_processor=clip_image_processor(config.vision_config.image_size), tokenizer=tiny_tokenizer()
    )
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main(*parse_args((TinyClipArguments,)))
