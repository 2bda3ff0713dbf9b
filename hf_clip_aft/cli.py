"""Command-line plumbing: the `hf-clip-aft <command>` entry point, its command table, and config-file parsing.

Every command is a module in `hf_clip_aft.commands` with ``ARGUMENTS`` (a tuple of dataclasses) and
``main(*args)`` (one instance per dataclass, in order). `run_command` parses a YAML/JSON file and flags into those
dataclasses and calls ``main``; ``recipes/<command>.py`` and the console script both go through it.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import fields
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

# Command name -> module path, imported only when the command runs (listing them must stay cheap).
COMMANDS: dict[str, str] = {
    "train": "hf_clip_aft.commands.train",
    "evaluate": "hf_clip_aft.commands.evaluate",
    "push": "hf_clip_aft.commands.push",
    "llava": "hf_clip_aft.commands.llava",
    "convert": "hf_clip_aft.commands.convert",
    "llava_explain": "hf_clip_aft.commands.llava_explain",
    "dissect": "hf_clip_aft.commands.dissect",
    "app": "hf_clip_aft.commands.app",
}

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the command docstring's layout (its example commands) and shows each field's default."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping of field names to values in a YAML (``.yaml``/``.yml``) or JSON (``.json``) config file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    text = path.read_text()
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a {type(values).__name__}; it must map field names to values (key: value).")
    return values


def parse_args(
    dataclass_types: tuple[type, ...], argv: list[str] | None = None, **parser_kwargs: Any
) -> tuple[Any, ...]:
    """Parse ``[config.yaml|config.json] [--key value ...]``: the file sets defaults, command-line flags override them.

    Unknown keys in the file are an error that names them, so a typo cannot silently fall back to a default, and a
    value of the wrong type (``attack_steps: 2.5``) is an error naming the field, the value and the expected type.
    ``parser_kwargs`` go to the `HfArgumentParser` (e.g. ``prog``, ``description``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types, **parser_kwargs)
    if argv and argv[0].endswith(CONFIG_SUFFIXES):
        path = argv.pop(0)
        values = read_config_file(path)
        known = {f.name for cls in dataclass_types for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown keys in {path}: {unknown}. Check the spelling against `--help`.")
        parser.set_defaults(**values)
        # Fields without a default must still be given; the file's value counts as given.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    parsed = parser.parse_args_into_dataclasses(args=argv)
    from .config import AFTConfig, check_field_types  # imported here: listing the commands must stay quick

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


def run_command(name: str, argv: list[str] | None = None, prog: str | None = None) -> Any:
    """Parse ``argv`` (default ``sys.argv[1:]``) into the command's ``ARGUMENTS`` and return its ``main(*args)``."""
    module = import_module(_command_module_path(name))
    args = parse_args(module.ARGUMENTS, argv, prog=prog, description=module.__doc__, formatter_class=_HelpFormatter)
    return module.main(*args)


def usage() -> str:
    """The top-level help: one line per command."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {command_summary(name)}" for name in COMMANDS]
    return "\n".join(
        [
            "usage: hf-clip-aft <command> [config.yaml|config.json] [--field value ...]",
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
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"hf-clip-aft: unknown command {name!r}.\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    run_command(name, rest, prog=f"hf-clip-aft {name}")
