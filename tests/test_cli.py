"""The recipes' argument parsing: YAML defaults, CLI overrides, loud typos; and the demo recipe end to end."""

import pytest
from transformers import CLIPModel

from hf_clip_aft import AFTConfig
from hf_clip_aft.cli import parse_args, run_command
from hf_clip_aft.commands.train import ModelArguments, ScriptArguments
from conftest import PHOTOS, TINY_CLIP

TYPES = (ScriptArguments, ModelArguments, AFTConfig)


def test_yaml_sets_defaults_and_flags_override(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model_name_or_path: {TINY_CLIP}\noutput_dir: {tmp_path}\nattack_eps: 8\nuse_peft: true\n")
    script, model, args = parse_args(TYPES, [str(config), "--attack_eps", "2", "--lora_r", "4"])
    assert script.model_name_or_path == TINY_CLIP
    assert args.attack_eps == 2 and args.output_dir == str(tmp_path)
    assert model.peft_config().r == 4


def test_unknown_yaml_keys_are_named(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("atack_eps: 8\n")
    with pytest.raises(ValueError, match=r"Unknown keys .*\['atack_eps'\]"):
        parse_args(TYPES, [str(config)])


def test_invalid_value_in_yaml_is_named(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path}\nattack_norm: l1\n")
    with pytest.raises(ValueError, match="attack_norm='l1' is invalid"):
        parse_args(TYPES, [str(config)])


def test_demo_recipe_trains_and_saves_a_loadable_clip(tmp_path, capsys):
    from pathlib import Path

    demo = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "demo.yaml"
    out = tmp_path / "demo"
    run_command("train", [str(demo), "--model_name_or_path", TINY_CLIP, "--dataset_name", PHOTOS, "--output_dir", str(out),
                "--max_steps", "3"])
    assert f'CLIPModel.from_pretrained("{out}")' in capsys.readouterr().out
    CLIPModel.from_pretrained(out)
