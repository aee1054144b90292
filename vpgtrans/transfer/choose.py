"""The default recipe of `vpgtrans transfer`: the paper's values for the kind of transfer the two models make.

World models → the world recipe. Real models: same LLM family (OPT-2.7B → OPT-6.7B, FlanT5-XL → XXL) is the
paper's *size* transfer; another family (OPT-6.7B → LLaMA-7B, VL-LLaMA) its *type* transfer; into Vicuna is
VL-Vicuna: the type transfer, then the MiniGPT-4-style stage. Nothing here loads weights: families come from
names, `config.json` and `manifest.json`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..names import BLIP2_ALIASES, LLM_ALIASES, VISION_ALIASES
from ..paths import world_dir

WORLD_RECIPE = "vpgtrans_world"
SIZE_RECIPE = "vpgtrans_opt2.7b_to_6.7b"
TYPE_RECIPE = "vpgtrans_vl_llama"
VICUNA_FOLLOWUP = "vl_vicuna"
# What the layouts the data readers accept look like (for the refusal when real models have no data).
DATA_LAYOUTS = ("COCO Karpathy JSON (coco_karpathy_train.json)", "LAVIS annotation JSON ([{image, caption}])",
                "JSONL ({\"image\", \"caption\"} per line)", "webdataset .tar shards (dir or {00000..00099}.tar)",
                "MiniGPT-4 cc_sbu_align folder (filter_cap.json + image/)")


@dataclass(frozen=True)
class Choice:
    """The recipe a transfer runs and why; `followup` is a recipe to train after it (VL-Vicuna)."""

    recipe: str
    kind: str
    reason: str
    followup: str | None = None


def _from_config(path: Path) -> str | None:
    """Family from a Hugging Face config.json (a BLIP-2's text model, or an LLM's own)."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    named = family(str(text.get("_name_or_path") or ""), look=False)
    if named:
        return named
    kind = str(text.get("model_type") or "")
    return {"opt": "opt", "llama": "llama", "mistral": "llama", "t5": "flant5"}.get(kind)


def _from_name(text: str) -> str | None:
    low = Path(text).name.lower() if not re.fullmatch(r"[\w.-]+/[\w.-]+", text) else text.lower()
    if low.startswith("world-"):
        return "world"
    for key, fam in (("vicuna", "vicuna"), ("flan-t5", "flant5"), ("flant5", "flant5"), ("llama", "llama"),
                     ("opt", "opt"), ("t5", "flant5")):
        end = "" if key == "vicuna" else "(?=$|[^a-z])"  # 'opt-6.7b', 'llama2' but not 'options'
        if re.search(rf"(^|[/_-]){re.escape(key)}{end}", low):
            return fam
    return None


def _from_disk(path: Path) -> str | None:
    """Family of a local model: inside the world's folder, its manifest's LLM, or its config.json."""
    try:
        if path.resolve().is_relative_to(world_dir().resolve()):
            return "world"
    except OSError:
        pass
    if (path / "manifest.json").exists():
        try:
            spec = json.loads((path / "manifest.json").read_text()).get("spec") or {}
        except ValueError:
            return None
        return family((spec.get("llm") or {}).get("path"))
    return _from_config(path) if path.is_dir() else None


def family(name: str | None, *, look: bool = True) -> str | None:
    """'world', 'opt', 'llama', 'vicuna', 'flant5' or None for a model name, hub id or directory."""
    if not name:
        return None
    path = Path(str(name)).expanduser()
    # What a local model says about itself beats what its folder happens to be called.
    on_disk = _from_disk(path) if look and path.exists() else None
    return on_disk or _from_name(str(name))


def guess_component(name: str) -> str:
    """The built-in LLM backend a model's name suggests (for plans of absent weights; loading reads config.json)."""
    return {"opt": "opt", "llama": "llama", "vicuna": "llama", "flant5": "flant5"}.get(family(name) or "", "causal-lm")


