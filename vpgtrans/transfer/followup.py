"""The stage after a transfer, when the paper has one: VL-Vicuna's MiniGPT-4-style tuning (recipe `vl_vicuna`).

The follow-up recipe keeps its own template, data layout and hyper-parameters, and takes the transferred
model's vision encoder, VPG and LLM, starting from its weights (train.init_from).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Sequence

from ..checkpoint import read_manifest
from ..recipes import _read_yaml, build_recipe, find_recipe
from ..train.runner import run_recipe


def followup_recipe(model_dir: str | Path, name: str, data: str, overrides: Sequence[str] = ()) -> Any:
    """Recipe `name` on the transferred model in `model_dir`, trained on `data` (then `overrides`)."""
    spec = read_manifest(model_dir).get("spec") or {}
    path = find_recipe(name)
    raw = _read_yaml(path)
    model = copy.deepcopy(raw.get("model") or {})
    for part in ("vision", "vpg", "llm"):
        if spec.get(part):
            model[part] = {k: v for k, v in spec[part].items() if k != "lora"}
    raw["model"] = model
    extra = ["data.format=auto", f"data.train={data}", f"train.init_from={Path(model_dir)}", *overrides]
    return build_recipe(raw, extra, name=path.stem, source=str(path))


def run_followup(transfer_out: str | Path, name: str, data: str, overrides: Sequence[str] = (), *,
                 progress: bool = False, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the follow-up recipe into `<transfer_out>/<name>` from `<transfer_out>/model`."""
    out = Path(transfer_out)
    recipe = followup_recipe(out / "model", name, data, overrides)
    echo(f"== {name}: the paper's next stage on the transferred model ({recipe.description})")
    resume = "latest" if (out / name / "checkpoints").exists() else None
    return run_recipe(recipe, out / name, resume=resume, progress=progress, echo=echo)
