"""Where a pretrained model or tokenizer comes from, and the driver's early check that it is there.

A `name_or_path` is a local directory when it exists as a path (relative to the directory the
command runs in) or is written as one (`./`, `../`, `/`, `~`); anything else is a Hugging Face hub
id, handed to transformers as is: it resolves ids online, or from the local cache (`HF_HUB_CACHE`,
`HF_HOME`) with `HF_HUB_OFFLINE=1`. Relative directories become absolute in the driver, before the
recipe is shipped to workers that may run elsewhere.

The check reads config and tokenizer files only, never weights, so a missing, gated or mistyped
model fails with exit code 2 before Ray starts, instead of on every worker after it. An
unreachable hub is probed once with a short timeout: without the probe, transformers retries each
request five times (56 s for one tokenizer) before it falls back to the cache.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

from launcher.errors import RecipeError

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "on", "yes", "true"}
_unreachable = False
"""Set when this process found the hub unreachable and went offline (for the messages)."""


def is_local(name: str) -> bool:
    """Whether `name_or_path` names a local directory rather than a hub id."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def local_path(name: str) -> Path:
    """The absolute path of a local `name_or_path`; relative ones against the current directory."""
    return Path(os.path.abspath(os.path.expanduser(name)))


def source(name: str) -> str:
    """What to hand transformers: the absolute directory of a local name, a hub id as it is."""
    return str(local_path(name)) if is_local(name) else name


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set: read at call time, unlike huggingface_hub's
    constant, because the driver sets it itself when the hub is unreachable."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One HEAD request to the hub without retries. It runs in a thread because name resolution
    can block longer than any socket timeout; any HTTP answer counts as reachable."""
    from huggingface_hub.utils import get_session

    answered: list[bool] = []

    def probe() -> None:
        try:
            get_session().head(hub_endpoint(), timeout=timeout)
            answered.append(True)
        except Exception:  # noqa: BLE001  (DNS, refused, timeout, proxy: all mean unreachable)
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(answered and answered[0])


def resolve_local_paths(recipe: Any) -> None:
    """Make relative model and tokenizer directories absolute (in place), as data paths are
    resolved: against the directory the command runs in. Hub ids are left as they are."""
    for section, key in ((recipe.model, "model.name_or_path"), (recipe.tokenizer, "tokenizer.name_or_path")):
        name = section.name_or_path
        if not name or not is_local(name):
            continue
        path = local_path(name)
        if not path.is_dir():
            raise RecipeError(key, _no_such_directory(name, path))
        if str(path) != name:  # an absolute path stays as it is: it may carry an ${oc.env:...} mark
            section.name_or_path = str(path)


def _no_such_directory(name: str, path: Path) -> str:
    what = "is not a directory" if path.exists() else "not found"
    return (
        f"local directory {name} {what} (resolved to {path}): fix the path (relative paths are "
        f"resolved against the directory the command runs in, {Path.cwd()}), or name a hub id "
        "like org/model"
    )


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def explain(name: str, exc: BaseException, *, local_only: bool, what: str = "model") -> str:
    """Why transformers could not load `name` (the exception it raised), and the fix, in one line."""
    from huggingface_hub import errors as hub

    chain = _chain(exc)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if any(isinstance(e, hub.GatedRepoError) for e in chain):
        return (
            f"{name} is a gated repository: accept its terms on {hub_endpoint()}/{name}, then set "
            "HF_TOKEN to a token of an account with access (`hf auth login` works too)"
        )
    if any(isinstance(e, hub.RepositoryNotFoundError) for e in chain):
        return (
            f"{name} is not a local directory and not a repository on {hub_endpoint()}: check the "
            "id; for a private repository set HF_TOKEN"
        )
    if "trust_remote_code" in str(exc) or "contains custom code" in str(exc):
        return (
            f"{name} ships its own code for its {what}: set model.trust_remote_code=true if you "
            "trust it, or choose one that transformers supports natively"
        )
    if is_local(name):
        return (
            f"cannot load the {what} in {name} ({first}): point it at a directory written by "
            "save_pretrained"
        )
    not_cached = (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled)
    if local_only or any(isinstance(e, not_cached) for e in chain):
        why = "HF_HUB_OFFLINE is set"
        if _unreachable or not offline():
            why = f"the hub ({hub_endpoint()}) is unreachable from here"
        return (
            f"{name} not found locally or in the Hugging Face cache ({hub_cache()}), and {why}: "
            f"check the id, run `hf download {name}` where the hub is reachable (into the cache "
            "HF_HUB_CACHE or HF_HOME points at), or unset HF_HUB_OFFLINE"
        )
    return f"cannot load the {what} {name} ({first})"


def load_config(name: str, *, trust_remote_code: bool, key: str = "model.name_or_path") -> Any:
    """transformers' config for a local directory or hub id (config.json only, no weights)."""
    from transformers import AutoConfig

    if is_local(name) and not local_path(name).is_dir():
        raise RecipeError(key, _no_such_directory(name, local_path(name)))
    local_only = offline() and not is_local(name)
    try:
        return AutoConfig.from_pretrained(
            source(name), trust_remote_code=trust_remote_code, local_files_only=local_only
        )
    except (OSError, ValueError) as e:
        raise RecipeError(key, explain(name, e, local_only=local_only)) from None


