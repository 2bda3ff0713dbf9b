"""Hub publishing: check write access before training, push a validated folder in one commit.

The folder pushed is exactly the one validated here (it loads back with plain transformers, holds no training
state, pickled weights, local path or token, and its model card parses), uploaded whole with one `upload_folder`
commit. `PreTrainedModel.push_to_hub` is never used: it would replace our model card with its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open

try:  # the HTTP client under huggingface_hub: httpx2 from its 2.x, httpx before
    from httpx2 import HTTPError as _HubTransportError
except ImportError:
    from httpx import HTTPError as _HubTransportError

from .card import check_card
from .export import validate_export

logger = logging.getLogger(__name__)

_LOGIN_FIX = "log in with `hf auth login` (a token with write access) or set the HF_TOKEN environment variable"
_NETWORK_FIX = (
    "check the network connection and any proxy (HTTPS_PROXY); HF_HUB_OFFLINE=1 must not be set for a push. To "
    "train offline, drop push_to_hub and publish the output folder later with `hf-clip-aft push`"
)


def check_model_source(name: str | os.PathLike) -> None:
    """Before loading a model by name: `name` must be an existing folder with readable safetensors weights, or a
    Hub id (``"namespace/name"``). Raises FileNotFoundError or ValueError that names the problem and the fix (where
    transformers would say "Repo id must be in the form ..." for a mistyped local path, or fail deep in a load)."""
    path = Path(name)
    if path.is_file():
        raise ValueError(
            f"{str(name)!r} is a file; a model is a folder (config.json and model.safetensors, as save_pretrained "
            "writes) or a Hub id. To use an open_clip checkpoint file, convert it first: `hf-clip-aft convert`."
        )
    if path.is_dir():
        for weights in sorted(path.glob("*.safetensors")):
            try:
                with safe_open(weights, framework="pt"):
                    pass
            except (SafetensorError, OSError) as err:
                raise ValueError(
                    f"{weights} is not a readable safetensors file ({err}): it is damaged or incomplete (an "
                    "interrupted download or copy?). Download or export the model again."
                ) from None
        return
    try:
        validate_repo_id(str(name))
    except HFValidationError:
        raise FileNotFoundError(
            f"No model folder at {str(name)!r} (nothing exists at that path), and it is not a Hub id of the form "
            "'namespace/name' either: check the path, or give a Hub id such as 'openai/clip-vit-base-patch16'."
        ) from None


def check_repo_id(repo_id: str, argument: str = "repo_id", *, namespace: bool = False) -> str:
    """`repo_id` unchanged if it is a Hub repository id by huggingface_hub's rules (``validate_repo_id``: ``name``
    or ``namespace/name``, letters, digits, ``-``, ``_`` and ``.``, no ``--`` or ``..``, at most 96 characters per
    part, no ``.git`` ending), and has a namespace when `namespace` is set.

    Raises:
        ValueError: naming `argument`, the value and the rule, before anything is written or sent.
    """
    try:
        validate_repo_id(repo_id)
        if namespace and "/" not in repo_id:
            raise HFValidationError("it has no namespace")
    except HFValidationError as err:
        form = "'namespace/name'" if namespace else "'name' or 'namespace/name'"
        raise ValueError(
            f"{argument}={repo_id!r} is not a Hub repository id ({err}). Give {form}, e.g. org/clip-aft-vit-b-16: "
            "letters, digits, '-', '_' and '.', not a path."
        ) from None
    return repo_id


def check_push_access(repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Fail fast, before a long run, unless the token can write to `repo_id`; create the repo if it is missing.

    Args:
        repo_id: ``"namespace/name"``, or ``"name"`` for the token owner's namespace.
        token: a Hub token; by default the logged-in one (``hf auth login``) or ``HF_TOKEN``.
        private: visibility if the repo gets created (an existing repo keeps its own).

    Returns:
        The full repo id (``"namespace/name"``).

    Raises:
        PermissionError: no token, a rejected token, or no write access to `repo_id`; the message says how to fix it.
        ConnectionError: the Hub cannot be reached (offline, a proxy, ``HF_HUB_OFFLINE=1``); the message says so.
        ValueError: `repo_id` is not a Hub repository id (:func:`check_repo_id`).
    """
    check_repo_id(repo_id)
    api = HfApi(token=token)
    try:
        user = api.whoami()["name"]
    except LocalTokenNotFoundError:
        raise PermissionError(f"Cannot push to {repo_id!r}: no Hugging Face token found; {_LOGIN_FIX}.") from None
    except HfHubHTTPError as err:
        raise PermissionError(f"Cannot push to {repo_id!r}: the token was rejected ({err}); {_LOGIN_FIX}.") from err
    except (_HubTransportError, ConnectionError, TimeoutError) as err:
        raise ConnectionError(
            f"Cannot push to {repo_id!r}: the Hugging Face Hub ({api.endpoint}) cannot be reached "
            f"({type(err).__name__}: {err}); {_NETWORK_FIX}."
        ) from None
    try:
        full_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        api.auth_check(full_id, write=True)
    except HfHubHTTPError as err:
        raise PermissionError(
            f"{user} cannot write to the model repo {repo_id!r} ({err}). Use a token with write access to it "
            f"({_LOGIN_FIX}); for an organisation's repo, ask its admins for write rights, or push to your own "
            "namespace."
        ) from err
    return full_id


