"""Import an open_clip-format robust CLIP image encoder (AFT, FARE, TeCoA) as a transformers `CLIPModel` folder.

The vision tower comes from the open_clip checkpoint, the text tower and processor from `--base`, the transformers
port of the CLIP the checkpoint was fine-tuned from:

    python recipes/convert.py --checkpoint aft_vit_b16.pt --base openai/clip-vit-base-patch16 --output out/aft-vit-b16
    python recipes/convert.py --hub_checkpoint chs20/fare2-clip --base openai/clip-vit-large-patch14 --output out/fare2
    hf-clip-aft convert recipes/configs/convert.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError

from hf_clip_aft import TrainingRecord, convert_open_clip_visual, export_clip, write_card

# The weight files open_clip reads from a Hub repo; it prefers the safetensors one.
OPEN_CLIP_SAFETENSORS, OPEN_CLIP_BIN = "open_clip_model.safetensors", "open_clip_pytorch_model.bin"


@dataclass
class ConvertArguments:
    base: str = field(metadata={"help": "transformers CLIP checkpoint (Hub id or path) with the same architecture."})
    output: str = field(metadata={"help": "Folder to write the CLIPModel, its processor and tokenizer to."})
    checkpoint: str | None = field(
        default=None, metadata={"help": "Local open_clip image-encoder checkpoint (.pt, .pth, .bin, .safetensors)."}
    )
    hub_checkpoint: str | None = field(
        default=None,
        metadata={"help": "Hub repo of an open_clip model (e.g. chs20/fare2-clip), instead of --checkpoint."},
    )
    hub_filename: str | None = field(
        default=None,
        metadata={"help": f"File in --hub_checkpoint (default {OPEN_CLIP_SAFETENSORS}, else {OPEN_CLIP_BIN})."},
    )


ARGUMENTS = (ConvertArguments,)


def download_open_clip_checkpoint(repo_id: str, filename: str | None = None) -> str:
    """Local path of an open_clip model's weight file on the Hub (downloaded into the Hub cache)."""
    if filename is not None:
        return hf_hub_download(repo_id, filename)
    try:
        return hf_hub_download(repo_id, OPEN_CLIP_SAFETENSORS)
    except EntryNotFoundError:  # older uploads hold only the pickled weights
        return hf_hub_download(repo_id, OPEN_CLIP_BIN)


def main(args: ConvertArguments) -> Path:
    """Convert the checkpoint and write the `CLIPModel` folder; returns its path."""
    if (args.checkpoint is None) == (args.hub_checkpoint is None):
        raise ValueError("Give exactly one of --checkpoint (a local file) and --hub_checkpoint (a Hub repo id).")
    path = args.checkpoint or download_open_clip_checkpoint(args.hub_checkpoint, args.hub_filename)
    vision = convert_open_clip_visual(path, args.base)
    source = path if args.checkpoint else f"{args.hub_checkpoint}/{Path(path).name}"
    record = TrainingRecord.from_config(None, base_model=args.base, weights_source=source)
    output = export_clip(vision, args.base, args.output, record=record)
    write_card(output, record)
    print(f'Wrote {output}. Load it with plain transformers: CLIPModel.from_pretrained("{output}")')
    return output