def _hub_names(recipe: Any) -> list[str]:
    names = [recipe.model.name_or_path]
    if not recipe.tokenizer.builtin:
        names.append(recipe.tokenizer.name_or_path)
    return [n for n in names if n and not is_local(n)]


def go_offline_if_unreachable(recipe: Any) -> str | None:
    """When the recipe names hub ids but the hub cannot be reached, switch this process and the
    workers it starts (they inherit the environment) to the local cache: transformers would
    otherwise retry each request five times (56 s for one tokenizer). Returns a note for the user,
    or None."""
    global _unreachable
    if offline() or not _hub_names(recipe) or hub_reachable():
        return None
    _unreachable = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    return (
        f"the Hugging Face hub ({hub_endpoint()}) is unreachable from here: using the local cache "
        f"({hub_cache()}) only, as with HF_HUB_OFFLINE=1"
    )


def check_model(recipe: Any) -> Any | None:
    """The driver's check before Ray starts: the model's config resolves (local directory,
    cache or hub). Returns the transformers config, or None for an inline architecture."""
    m = recipe.model
    if not m.name_or_path:
        return None
    return load_config(m.name_or_path, trust_remote_code=m.trust_remote_code)


def check_for_submit(recipe: Any) -> str | None:
    """`launcher submit`'s check: model config and tokenizer resolve, where this machine can tell.
    A definite answer that the model is missing, gated or broken raises RecipeError (exit 2).
    When nothing here can answer (offline or hub unreachable, and not in the cache; a local
    directory absent here) it returns a warning instead: the cluster may have its own cache or
    filesystem. Reads config and tokenizer files only."""
    from launcher.data.tokenizer import build_tokenizer

    m, t = recipe.model, recipe.tokenizer
    for name, key in ((m.name_or_path, "model.name_or_path"), (t.name_or_path, "tokenizer.name_or_path")):
        if name and is_local(name) and not local_path(name).is_dir():
            return f"{key}: {name} is not a directory here, so it was not checked; the cluster must have it"
    hub = _hub_names(recipe)
    reachable = bool(hub) and not offline() and hub_reachable()
    for name in hub:
        if not reachable and not _in_cache(name):
            why = "HF_HUB_OFFLINE is set" if offline() else f"the hub ({hub_endpoint()}) is unreachable"
            return (
                f"{name} was not checked: {why} and it is not in the local Hugging Face cache "
                f"({hub_cache()}); the cluster must reach the hub or have it cached"
            )
    saved = os.environ.get("HF_HUB_OFFLINE")
    if hub and not reachable:
        os.environ["HF_HUB_OFFLINE"] = "1"  # the cache alone answers; no retries against the hub
    try:
        check_model(recipe)
        if not t.builtin:
            build_tokenizer(t, m.name_or_path, trust_remote_code=m.trust_remote_code)
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved
    return None


def _in_cache(name: str) -> bool:
    """Whether the local hub cache has a snapshot of `name` with its config or tokenizer files."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("config.json", "tokenizer_config.json", "tokenizer.json"):
        found = try_to_load_from_cache(name, filename)
        if isinstance(found, str):
            return True
    return False


def warn_for_submit(recipe: Any) -> None:
    """The one call `launcher submit` makes: raise on a definite problem, warn on stderr (stdout
    stays clean for --json) when the check cannot be made from here."""
    note = check_for_submit(recipe)
    if note:
        print(f"warning: {note}", file=sys.stderr)