def upload_listing(folder: str | Path) -> list[tuple[str, int]]:
    """``(path inside the repo, size in bytes)`` of every file `upload_folder` would send from `folder`."""
    folder = Path(folder)
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def format_listing(listing: list[tuple[str, int]]) -> str:
    """The listing as aligned lines of human-readable sizes and paths, with the total."""

    def size(n: float) -> str:
        for unit in ("B", "KiB", "MiB", "GiB"):
            if n < 1024 or unit == "GiB":
                return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
            n /= 1024

    lines = [f"{size(n):>10}  {name}" for name, n in listing]
    return "\n".join([*lines, f"{size(sum(n for _, n in listing)):>10}  total ({len(listing)} files)"])


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    validate: Callable[[Path], None] = validate_export,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload AFT model",
    dry_run: bool = False,
    run_as_future: bool = False,
) -> CommitInfo | Future | None:
    """Validate `folder`, then upload it whole to `repo_id` in one commit.

    Args:
        folder: the folder to publish (an export with its card, see :func:`~hf_clip_aft.release.card.write_card`).
        repo_id: the target model repo; created if missing (``exist_ok``).
        validate: raises ValueError if the folder must not be published; by default the drop-in CLIP checks of
            :func:`~hf_clip_aft.release.export.validate_export`. The model card is always checked too.
        token: a Hub token; by default the logged-in one or ``HF_TOKEN``. It is never written anywhere.
        private: visibility if the repo gets created.
        revision: the branch to commit to (created if missing); the default branch by default.
        commit_message: the commit's message.
        dry_run: validate and log what would be uploaded; create no repo and upload nothing.
        run_as_future: return a `Future` of the commit instead of waiting for it.

    Returns:
        The commit (or its `Future`), or None on a dry run.
    """
    folder = Path(folder)
    validate(folder)
    check_card(folder)
    listing = upload_listing(folder)
    action = "Would upload" if dry_run else "Uploading"
    logger.info("%s %s to %s:\n%s", action, folder, repo_id, format_listing(listing))
    if dry_run:
        return None
    api = HfApi(token=token)
    full_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None:
        api.create_branch(full_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=full_id,
        folder_path=folder,
        commit_message=commit_message,
        revision=revision,
        run_as_future=run_as_future,
    )


def push_checkpoint(
    checkpoint_folder: str | Path,
    repo_id: str,
    path_in_repo: str,
    *,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Training checkpoint",
) -> Future:
    """Upload a resumable training checkpoint into the sub-folder `path_in_repo` of `repo_id`, in the background.

    Never at the repo root: a checkpoint holds a bare vision tower (or an adapter) and optimiser state, which must
    not replace the drop-in `CLIPModel` there. Returns the upload's `Future`.
    """
    if not path_in_repo.strip("/"):
        raise ValueError("path_in_repo must name a sub-folder (e.g. 'last-checkpoint'), not the repo root.")
    return HfApi(token=token).upload_folder(
        repo_id=repo_id,
        folder_path=checkpoint_folder,
        path_in_repo=path_in_repo,
        commit_message=commit_message,
        revision=revision,
        run_as_future=True,
    )
