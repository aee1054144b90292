"""Export vpgtrans models to stock transformers checkpoints, and import them back.

| format            | transformers class                     | vpgtrans VPG                 |
|-------------------|----------------------------------------|------------------------------|
| `hf-blip2`        | `Blip2ForConditionalGeneration`        | `qformer`                    |
| `hf-instructblip` | `InstructBlipForConditionalGeneration` | `instruct-qformer`           |
| `hf-llava`        | `LlavaForConditionalGeneration`        | `mlp`, `linear`              |

All three splice the soft prompts where `input_ids` holds the image token; `stock_inputs` builds
those ids from vpgtrans's own sequence, so the stock model sees exactly what vpgtrans trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from vpgtrans_adapters.llm import _pad

from ..errors import ConfigError
from . import blip2, llava
from ._common import IGNORE, LORA_MODES, ExportRefused, ExportResult

__all__ = ["FORMATS", "LORA_MODES", "ExportRefused", "ExportResult", "accepting_formats", "export_model",
           "import_model", "stock_inputs"]


def _export_blip2(model: Any, out: Path, lora: str | None, card: dict[str, Any] | None) -> ExportResult:
    return blip2.export(model, out, lora, blip2.BLIP2, card)


def _export_instructblip(model: Any, out: Path, lora: str | None, card: dict[str, Any] | None) -> ExportResult:
    return blip2.export(model, out, lora, blip2.INSTRUCTBLIP, card)


def _import_blip2(src: Path, out: Path) -> Path:
    return blip2.import_(src, out, blip2.BLIP2)


def _import_instructblip(src: Path, out: Path) -> Path:
    return blip2.import_(src, out, blip2.INSTRUCTBLIP)


def _export_llava(model: Any, out: Path, lora: str | None, card: dict[str, Any] | None) -> ExportResult:
    return llava.export(model, out, lora, card)


def _import_llava(src: Path, out: Path) -> Path:
    return llava.import_(src, out)


# name → (export, import, one-line description)
FORMATS: dict[str, tuple[Callable[..., ExportResult], Callable[..., Path], str]] = {
    "hf-blip2": (_export_blip2, _import_blip2, "transformers Blip2ForConditionalGeneration (Q-Former VPG)"),
    "hf-instructblip": (_export_instructblip, _import_instructblip,
                        "transformers InstructBlipForConditionalGeneration (instruct-qformer VPG)"),
    "hf-llava": (_export_llava, _import_llava, "transformers LlavaForConditionalGeneration (mlp/linear VPG)"),
}


# name → the check that raises ExportRefused when the format cannot hold a model (nothing built or written)
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "hf-blip2": lambda model: blip2.check(model, blip2.BLIP2),
    "hf-instructblip": lambda model: blip2.check(model, blip2.INSTRUCTBLIP),
    "hf-llava": lambda model: llava.check(model),
}
NO_FORMAT = ("no export format holds this model; keep using its vpgtrans model directory (vpgtrans generate / chat / "
             "eval / serve, lmms-eval --model vpgtrans)")


def accepting_formats(model: Any) -> list[str]:
    """The export formats that can hold `model`, in FORMATS order (each format's checks only; nothing written)."""
    accepted = []
    for fmt, check in _CHECKS.items():
        try:
            check(model)
        except ExportRefused:
            continue
        accepted.append(fmt)
    return accepted


def _refusal(exc: ExportRefused, model: Any, fmt: str) -> ExportRefused:
    """The refusal with a fix that names a format that accepts the model, or says none does."""
    others = [f for f in accepting_formats(model) if f != fmt]
    # The checks' own hints guess at another format; only the checks of every format can tell which one holds it.
    own = exc.fix if exc.fix and "--format" not in exc.fix and "no stock" not in exc.fix else None
    if others:
        fix = f"export it with --format {' or --format '.join(others)}"
    else:
        fix = "; ".join(f for f in (own, NO_FORMAT) if f)
    return ExportRefused(exc.what, fix)


def _format(fmt: str) -> tuple[Callable[..., ExportResult], Callable[..., Path], str]:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format '{fmt}'", f"use one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def export_model(model: Any, out: str | Path, fmt: str = "hf-blip2", *, lora: str | None = None,
                 card: dict[str, Any] | None = None) -> ExportResult:
    """Write `model` as a stock transformers checkpoint directory (`lora`: merge (default) or peft).

    `card`: {"manifest": the model directory's manifest, "scores": measured metrics} for the README.md.
    """
    if lora is not None and lora not in LORA_MODES:
        raise ConfigError(f"unknown --lora mode '{lora}'", f"use one of {', '.join(LORA_MODES)}")
    export = _format(fmt)[0]
    try:
        _CHECKS[fmt](model)
    except ExportRefused as exc:
        raise _refusal(exc, model, fmt) from None
    return export(model, Path(out), lora, card)


def import_model(src: str | Path, out: str | Path, fmt: str = "hf-blip2") -> Path:
    """Turn a stock transformers checkpoint directory into a vpgtrans model directory."""
    src = Path(src)
    if not src.is_dir():
        raise ConfigError(f"{src} is not a directory", "pass the folder holding the checkpoint's config.json")
    return _format(fmt)[1](src, Path(out))


def stock_inputs(model: Any, samples: Sequence[Any], image_token_id: int, *, instructions: Sequence[str] | None = None,
                 max_text_len: int = 128) -> dict[str, torch.Tensor]:
    """Inputs for an exported stock model that reproduce vpgtrans's teacher-forced sequence exactly.

    Soft-prompt slots become `image_token_id`; `labels` are vpgtrans's targets (+EOS), so the stock loss
    equals `model(...)`'s. For an instruction-aware Q-Former, `qformer_input_ids` carry the instructions.
    """
    llm = model.llm
    n_soft = model.vpg.num_prompts(model.vision.num_tokens)
    if getattr(llm, "is_encoder_decoder", False):
        ids, soft, attn = llm._encoder_inputs(n_soft, samples)
        eos = [llm.tokenizer.eos_token_id]
        labels = _pad([(llm._ids(s.target) + eos)[:max_text_len] for s in samples], IGNORE, False)
    else:
        ids, soft, labels, attn = llm._sequences(n_soft, samples, max_text_len, True, False)
    out = {"input_ids": ids.masked_fill(soft, image_token_id), "attention_mask": attn, "labels": labels}
    if model.vpg.uses_instruction:
        q_ids, q_mask = model.vpg.tokenize(list(instructions or [""] * len(samples)), torch.device("cpu"))
        out.update(qformer_input_ids=q_ids, qformer_attention_mask=q_mask)
    return out

