"""Compare CLIP models' zero-shot probabilities and maps on any image, side by side, in a local web page.

    python recipes/app.py --models openai/clip-vit-base-patch16 org/clip-aft-vit-b-16
    python recipes/app.py --models hf_clip_aft/assets/tiny-clip outputs/demo      # the offline demo
    hf-clip-aft app recipes/configs/app.yaml

Needs the app extra (``pip install "hf_clip_aft[app]"``). The models load once (base first, each a column of the
figure); the page opens at http://127.0.0.1:7860 (or the next free port) and runs until Ctrl-C. Every registered map
method is offered; `--methods` only chooses those ticked when the page opens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hf_clip_aft.app


@dataclass
class AppArguments:
    models: list[str] = field(
        default_factory=list,
        metadata={"help": "CLIPModel folders or Hub ids to compare, one column each, base model first."},
    )
    methods: list[str] = field(
        default_factory=list,
        metadata={"help": "Map methods ticked when the page opens (default: the first of each family)."},
    )
    device: str | None = field(default=None, metadata={"help": "Torch device; default: the GPU if any, else CPU."})
    host: str = field(
        default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0 serves other machines too)."}
    )
    port: int | None = field(default=None, metadata={"help": "TCP port; default: 7860 or the next free one."})
    block: bool = field(
        default=True, metadata={"help": "Serve until Ctrl-C; false returns once the page runs (tests, notebooks)."}
    )


ARGUMENTS = (AppArguments,)


def main(args: AppArguments):
    """Load the models once and serve the page; returns the running Gradio app (when ``block`` is false)."""
    if not args.models:
        raise ValueError("No models given: pass --models BASE [AFT ...] (CLIPModel folders or Hub ids).")
    return hf_clip_aft.app.serve(
        args.models, device=args.device, methods=args.methods or None, host=args.host, port=args.port, block=args.block
    )
