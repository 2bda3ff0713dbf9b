"""Command-line plumbing: the `hf-clip-aft <command>` entry point, its command table, and config-file parsing.

Every command is a module in `hf_clip_aft.commands` with ``ARGUMENTS`` (a tuple of dataclasses) and
``main(*args)`` (one instance per dataclass, in order). `run_command` parses a YAML/JSON file and flags into those
dataclasses and calls ``main``; ``recipes/<command>.py`` and the console script both go through it.

Importing this module loads neither torch nor transformers: ``hf-clip-aft --help`` and ``--version`` stay quick, and
a command's libraries load when it runs.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path
from typing import Any, get_type_hints

# Command name -> module path, imported only when the command runs (listing them must stay cheap).
COMMANDS: dict[str, str] = {
    "train": "hf_clip_aft.commands.train",
    "evaluate": "hf_clip_aft.commands.evaluate",
    "push": "hf_clip_aft.commands.push",
    "llava": "hf_clip_aft.commands.llava",
    "convert": "hf_clip_aft.commands.convert",
    "prepare_voc": "hf_clip_aft.commands.prepare_voc",
    "llava_explain": "hf_clip_aft.commands.llava_explain",
    "dissect": "hf_clip_aft.commands.dissect",
    "app": "hf_clip_aft.commands.app",
}

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class ConfigError(ValueError):
    """A setting that cannot be used (unknown key or flag, wrong type, invalid value); the message says which."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the command docstring's layout (its example commands) and shows each field's default, unless the help
    text already states it or the default is an empty list."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if isinstance(action, argparse._StoreFalseAction) or action.default in ([], None):
            return text
        if "default:" in text.lower() or "%(default)" in text:
            return text
        return super()._get_help_string(action)


def _is_training_arguments(dtype: type) -> bool:
    # By name, so that checking a command's dataclasses does not import transformers' Trainer.
    return any(c.__name__ == "TrainingArguments" and c.__module__.startswith("transformers") for c in dtype.__mro__)


def _trainer_fields(dtype: type) -> set[str]:
    base = next(c for c in dtype.__mro__ if c.__name__ == "TrainingArguments")
    return {f.name for f in dataclasses.fields(base)}


def _class_summary(dtype: type) -> str | None:
    """First line of the dataclass's own docstring (None for the signature dataclasses writes when there is none)."""
    doc = (dtype.__doc__ or "").strip()
    return None if not doc or doc.startswith(f"{dtype.__name__}(") else doc.splitlines()[0]


