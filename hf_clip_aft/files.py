"""Writing and reading the library's output files: atomically, and validated on the way in and out."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temporary path)`` beside `path`, then rename it onto `path`: a reader never sees half a file.

    The temporary file keeps `path`'s suffix (writers that sniff the format from it, e.g. PIL, still work) and gets
    the usual permissions (``mkstemp`` makes it private). On any error the temporary file is removed.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, document: Any) -> None:
    """Write `document` as indented JSON to `path` atomically."""
    write_text_atomic(path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike, validate: Callable[[Any], None], default_name: str = "results.json") -> Any:
    """Read the JSON file `path` (or the `default_name` file inside the folder `path`) and `validate` it."""
    if os.path.isdir(path):
        path = os.path.join(path, default_name)
    with open(path, encoding="utf-8") as f:
        document = json.load(f)
    validate(document)
    return document
