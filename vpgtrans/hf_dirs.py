"""Reading and writing Hugging Face checkpoint directories (config.json, processor config, safetensors shards).

The one place `formats/` (export/import) and `transfer/sources.py` share: both depend on this module, never
on each other. It depends only on `errors` (and on torch / safetensors / transformers where a function needs
them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .errors import CheckpointError

# Blip2QFormerConfig fields that matter for rebuilding the Q-Former.
QFORMER_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                "layer_norm_eps", "cross_attention_frequency", "encoder_hidden_size", "use_qformer_text_input")


def read_hf_config(src: str | Path, model_types: Sequence[str], fmt: str) -> dict[str, Any]:
    """config.json of a stock checkpoint directory, checked to be of the expected model type."""
    path = Path(src) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{src} has no config.json", f"pass a directory holding a {fmt} checkpoint")
    config = json.loads(path.read_text())
    if config.get("model_type") not in model_types:
        raise CheckpointError(f"{src} holds a '{config.get('model_type')}' model, not {'/'.join(model_types)}",
                              f"pick the --format that matches the checkpoint ({fmt} reads {model_types[0]})")
    return config


def preprocessor_settings(src: Path) -> dict[str, Any]:
    """Image size and statistics from a stock processor config, in the form the vision adapters read.

    A resize-short-side-then-centre-crop config (CLIPImageProcessor) is kept as it is: the vision component
    follows it, so non-square images give the source model's pixels.
    """
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = src / name
        if path.exists():
            data = json.loads(path.read_text())
            data = data.get("image_processor", data)
            keep = {k: data[k] for k in ("image_mean", "image_std", "size", "crop_size", "do_center_crop")
                    if k in data}
            if data.get("do_center_crop") and isinstance(keep.get("size"), dict) and "shortest_edge" in keep["size"]:
                return keep
            size = keep.get("crop_size") if data.get("do_center_crop") else keep.get("size")
            if isinstance(size, dict) and "shortest_edge" in size:
                size = {"height": size["shortest_edge"], "width": size["shortest_edge"]}
            if size is not None:
                keep["size"] = size
            keep.pop("crop_size", None)
            keep.pop("do_center_crop", None)
            return keep
    return {}


def save_frozen_parts(tmp: Path, vision: nn.Module, lm: nn.Module, tokenizer: Any,
                      preprocessor: dict[str, Any]) -> None:
    """Write the vision tower and the LLM as their own stock checkpoints (what our components load)."""
    vision.save_pretrained(str(tmp / "vision"))
    if preprocessor:
        (tmp / "vision" / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    lm.save_pretrained(str(tmp / "llm"))
    tokenizer.save_pretrained(str(tmp / "llm"))


def safetensors_names(directory: Path) -> list[str]:
    """Names of every tensor in a (possibly sharded) safetensors checkpoint, without reading any."""
    from safetensors import safe_open  # why: keeps `import vpgtrans.hf_dirs` (and the CLI's start) light

    index = directory / "model.safetensors.index.json"
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    if not (directory / "model.safetensors").exists():
        raise CheckpointError(f"{directory} has no model.safetensors (or index)",
                              "save the model with safetensors (save_pretrained does by default)")
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def read_safetensors(directory: Path, wanted: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read only the named tensors from a (possibly sharded) safetensors checkpoint."""
    from safetensors import safe_open  # why: as above

    wanted = set(wanted)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files: dict[str, list[str]] = {}
        for key in sorted(wanted & set(weight_map)):
            files.setdefault(weight_map[key], []).append(key)
    elif (directory / "model.safetensors").exists():
        files = {"model.safetensors": sorted(wanted)}
    else:
        raise CheckpointError(f"{directory} has no model.safetensors (or index)",
                              "save the model with safetensors (save_pretrained does by default)")
    out: dict[str, torch.Tensor] = {}
    for name, keys in files.items():
        with safe_open(str(directory / name), framework="pt") as f:
            present = set(f.keys())
            for key in keys:
                if key in present:
                    out[key] = f.get_tensor(key)
    return out


# ---------------------------------------------------------------------------------------------- BLIP-2 VPG
def qformer_fields(qcfg: dict[str, Any]) -> dict[str, Any]:
    """The Blip2QFormerConfig fields that rebuild a Q-Former, transformers' defaults filled in."""
    from transformers import Blip2QFormerConfig  # why: importing transformers costs seconds

    full = Blip2QFormerConfig.from_dict(dict(qcfg)).to_dict()
    return {k: full[k] for k in QFORMER_KEYS}


def qformer_vpg_spec(qcfg: dict[str, Any], num_query_tokens: int, vision_layernorm: bool) -> dict[str, Any]:
    """The `vpg` entry of a model spec that rebuilds this Q-Former with the built-in `qformer` VPG."""
    return {"name": "qformer", "num_query_tokens": num_query_tokens, "hidden_size": qcfg["hidden_size"],
            "num_hidden_layers": qcfg["num_hidden_layers"], "num_attention_heads": qcfg["num_attention_heads"],
            "intermediate_size": qcfg["intermediate_size"],
            "cross_attention_frequency": qcfg["cross_attention_frequency"],
            "dropout": qcfg["hidden_dropout_prob"], "vision_width": qcfg["encoder_hidden_size"],
            "vision_layernorm": vision_layernorm, "text_input": False, "init_from": None,
            "vocab_size": qcfg["vocab_size"], "max_position_embeddings": qcfg["max_position_embeddings"]}


def _blip2_key(key: str) -> str | None:
    """A Blip2ForConditionalGeneration key → vpgtrans's (`vpg.` / `projector.`); None for the ViT and LLM."""
    if key == "query_tokens":
        return "vpg.query_tokens"
    if key.startswith("qformer."):
        return "vpg." + key
    if key.startswith("language_projection."):
        return "projector." + key[len("language_projection."):]
    return None


@dataclass
class Blip2VPG:
    """The Q-Former and projector of a Hugging Face BLIP-2 directory, in vpgtrans's key layout."""

    config: dict[str, Any]
    qformer_config: dict[str, Any]
    state: dict[str, torch.Tensor]
    # transformers keeps LAVIS's trained ln_vision as the ViT's post_layernorm
    vision_post_layernorm: dict[str, torch.Tensor] = field(default_factory=dict)


def read_blip2_vpg(path: Path) -> Blip2VPG:
    """Read only the VPG side (Q-Former, query tokens, projector, the ViT's final norm) of a BLIP-2 directory."""
    config = read_hf_config(path, ("blip-2",), "hf-blip2")
    qcfg = qformer_fields(config.get("qformer_config") or {})
    ln_keys = ["vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"]
    wanted = [k for k in safetensors_names(path) if _blip2_key(k) is not None] + ln_keys
    raw = read_safetensors(path, wanted)
    state = {ours: v for k, v in raw.items() if (ours := _blip2_key(k)) is not None}
    post_ln = {k.rsplit(".", 1)[1]: raw[k] for k in ln_keys if k in raw}
    return Blip2VPG(config, qcfg, state, post_ln)
