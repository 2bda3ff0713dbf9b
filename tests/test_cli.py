"""The command line: config files (YAML/JSON) with loud typos, flags overriding them, every command's --help, the
`hf-clip-aft` console script, and the demo recipe end to end."""

import json
import re
import subprocess
import sys
from importlib.metadata import entry_points, version
from importlib.util import find_spec
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
    with pytest.raises(ValueError, match=r"Unknown key 'atack_eps' \(did you mean 'attack_eps'\?\) in .*c\."):
        parse_args(TYPES, [str(config)])


def test_a_misspelt_key_or_flag_is_one_line_naming_the_closest_valid_one(tmp_path, capsys):
    config = write_config(tmp_path, ".yaml", {"output_dir": str(tmp_path), "atack_eps": 8, "lerning_rate": 1e-5})
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(config)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error == (
        f"hf-clip-aft train: error: Unknown keys 'atack_eps' (did you mean 'attack_eps'?), 'lerning_rate' (did you "
        f"mean 'learning_rate'?) in {config}; `--help` lists the valid ones.\n"
    )
    with pytest.raises(SystemExit):
        cli.main(["train", str(REPO / "recipes" / "configs" / "demo.yaml"), "--atack_eps", "3"])
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Unknown flag '--atack_eps' (did you mean '--attack_eps'?)" in error
    with pytest.raises(ValueError, match=r"Unexpected values \['stray'\] on the command line"):
        parse_args(TYPES, ["stray"])


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


def test_version(capsys):
    cli.main(["--version"])
    assert capsys.readouterr().out == f"hf-clip-aft {version('hf_clip_aft')}\n"


def test_top_level_help_and_version_import_neither_torch_nor_transformers():
    # The console script's module chain, in a fresh interpreter: what `hf-clip-aft --help` loads.
    code = (
        "import sys; from hf_clip_aft.cli import main; main(['--help']); main(['--version']); "
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'accelerate') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert done.stdout.splitlines()[-1] == "[]", done.stdout


def test_train_help_shows_the_aft_options_first(capsys):
    with pytest.raises(SystemExit):
        run_command("train", ["--help"], prog="hf-clip-aft train")
    printed = capsys.readouterr().out
    assert printed.startswith("usage: hf-clip-aft train [config.yaml|config.json] [--field value ...]\n")
    first_option = re.findall(r"^  (--\w+)", printed, re.MULTILINE)[0]
    assert first_option == "--attack_eps", first_option
    # AFT's own fields, then the script's, then the inherited TrainingArguments last.
    order = [
        printed.index(f"\n  --{name} ")
        for name in ("attack_steps", "model_name_or_path", "output_dir", "learning_rate")
    ]
    assert order == sorted(order) and printed.index("\nTrainingArguments:\n") < order[2]


def test_app_help_states_each_default_once_and_describes_no_block(capsys):
    with pytest.raises(SystemExit):
        run_command("app", ["--help"], prog="hf-clip-aft app")
    printed = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "(default: [])" not in printed and printed.count("first of each family") == 1
    assert "(default: the first of each family)." in printed
    assert "--no_block, --no-block Set block to false (the same as --block false)." in printed


@pytest.mark.skipif(find_spec("deepspeed") is None, reason="DeepSpeed is not installed (the dev extra installs it)")
def test_demo_recipe_trains_without_loading_deepspeed(tmp_path):
    # The console script, as a user runs it: DeepSpeed is installed but not launched, so it must stay unimported
    # (importing it prints "Setting accelerator to CPU" on CPU machines).
    out = tmp_path / "demo"
    argv = ["--model_name_or_path", TINY_CLIP, "--dataset_name", PHOTOS, "--output_dir", str(out), "--max_steps", "3"]
    done = subprocess.run(
        [sys.executable, "-c", "from hf_clip_aft.cli import main; main()", "train", "recipes/configs/demo.yaml", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f'CLIPModel.from_pretrained("{out}")' in done.stdout
    assert "Setting accelerator" not in done.stderr + done.stdout
    CLIPModel.from_pretrained(out)


def test_evaluate_progress_advances_within_a_batch(aft_stand_in, monkeypatch, tmp_path):
    # One batch of 2 images, 2 models × (scores + 1 method) = 4 steps: the bar, in images, advances at every step.
    from tqdm.auto import tqdm

    from hf_clip_aft.interpret import suite

    counts = []

    class Recorded(tqdm):
        def update(self, n=1):
            super().update(n)
            counts.append((self.n, self.total, self.postfix))

    monkeypatch.setattr(suite, "tqdm", Recorded)
    argv = ["--models", TINY_CLIP, aft_stand_in, "--dataset", PHOTOS, "--split", "train", "--limit", "2"]
    argv += ["--batch_size", "2", "--metrics", "sparsity", "--methods", "simple_gradient", "--output", str(tmp_path)]
    run_command("evaluate", argv)
    assert [(n, total) for n, total, _ in counts] == [(0.5, 2), (1.0, 2), (1.5, 2), (2.0, 2)]
    assert counts[1][2] == "tiny-clip, simple_gradient" and counts[3][2] == "tiny-clip-aft, simple_gradient"