def _build_parser(dataclass_types: tuple[type, ...], **parser_kwargs: Any):
    """An `HfArgumentParser` whose help lists one titled group per dataclass. A `TrainingArguments` subclass's own
    fields (AFT's attack and loss) come first and the Trainer's inherited fields last, so that ``train --help``
    opens on what is specific to AFT."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def _add_dataclass_arguments(self, dtype: type) -> None:
            hints = get_type_hints(dtype)
            group = self.add_argument_group(dtype.__name__, _class_summary(dtype))
            inherited = _trainer_fields(dtype) if _is_training_arguments(dtype) else set()
            trainer_group = None
            if inherited:
                group.own_fields_first = True
                trainer_group = self.add_argument_group(
                    "TrainingArguments", f"transformers.TrainingArguments fields, inherited by {dtype.__name__}."
                )
                trainer_group.last = True
            for field in dataclasses.fields(dtype):
                if field.init:
                    field.type = hints[field.name]
                    self._parse_dataclass_field(trainer_group if field.name in inherited else group, field)

    parser = Parser(dataclass_types, **parser_kwargs)
    groups = parser._action_groups
    first = [g for g in groups if getattr(g, "own_fields_first", False)]
    last = [g for g in groups if getattr(g, "last", False)]
    parser._action_groups = groups[:2] + first + [g for g in groups[2:] if g not in first + last] + last
    for action in parser._actions:  # HfArgumentParser gives --no_<field> the help of --<field>
        if isinstance(action, argparse._StoreFalseAction) and action.option_strings[0].startswith("--no_"):
            action.help = f"Set {action.dest} to false (the same as --{action.dest} false)."
    return parser


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping of field names to values in a YAML (``.yaml``/``.yml``) or JSON (``.json``) config file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} holds a {type(values).__name__}; it must map field names to values (key: value).")
    return values


def _unknown_names_message(names: list[str], known: list[str], where: str, prefix: str = "") -> str:
    """``Unknown key 'atack_eps' in c.yaml (did you mean 'attack_eps'?)``: each unknown name with its closest valid
    one (difflib), on one line."""
    described = []
    for name in names:
        bare = name.split("=")[0]
        close = difflib.get_close_matches(bare.lstrip("-"), known, n=1, cutoff=0.6)
        described.append(f"{bare!r}" + (f" (did you mean '{prefix}{close[0]}'?)" if close else ""))
    noun = "key" if not prefix else "flag"
    plural = "s" if len(names) > 1 else ""
    return f"Unknown {noun}{plural} {', '.join(described)} in {where}; `--help` lists the valid ones."


def parse_args(
    dataclass_types: tuple[type, ...], argv: list[str] | None = None, **parser_kwargs: Any
) -> tuple[Any, ...]:
    """Parse ``[config.yaml|config.json] [--key value ...]``: the file sets defaults, command-line flags override them.

    An unknown key in the file or an unknown flag is a `ConfigError` naming it and the closest valid name, so that a
    typo cannot silently fall back to a default; a value of the wrong type (``attack_steps: 2.5``) is an error naming
    the field, the value and the expected type. ``parser_kwargs`` go to the `HfArgumentParser` (e.g. ``prog``,
    ``description``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(dataclass_types, **parser_kwargs)
    known = [f.name for cls in dataclass_types for f in dataclasses.fields(cls) if f.init]
    if argv and argv[0].endswith(CONFIG_SUFFIXES):
        path = argv.pop(0)
        values = read_config_file(path)
        unknown = [key for key in values if key not in known]
        if unknown:
            raise ConfigError(_unknown_names_message(unknown, known, path))
        parser.set_defaults(**values)
        # Fields without a default must still be given; the file's value counts as given.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    # Unknown flags are named before any dataclass is built (building one validates it, which can be slow or fail
    # for an unrelated reason).
    _, extra = parser.parse_known_args(argv)
    unknown_flags = [value for value in extra if value.startswith("-")]
    if unknown_flags:
        flags = [option.lstrip("-") for action in parser._actions for option in action.option_strings]
        raise ConfigError(_unknown_names_message(unknown_flags, flags, "the command line", prefix="--"))
    if extra:
        raise ConfigError(
            f"Unexpected values {extra} on the command line: a config file comes first (ending in "
            f"{', '.join(CONFIG_SUFFIXES)}), and every other value follows its --flag."
        )
    from .config import AFTConfig, check_field_types  # imported here: listing the commands must stay quick

    try:
        parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as error:  # a dataclass's own validation (e.g. AFTConfig.__post_init__)
        raise ConfigError(str(error)) from error
    for config in parsed:
        if not isinstance(config, AFTConfig):  # AFTConfig checks its own types before TrainingArguments converts them
            check_field_types(config)
    return parsed


def _command_module_path(name: str) -> str:
    if name not in COMMANDS:
        raise ValueError(f"Unknown command {name!r}; choose one of {sorted(COMMANDS)}.")
    return COMMANDS[name]


def command_summary(name: str) -> str:
    """First line of the command module's docstring, read from its source without importing it."""
    spec = find_spec(_command_module_path(name))
    docstring = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""
    return docstring.strip().splitlines()[0] if docstring.strip() else ""


def _launch_uses_deepspeed(args: tuple[Any, ...]) -> bool:
    """Whether this process runs under DeepSpeed: ``accelerate launch`` with a DeepSpeed config, or ``--deepspeed``."""
    launched = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")
    return launched or any(getattr(config, "deepspeed", None) for config in args)


@contextmanager
def _deepspeed_only_when_launched(args: tuple[Any, ...]) -> Iterator[None]:
    """Keep DeepSpeed unimported unless the launch uses it.

    accelerate's ``extract_model_from_parallel`` (run by every ``Trainer``) imports ``deepspeed`` whenever it is
    installed, only to test ``isinstance(model, DeepSpeedEngine)``; that import costs about half a second and prints
    "Setting accelerator to CPU" on CPU machines. Without a DeepSpeed launch no model is a ``DeepSpeedEngine``, so
    the test is skipped for the command's duration, and restored after it.
    """
    if _launch_uses_deepspeed(args) or find_spec("deepspeed") is None:
        yield
        return
    import accelerate.utils.other as accelerate_other

    original = accelerate_other.is_deepspeed_available
    accelerate_other.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        accelerate_other.is_deepspeed_available = original


def run_command(
    name: str, argv: list[str] | None = None, prog: str | None = None, *, exit_on_error: bool | None = None
) -> Any:
    """Parse ``argv`` (default ``sys.argv[1:]``) into the command's ``ARGUMENTS`` and return its ``main(*args)``.

    With ``exit_on_error`` (default: when ``argv`` is None, i.e. a real command line), a setting that cannot be used
    prints one line, ``<prog>: error: <what and the fix>``, and exits with status 2 instead of a traceback.
    """
    module = import_module(_command_module_path(name))
    exit_on_error = argv is None if exit_on_error is None else exit_on_error
    try:
        args = parse_args(
            module.ARGUMENTS,
            argv,
            prog=prog,
            usage="%(prog)s [config.yaml|config.json] [--field value ...]",
            description=module.__doc__,
            formatter_class=_HelpFormatter,
        )
    except (ConfigError, TypeError, FileNotFoundError) as error:
        if not exit_on_error:
            raise
        print(f"{prog or Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        sys.exit(2)
    with _deepspeed_only_when_launched(args):
        return module.main(*args)


def usage() -> str:
    """The top-level help: one line per command."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {command_summary(name)}" for name in COMMANDS]
    return "\n".join(
        [
            "usage: hf-clip-aft <command> [config.yaml|config.json] [--field value ...]",
            "       hf-clip-aft --version",
            "",
            "Adversarial fine-tuning of CLIP image encoders for visual interpretability.",
            "",
            "commands:",
            *lines,
            "",
            "`hf-clip-aft <command> --help` lists the command's fields; a config file sets them, flags override it.",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``hf-clip-aft <command> [config] [--flags]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        if not argv:
            sys.exit(2)
        return
    if argv[0] in ("-V", "--version"):
        print(f"hf-clip-aft {version('hf_clip_aft')}")
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(f"hf-clip-aft: unknown command {name!r}.{hint}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    run_command(name, rest, prog=f"hf-clip-aft {name}", exit_on_error=True)
