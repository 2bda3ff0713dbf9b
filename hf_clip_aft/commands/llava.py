"""Put an AFT CLIP vision tower into a LLaVA (or LLaVA-NeXT) checkpoint, save it, optionally push it.

    python recipes/llava.py --llava llava-hf/llava-1.5-7b-hf --vision org/clip-aft-vit-l-14-336 \\
        --output llava-1.5-7b-aft [--push_to_hub org/llava-1.5-7b-aft] [--private] [--dry_run]
    hf-clip-aft llava recipes/configs/llava.yaml

The architectures are checked from the configs before the LLaVA is loaded (a ViT-B/16 cannot replace the
ViT-L/14-336 tower of LLaVA-1.5). The LLaVA is loaded with `from_pretrained`, its vision tower's weights are
replaced in memory, and the result is saved with its original processor and on-disk layout, so that
``LlavaForConditionalGeneration.from_pretrained(output)`` works with stock transformers. The saved folder is checked
(the tower weights on disk are the fine-tuned ones) before any upload, which is one commit of that folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from transformers import AutoConfig, AutoProcessor

from hf_clip_aft.release.card import render_llava_card
from hf_clip_aft.release.export import CARD_NAME
from hf_clip_aft.release.hub import check_push_access, format_listing, push_folder, upload_listing
from hf_clip_aft.release.llava import (
    LLAVA_CLASSES,
    check_llava_vision_fit,
    save_llava,
    swap_llava_vision_tower,
    validate_llava_folder,
    vision_tower_state,
)


@dataclass
class LlavaArguments:
    llava: str = field(metadata={"help": "LLaVA / LLaVA-NeXT checkpoint (transformers format), e.g. llava-hf/..."})
    vision: str = field(metadata={"help": "The AFT CLIP (an exported folder or its Hub repo)."})
    output: str = field(metadata={"help": "Folder to write the new LLaVA to."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Repository to push the result to."})
    private: bool = field(default=False, metadata={"help": "Create the repository private (if it does not exist)."})
    dry_run: bool = field(default=False, metadata={"help": "With --push_to_hub: validate and list, upload nothing."})
    dtype: str = field(default="auto", metadata={"help": "dtype to load the LLaVA in (auto: the checkpoint's)."})
    license: str | None = field(default=None, metadata={"help": "License; by default the LLaVA's."})


ARGUMENTS = (LlavaArguments,)


def main(args: LlavaArguments) -> None:
    """Swap the tower, save and validate the LLaVA in ``args.output``, then push it if asked."""
    llava_config = AutoConfig.from_pretrained(args.llava)
    tower_config, tower_state = vision_tower_state(args.vision)
    check_llava_vision_fit(llava_config, tower_config)  # before loading gigabytes
    architecture = next((a for a in llava_config.architectures or [] if a in {c.__name__ for c in LLAVA_CLASSES}), None)
    if architecture is None:
        raise ValueError(f"{args.llava} is a {llava_config.architectures}, not a LLaVA / LLaVA-NeXT checkpoint.")
    repo_id = args.push_to_hub
    if repo_id and not args.dry_run:
        repo_id = check_push_access(repo_id, private=args.private)

    model_class = next(c for c in LLAVA_CLASSES if c.__name__ == architecture)
    model = model_class.from_pretrained(args.llava, dtype=args.dtype)
    swap_llava_vision_tower(model, args.vision)
    save_llava(model, args.output, processor=AutoProcessor.from_pretrained(args.llava))
    card = render_llava_card(
        args.llava,
        args.vision,
        repo_id=repo_id,
        license=args.license,
        vision_feature_layer=model.config.vision_feature_layer,
    )
    card.save(Path(args.output) / CARD_NAME)
    validate = partial(validate_llava_folder, expected=tower_state)
    validate(args.output)
    print(f"Wrote {args.output}")
    if repo_id:
        commit = push_folder(args.output, repo_id, validate=validate, private=args.private, dry_run=args.dry_run)
        if commit is None:
            print(f"Would upload to {repo_id}:\n{format_listing(upload_listing(args.output))}")
        else:
            print(f"Pushed {args.output} to {commit.commit_url}")
