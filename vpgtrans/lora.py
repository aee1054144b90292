"""LoRA on the frozen LLM through peft: inject, save in peft's adapter format, merge for export.

Adapters are injected in place (``peft.inject_adapter_in_model``), so ``model.llm.model`` stays the
plain transformers model the backend drives (``inputs_embeds`` forward and ``generate`` unchanged).
Inside a model directory the adapter is written twice on purpose: its weights are part of
``model.safetensors`` (what ``load_model`` reads, with the VPG and projector), and ``lora/`` holds
the same adapter in peft's own format, loadable outside vpgtrans with
``PeftModel.from_pretrained(<base LLM>, "<model_dir>/lora")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import from_dict, help_field, to_dict
from .errors import CheckpointError, ConfigError
from .names import LLM_ALIASES, resolve

ADAPTER = "default"
LORA_DIR = "lora"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# peft keys saved by a PeftModel carry this prefix; writing it makes our folder loadable by PeftModel.
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraSettings:
    """LoRA on the LLM's attention projections (the `lora:` section of a recipe or model spec)."""

    r: int = help_field(8, help="LoRA rank")
    alpha: int = help_field(16, help="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = help_field(0.05, help="dropout on the LoRA input (active only while training)")
    target_modules: list[str] | None = help_field(
        None, help="module names to adapt; empty = per backend: OPT/LLaMA q_proj,v_proj, T5 q,v "
                   "(peft's defaults for the model type)")
    bias: str = help_field("none", help="which biases train: none, all or lora_only")


def settings(cfg: dict[str, Any] | LoraSettings) -> LoraSettings:
    """Validated LoRA settings from a dict (rejecting unknown keys)."""
    if isinstance(cfg, LoraSettings):
        return cfg
    out = from_dict(LoraSettings, cfg, where="lora")
    if out.r < 1:
        raise ConfigError(f"lora: r must be at least 1, got {out.r}", "set lora.r to a positive rank, e.g. 8")
    if out.bias not in ("none", "all", "lora_only"):
        raise ConfigError(f"lora: unknown bias '{out.bias}'", "use none, all or lora_only")
    return out


def default_targets(hf_model: torch.nn.Module) -> list[str]:
    """peft's default LoRA targets for this model type (q/v attention projections)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    if model_type not in DEFAULTS:
        raise ConfigError(f"lora: no default target modules for LLM model type '{model_type}'",
                          "set lora.target_modules to the attention projection names, e.g. [q_proj, v_proj]")
    return list(DEFAULTS[model_type])


def is_applied(model: Any) -> bool:
    """True when the model's LLM carries a peft adapter."""
    return ADAPTER in getattr(model.llm.model, "peft_config", {})


def _base_name(model: Any) -> str:
    path = str(getattr(getattr(model.llm, "config", None), "path", ""))
    try:
        return resolve(path, LLM_ALIASES)
    except Exception:  # noqa: BLE001 - only a label in adapter_config.json
        return path


def apply_lora(model: Any, cfg: dict[str, Any] | LoraSettings) -> Any:
    """Inject LoRA into `model.llm.model` in place; only the adapter trains on the LLM side."""
    from peft import LoraConfig, TaskType, inject_adapter_in_model

    opts = settings(cfg)
    if is_applied(model):
        raise ConfigError("lora is already applied to this model", "apply it once (build_model does it for spec.lora)")
    hf_model = model.llm.model
    targets = list(opts.target_modules) if opts.target_modules else default_targets(hf_model)
    task = TaskType.SEQ_2_SEQ_LM if model.llm.is_encoder_decoder else TaskType.CAUSAL_LM
    config = LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=targets,
                        bias=opts.bias, task_type=task, base_model_name_or_path=_base_name(model))
    try:
        inject_adapter_in_model(config, hf_model, adapter_name=ADAPTER)
    except ValueError as exc:  # peft: none of the target modules exist in this model
        names = sorted({n.rsplit(".", 1)[-1] for n, m in hf_model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"lora: target modules {targets} do not fit this LLM ({exc})".replace("\n", " "),
                          f"choose lora.target_modules among its linear layers: {', '.join(names[:12])}") from None
    # The backend keeps a frozen LLM in eval mode; with an adapter, `model.train()` must reach LoRA dropout.
    # Until then it stays in eval like the rest of the LLM (new peft modules start in train mode).
    model.llm.trainable = True
    hf_model.eval()
    model.spec.lora = to_dict(LoraSettings(r=opts.r, alpha=opts.alpha, dropout=opts.dropout,
                                           target_modules=targets, bias=opts.bias))
    return model


def lora_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters, by their name inside the model."""
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def save_adapter(model: Any, out_dir: str | Path) -> Path:
    """Write the adapter in peft's format: `adapter_model.safetensors` + `adapter_config.json`."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if not is_applied(model):
        raise ConfigError("the model has no LoRA adapter to save", "build it with a `lora:` section")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_model = model.llm.model
    state = get_peft_model_state_dict(hf_model, adapter_name=ADAPTER)
    state = {_PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    hf_model.peft_config[ADAPTER].save_pretrained(str(out))
    return out


def load_adapter(model: Any, adapter_dir: str | Path) -> None:
    """Load adapter weights saved by `save_adapter` (or by peft) into a model that already has LoRA applied."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.exists():
        raise CheckpointError(f"{path} is missing", "pass a folder written by peft's save_pretrained")
    if not is_applied(model):
        raise ConfigError("the model has no LoRA adapter to load into", "build it with the adapter's `lora:` settings")
    state = {k.removeprefix(_PEFT_PREFIX): v for k, v in load_file(str(path)).items()}
    result = set_peft_model_state_dict(model.llm.model, state, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"adapter {adapter_dir} does not fit this LLM ({len(missing)} missing, "
                              f"{len(result.unexpected_keys)} unexpected keys)",
                              "use the same LLM and lora settings the adapter was trained with")


def merge_lora(model: Any, llm_dir: str | Path | None = None) -> Any:
    """Fold the adapter into the LLM weights (peft merge) and drop the LoRA layers.

    With `llm_dir`, the merged LLM and its tokenizer are written there with `save_pretrained` and the
    model spec points at it, so `save_model` afterwards produces a directory that needs no adapter.
    Without it the merge only lives in memory (faster inference).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not is_applied(model):
        raise ConfigError("the model has no LoRA adapter to merge", "nothing to do: export it as it is")
    hf_model = model.llm.model
    for name, module in list(hf_model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(hf_model.get_submodule(parent_name), child, module.get_base_layer())
    del hf_model.peft_config
    model.llm.trainable = False
    model.llm.requires_grad_(False)
    model.llm.train(False)
    model.spec.lora = None
    if llm_dir is not None:
        llm_dir = Path(llm_dir)
        hf_model.save_pretrained(llm_dir)
        model.llm.tokenizer.save_pretrained(llm_dir)
        model.spec.llm = {**model.spec.llm, "path": str(llm_dir.resolve())}
        model.spec.llm.pop("gguf_file", None)  # the merged weights are safetensors now
    return model