def choose_recipe(src: str, dst: str, src_llm: str | None = None) -> Choice:
    """The paper's recipe for transferring the VPG of `src` to the LLM `dst`, with the reason."""
    a, b = family(src_llm) or family(src), family(dst)
    pair = f"{a or '?'} → {b or '?'}"
    if "world" in (a, b):
        return Choice(WORLD_RECIPE, "world", f"{pair}: synthetic-world models, the world recipe (world data, "
                                            "world-sized steps, the paper's schedule)")
    if b == "vicuna":
        return Choice(TYPE_RECIPE, "vl-vicuna", f"{pair}: into Vicuna is the paper's VL-Vicuna: the VL-LLaMA "
                                                f"transfer, then the MiniGPT-4-style stage (recipe {VICUNA_FOLLOWUP})",
                      followup=VICUNA_FOLLOWUP)
    if a is not None and a == b:
        return Choice(SIZE_RECIPE, "size", f"{pair}: same LLM family, the paper's size transfer "
                                           "(OPT-2.7B → OPT-6.7B values; FlanT5-XL → XXL used the same)")
    if a is not None and b is not None:
        return Choice(TYPE_RECIPE, "type", f"{pair}: another LLM family, the paper's type transfer "
                                           "(VL-LLaMA: OPT-6.7B → LLaMA-7B values)")
    return Choice(TYPE_RECIPE, "type", f"{pair}: LLM family not recognised, the paper's type-transfer values "
                                       "(VL-LLaMA); pass --recipe to choose another")


def _absent(path: str | None) -> bool:
    return bool(path) and "{" not in str(path) and not Path(str(path)).expanduser().exists()


def data_problem(recipe: str, train: str, val: str | None) -> tuple[str, str] | None:
    """(what, what to do) when a real-model recipe's data is not on disk: the layouts accepted and an example."""
    if recipe == WORLD_RECIPE:
        return None
    if _absent(train):
        return (f"recipe {recipe} trains on real images and its data.train {train} does not exist",
                f"pass --data PATH in one of these layouts: {'; '.join(DATA_LAYOUTS)}; e.g. --data "
                "data/coco/annotations/coco_karpathy_train.json (images under data/coco/images, or set "
                "data.image_root=DIR)")
    if _absent(val):
        return (f"recipe {recipe} evaluates on data.val {val}, which does not exist",
                "pass data.val=PATH (held-out annotations in the same layouts), or data.val=null eval.metrics=[] "
                "to train without validation")
    return None


def _source_meta(src: str) -> dict[str, str]:
    """{'llm': ..., 'vision': ...} a source names without loading it (vpgtrans manifest or BLIP-2 config)."""
    if src in BLIP2_ALIASES:  # a published BLIP-2 by the LLM it was trained on: its LLM has the same alias
        return {"llm": src, "vision": "eva-vit-g"}
    path = Path(src).expanduser()
    try:
        if (path / "manifest.json").exists():
            spec = json.loads((path / "manifest.json").read_text()).get("spec") or {}
            return {"llm": (spec.get("llm") or {}).get("path", ""), "vision": (spec.get("vision") or {}).get("path", "")}
        if (path / "config.json").exists():
            text = json.loads((path / "config.json").read_text()).get("text_config") or {}
            return {"llm": text.get("_name_or_path", "")}
    except (OSError, ValueError):
        pass
    return {}


def wanted_weights(src: str, dst: str, src_llm: str | None, recipe_vision: str | None
                   ) -> list[tuple[str, str, dict[str, str]]]:
    """(role, name, aliases) of every weight a transfer needs: source, its LLM, the destination, the vision."""
    meta = _source_meta(src)
    out = [("source", src, BLIP2_ALIASES), ("destination LLM", dst, LLM_ALIASES)]
    if src_llm or meta.get("llm"):
        out.append(("source LLM", src_llm or meta["llm"], LLM_ALIASES))
    # A source that names no vision encoder (BLIP-2 dir, .pth, alias) runs with the recipe's; an absent local
    # source may name one we cannot read, so nothing is said about it.
    vision = meta.get("vision") or (recipe_vision if src in BLIP2_ALIASES or Path(src).expanduser().exists() else None)
    if vision:
        out.append(("vision encoder", vision, VISION_ALIASES))
    return out
