"""Public-name rules: what a saved file or a card may call a model or dataset (a Hub id, never a local path)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def is_local_path(name: str | os.PathLike) -> bool:
    """Whether `name` is a local path rather than a Hub id (absolute, home-relative, dotted, or existing here)."""
    name = str(name)
    return os.path.isabs(name) or name.startswith(("~", "./", "../", ".\\", "..\\")) or os.path.exists(name)


def hub_id(source: Any) -> str | None:
    """The Hub id of a model source (a string or a model's ``name_or_path``), or None when it is a local path."""
    name = source if isinstance(source, str) else getattr(getattr(source, "config", None), "_name_or_path", None)
    return name if name and not is_local_path(name) else None


def on_hub(name: str | None) -> bool:
    """Whether `name` is a Hub id (not empty and not a local path)."""
    return bool(name) and hub_id(name) is not None


def public_name(name: str | None) -> str | None:
    """`name` when it is a Hub id; a local path's last component otherwise (a card names no local path)."""
    if not name:
        return None
    return Path(str(name).rstrip("/\\")).name if is_local_path(name) else str(name)
