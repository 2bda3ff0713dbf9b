"""Publish an AFT checkpoint on the Hub as a drop-in `CLIPModel` repository, with its model card.

    python recipes/push.py --checkpoint out/ --repo_id org/clip-aft-vit-b-16 [--private] [--dry_run]
        [--eval_results eval/results.json] [--base_model openai/clip-vit-base-patch16] [--space org/clip-aft-demo]
    hf-clip-aft push recipes/configs/push.yaml

`--checkpoint` is a training output folder (the export of the trainer's final save) or a ``checkpoint-N`` folder
(a vision-only or LoRA/DoRA checkpoint: these need `--base_model` unless the adapter names its base). A clean folder
is written to `--output_dir` (default ``<checkpoint>-hub``): the merged `CLIPModel`, processor, adapter (if any),
README.md and ``training_record.json``. It is validated (it must load as `CLIPModel`, `CLIPVisionModel` and
`CLIPVisionModelWithProjection` and name no local path) and uploaded whole in one commit; `--dry_run` stops before
the upload (no token needed) and prints what would be uploaded. The token comes from ``hf auth login`` or
``HF_TOKEN``, and is never written anywhere. `--space` also writes ``<output_dir>-space`` (the comparison page of
the base model and this one, see `hf_clip_aft.release.space`) and pushes it as a Gradio Space after the model; the
model card links it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hf_clip_aft.release import CardOptions, TrainingRecord, export_checkpoint, write_card
from hf_clip_aft.release.hub import check_push_access, check_repo_id, format_listing, push_folder, upload_listing
from hf_clip_aft.release.space import push_space, space_models, write_space


@dataclass
class PushArguments:
    checkpoint: str = field(metadata={"help": "Training output folder, or a checkpoint-N folder."})
    repo_id: str = field(metadata={"help": "Target model repository, e.g. org/clip-aft-vit-b-16."})
    private: bool = field(default=False, metadata={"help": "Create the repository private (if it does not exist)."})
    dry_run: bool = field(default=False, metadata={"help": "Write and validate the folder; upload nothing."})
    eval_results: str | None = field(
        default=None, metadata={"help": "JSON written by `hf-clip-aft evaluate`; its results go into the card."}
    )
    eval_model: str | None = field(
        default=None, metadata={"help": "This model's name in --eval_results, if it holds models besides the base."}
    )
    base_model: str | None = field(
        default=None, metadata={"help": "The CLIP that was fine-tuned (needed for a checkpoint-N folder)."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "Training dataset, if the checkpoint lacks it."})
    saliency_figure: str | None = field(
        default=None,
        metadata={"help": "Saliency comparison image for the card (default: saliency_grid.png beside --eval_results)."},
    )
    license: str | None = field(default=None, metadata={"help": "License; by default the base model's."})
    output_dir: str | None = field(default=None, metadata={"help": "Folder to upload (default: <checkpoint>-hub)."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (default: the main branch)."})
    commit_message: str = field(default="Upload AFT CLIP model", metadata={"help": "Commit message."})
    space: str | None = field(
        default=None,
        metadata={"help": "Also publish the comparison page (base vs this model) as this Gradio Space, e.g. org/demo."},
    )


ARGUMENTS = (PushArguments,)


def main(args: PushArguments) -> None:
    """Export, card, validate and upload (or, with ``dry_run``, list what would be uploaded)."""
    # The ids are checked before anything is written (a path given as --repo_id must not become a folder name).
    check_repo_id(args.repo_id, "--repo_id")
    if args.space is not None:
        check_repo_id(args.space, "--space", namespace=True)
    # Access is checked next: a missing token should not cost an export.
    repo_id = args.repo_id if args.dry_run else check_push_access(args.repo_id, private=args.private)
    output_dir = Path(args.output_dir or f"{args.checkpoint.rstrip('/')}-hub")
    record = (TrainingRecord.load(args.checkpoint) or TrainingRecord()).with_sources(
        base_model=args.base_model, dataset_name=args.dataset_name
    )
    export_checkpoint(args.checkpoint, output_dir, base_model=args.base_model, record=record)
    options = CardOptions(
        repo_id=repo_id,
        license=args.license,
        eval_model=args.eval_model,
        saliency_figure=args.saliency_figure,
        space_id=args.space,
    )
    write_card(output_dir, record, args.eval_results, options)
    if args.space:  # written before any upload, so that a folder that cannot be written stops the push
        base = record.base_model if record.base_model_on_hub else args.base_model  # a local base is left out
        space_dir = write_space(f"{output_dir}-space", args.space, space_models([base, repo_id]))
    commit = push_folder(
        output_dir,
        repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        dry_run=args.dry_run,
    )
    if commit is None:
        print(f"Validated {output_dir}; would upload to {repo_id}:\n{format_listing(upload_listing(output_dir))}")
    else:
        print(f"Pushed {output_dir} to {commit.commit_url}")
    if args.space:
        # The Space loads the models by Hub id, so it goes up after the model.
        if push_space(space_dir, args.space, private=args.private, dry_run=args.dry_run) is None:
            print(f"Would upload to the Space {args.space}:\n{format_listing(upload_listing(space_dir))}")
        else:
            print(f"Pushed {space_dir} to the Space https://huggingface.co/spaces/{args.space}")
