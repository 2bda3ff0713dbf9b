"""The command line: config files (YAML/JSON) with loud typos, flags overriding them, every command's --help, the
`hf-clip-aft` console script, and the demo recipe end to end."""

import json
import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from transformers import CLIPModel

from conftest import PHOTOS, TINY_CLIP
from hf_clip_aft import AFTConfig, cli
from hf_clip_aft.cli import COMMANDS, parse_args, run_command
from hf_clip_aft.commands.train import ModelArguments, ScriptArguments

TYPES = (ScriptArguments, ModelArguments, AFTConfig)
REPO = Path(__file__).resolve().parents[1]


def write_config(folder: Path, suffix: str, values: dict) -> Path:
    path = folder / f"c{suffix}"
    path.write_text(json.dumps(values) if suffix == ".json" else "".join(f"{k}: {v}\n" for k, v in values.items()))
    return path


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_sets_defaults_and_flags_override(tmp_path, suffix):
    values = {"model_name_or_path": TINY_CLIP, "output_dir": str(tmp_path), "attack_eps": 8, "use_peft": True}
    config = write_config(tmp_path, suffix, values)
    script, model, args = parse_args(TYPES, [str(config), "--attack_eps", "2", "--lora_r", "4"])
    assert script.model_name_or_path == TINY_CLIP
    assert args.attack_eps == 2 and args.output_dir == str(tmp_path)
    assert model.use_peft and model.peft_config().r == 4


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_unknown_config_keys_are_named(tmp_path, suffix):
    config = write_config(tmp_path, suffix, {"atack_eps": 8})
    with pytest.raises(ValueError, match=r"Unknown keys .*\['atack_eps'\]"):
        parse_args(TYPES, [str(config)])


def test_config_file_must_be_a_mapping(tmp_path):
    config = tmp_path / "c.json"
    config.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"c\.json holds a list; it must map field names to values"):
        parse_args(TYPES, [str(config)])
    with pytest.raises(FileNotFoundError, match="missing.yaml does not exist"):
        parse_args(TYPES, [str(tmp_path / "missing.yaml")])


def test_invalid_value_in_yaml_is_named(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path}\nattack_norm: l1\n")
    with pytest.raises(ValueError, match="attack_norm='l1' is invalid"):
        parse_args(TYPES, [str(config)])


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_listing_its_fields(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_command(name, ["--help"], prog=f"hf-clip-aft {name}")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"usage: hf-clip-aft {name}")
    assert cli.command_summary(name) in printed  # the command's docstring heads its help
    module = __import__(COMMANDS[name], fromlist=["ARGUMENTS"])
    for arguments in module.ARGUMENTS:
        for field in arguments.__dataclass_fields__.values():
            if field.init:
                assert f"--{field.name}" in printed, (name, field.name)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_an_example_config_that_parses(name):
    # train's configs are named for what they train; the offline demo is its example.
    config = REPO / "recipes" / "configs" / ("demo.yaml" if name == "train" else f"{name}.yaml")
    module = __import__(COMMANDS[name], fromlist=["ARGUMENTS"])
    parsed = parse_args(module.ARGUMENTS, [str(config)])
    assert len(parsed) == len(module.ARGUMENTS)


def test_console_script_lists_commands_without_importing_them(monkeypatch, capsys):
    (script,) = entry_points(group="console_scripts", name="hf-clip-aft")
    assert script.value == "hf_clip_aft.cli:main"

    def no_import(name):
        raise AssertionError(f"listing the commands imported {name}")

    monkeypatch.setattr(cli, "import_module", no_import)
    cli.main(["--help"])
    printed = capsys.readouterr().out
    for name in COMMANDS:  # one line each: the name, then the first line of its docstring
        assert re.search(rf"^  {name} +{re.escape(cli.command_summary(name))}$", printed, re.MULTILINE), name
    assert "Adversarial fine-tuning of a CLIP image encoder." in printed  # train's one-line summary


def test_console_script_refuses_an_unknown_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["trian"])
    assert exit_info.value.code == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"Unknown command 'trian'; choose one of \["):
        run_command("trian", [])


def test_demo_recipe_trains_and_saves_a_loadable_clip(tmp_path, capsys):
    demo = REPO / "recipes" / "configs" / "demo.yaml"
    out = tmp_path / "demo"
    argv = [str(demo), "--model_name_or_path", TINY_CLIP, "--dataset_name", PHOTOS, "--output_dir", str(out)]
    run_command("train", [*argv, "--max_steps", "3"])
    assert f'CLIPModel.from_pretrained("{out}")' in capsys.readouterr().out
    CLIPModel.from_pretrained(out)
