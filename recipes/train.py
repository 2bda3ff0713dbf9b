"""Adversarial fine-tuning of a CLIP image encoder.

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/train.py recipes/configs/vit-b-16.yaml
    python recipes/train.py recipes/configs/demo.yaml            # offline demo on the CPU
    python recipes/train.py recipes/configs/vit-b-16.yaml --attack_eps 2 --output_dir out/eps2

A YAML file gives the defaults; any `--flag` overrides it (`--help` lists them all).
"""

from hf_clip_aft import AFTConfig, AFTTrainer
from hf_clip_aft.cli import ModelArguments, ScriptArguments, parse_args
from hf_clip_aft.data import load_image_dataset


def main(argv: list[str] | None = None) -> None:
    script_args, model_args, training_args = parse_args((ScriptArguments, ModelArguments, AFTConfig), argv)
    dataset = load_image_dataset(
        script_args.dataset_name, script_args.dataset_config, script_args.dataset_split, script_args.streaming
    )
    trainer = AFTTrainer(
        model=script_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset,
        peft_config=model_args.peft_config(),
        image_column=script_args.image_column,
        label_column=script_args.label_column,
        dataset_name=script_args.dataset_name,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if trainer.is_world_process_zero():
        out = training_args.output_dir
        print(f"\nSaved the fine-tuned CLIP to {out}. Load it with plain transformers:")
        print(f'    from transformers import CLIPModel\n    model = CLIPModel.from_pretrained("{out}")')


if __name__ == "__main__":
    main()
