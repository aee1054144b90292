"""`hf-blip2` and `hf-instructblip`: Q-Former models ↔ transformers' (InstructBlip|Blip2)ForConditionalGeneration.

Sequence layout. transformers splices the projected query outputs wherever `input_ids` holds
`config.image_token_id` (`num_query_tokens` of them); its processor puts them in front of the
tokenizer's output. vpgtrans builds `[soft][BOS] text` (decoder-only) and `[soft] text [EOS]` (T5
encoder), so the exported tokenizer is given a template that adds BOS (resp. EOS) and the processor
then produces exactly vpgtrans's sequence. Templates with text before the image (MiniGPT-4 style,
`[BOS] before [soft] after`) are representable too — the model accepts image tokens anywhere — but
the stock processor cannot build them; feed `stock_inputs()`'s ids instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_dir
from ..errors import CheckpointError
from ..hf_dirs import preprocessor_settings, qformer_vpg_spec, read_blip2_vpg, read_hf_config, save_frozen_parts
from ..model import IMAGE_SLOT, detect_llm_component
from ..names import load_pretrained
from ._common import (IMAGE_TOKEN, ExportRefused, ExportResult, assemble, build_imported, dtype_name, finish_import,
                      image_processor, llm_part, prefixed, read_export_info, refuse_abstractor, refuse_project_in,
                      restore_llm, write_export)
from .usage import Usage, chat_template

QFORMER_TOKENIZER = "qformer_tokenizer"


@dataclass(frozen=True)
class Family:
    """One transformers BLIP family: class names and whether the Q-Former reads the instruction."""

    fmt: str
    model_type: str
    model_cls: str
    config_cls: str
    processor_cls: str
    instruct: bool


BLIP2 = Family("hf-blip2", "blip-2", "Blip2ForConditionalGeneration", "Blip2Config", "Blip2Processor", False)
INSTRUCTBLIP = Family("hf-instructblip", "instructblip", "InstructBlipForConditionalGeneration",
                      "InstructBlipConfig", "InstructBlipProcessor", True)


def _cls(name: str) -> Any:
    import transformers  # why: importing transformers costs seconds; only export/import needs it

    return getattr(transformers, name)


def _check(model: Any, family: Family) -> None:
    from transformers import Blip2VisionModel  # why: as above

    fmt = family.fmt
    vision = model.vision
    if not isinstance(getattr(vision, "model", None), Blip2VisionModel):
        kind = type(getattr(vision, "model", vision)).__name__
        raise ExportRefused(f"{fmt} stores an EVA/BLIP-2 ViT (Blip2VisionModel), but this model's vision encoder is "
                            f"{kind}", "export CLIP-based models with --format hf-llava (mlp/linear VPG)")
    cfg = vision.config
    if cfg.layer != -1 or cfg.drop_cls:
        raise ExportRefused(f"{fmt} feeds the Q-Former the ViT's final output with CLS, but this model uses "
                            f"layer={cfg.layer}, drop_cls={cfg.drop_cls}",
                            "only models built with the default vision layer (-1, CLS kept) can be exported")
    vpg = model.vpg
    if not (hasattr(vpg, "qformer") and hasattr(vpg, "query_tokens") and hasattr(vpg, "qformer_config")):
        raise ExportRefused(f"{fmt} needs a Q-Former VPG, this model's VPG is '{model.spec.vpg.get('name')}'",
                            "use --format hf-llava for linear/mlp VPGs")
    if family.instruct and not vpg.uses_instruction:
        raise ExportRefused("this model has no instruction-aware Q-Former", "export it with --format hf-blip2")
    if not family.instruct and vpg.uses_instruction:
        raise ExportRefused("this model's Q-Former reads the instruction, which Blip2ForConditionalGeneration "
                            "cannot do", "export it with --format hf-instructblip")
    if family.instruct and getattr(vpg, "tokenizer", None) is None:
        raise ExportRefused("the instruction-aware Q-Former has no tokenizer to ship",
                            "set vpg.tokenizer to its BERT tokenizer")


def _vision_state(model: Any) -> dict[str, torch.Tensor]:
    """The ViT's weights; refuses a VPG that adds its own LayerNorm (LAVIS ln_vision) on top.

    Blip2VisionModel ends in one LayerNorm (`post_layernorm`, which is where transformers keeps
    LAVIS's ln_vision); ln_vision after it makes two in a row. LN(LN(x)) equals one LayerNorm only up
    to the epsilons: with a constant first scale c it is γ2·c/√(c²+ε2)·(x−μ)/√(var + ε1·ε2/(c²+ε2))
    + β2, whose epsilon differs from ε1, and the ViT config has one epsilon for all its LayerNorms.
    """
    _refuse_ln_vision(model)
    return {k: v.detach() for k, v in model.vision.model.state_dict().items()}


def _refuse_ln_vision(model: Any) -> None:
    if isinstance(model.vpg.ln_vision, torch.nn.LayerNorm):
        raise ExportRefused("this model applies its own LayerNorm (vision_layernorm, LAVIS ln_vision) after the "
                            "ViT's final LayerNorm; two LayerNorms in a row have no exact Blip2VisionModel form",
                            "export a model trained with vision_layernorm=false (imported BLIP-2 models are)")


def _qformer_state(vpg: Any, instruct: bool) -> dict[str, torch.Tensor]:
    """Our Q-Former weights under the stock model's names."""
    state = prefixed("qformer", vpg.qformer)
    if instruct:
        # InstructBLIP keeps word/position embeddings and the input LayerNorm together in `embeddings`.
        for p in ("weight", "bias"):
            state[f"qformer.embeddings.layernorm.{p}"] = state.pop(f"qformer.layernorm.{p}")
        for name in ("word_embeddings", "position_embeddings"):
            state[f"qformer.embeddings.{name}.weight"] = getattr(vpg.text_embeddings, name).weight.detach()
    state["query_tokens"] = vpg.query_tokens.detach()
    return state


def _layout(model: Any, family: Family, n_query: int) -> tuple[str, int | None]:
    """(what the chat template puts where the soft prompts go, num_query_tokens for the processor).

    The stock processor prepends the image tokens to whatever text it gets; a template with text before
    the image instead gets the tokens from the chat template and a processor that prepends none.
    """
    if family.instruct and model.template.text != IMAGE_SLOT + "{instruction}":
        raise ExportRefused(f"{family.processor_cls} puts the image first and gives the Q-Former the same text as the "
                            f"LLM, but this model's template is {model.template.text!r}",
                            "export models trained with the default template '<ImageHere>{instruction}'")
    if model.template.text.startswith(IMAGE_SLOT):
        return "", n_query
    return IMAGE_TOKEN * n_query, None


def check(model: Any, family: Family) -> None:
    """Every reason `family` cannot hold `model`, raised as ExportRefused before anything is built or written."""
    refuse_abstractor(model, family.fmt)
    _check(model, family)
    _refuse_ln_vision(model)
    _layout(model, family, model.vpg.config.num_query_tokens)
    refuse_project_in(model, family.fmt)


def export(model: Any, out: str | Path, lora: str | None, family: Family,
           card: dict[str, Any] | None = None) -> ExportResult:
    """Write `model` as a stock (InstructBlip|Blip2)ForConditionalGeneration directory (+ processor)."""
    check(model, family)
    n_query = model.vpg.config.num_query_tokens
    slot, processor_queries = _layout(model, family, n_query)
    part = llm_part(model, lora, family.fmt)
    qcfg = {k: v for k, v in model.vpg.qformer_config.to_dict().items()
            if k not in ("model_type", "transformers_version", "architectures")}
    if family.instruct:
        qcfg.pop("use_qformer_text_input", None)
    vcfg = {k: v for k, v in model.vision.model.config.to_dict().items() if k not in ("model_type", "architectures")}
    config = _cls(family.config_cls)(vision_config=vcfg, qformer_config=qcfg, text_config=part.config.to_dict(),
                                     num_query_tokens=n_query, image_token_index=part.image_id)
    state = {**prefixed("vision_model", _vision_state(model)), **_qformer_state(model.vpg, family.instruct),
             **prefixed("language_projection", model.projector), **prefixed("language_model", part.state)}
    stock = assemble(_cls(family.model_cls), config, state)
    improc = image_processor(model.vision)
    extra = {"qformer_tokenizer": _truncating_tokenizers(model, part)} if family.instruct else {}
    usage = Usage(family.model_cls, chat_template(model, slot), not part.config.is_encoder_decoder,
                  model.template.end, one_per_call=family.instruct and not part.config.is_encoder_decoder)
    if family.instruct and usage.decoder_only:
        part.notes.append("InstructBlipProcessor pads the Q-Former's instruction on the LLM tokenizer's side (left); "
                          "the Q-Former was trained with right padding: pass one prompt per call, or prompts of "
                          "equal token length, to get vpgtrans's text")
    return write_export(Path(out), stock, part, model, lambda template: _cls(family.processor_cls)(
        image_processor=improc, tokenizer=part.tokenizer, num_query_tokens=processor_queries, chat_template=template,
        **extra), improc, usage, card)


def _truncating_tokenizers(model: Any, part: Any) -> Any:
    """The Q-Former's tokenizer as shipped: it cuts instructions where and as the model does (left, at
    min(max_instruction_len, max_position_embeddings)); the LLM tokenizer is made to ask for that cut.

    InstructBlipProcessor calls both tokenizers with the same text arguments, so truncation has to be on for
    both: `truncation` in the LLM tokenizer's saved arguments turns it on for every processor call, and the LLM
    tokenizer keeps an honest limit (its context length) so that it cuts nothing vpgtrans would have read.
    """
    import copy

    cfg = model.vpg.config
    qtok = copy.deepcopy(model.vpg.tokenizer)
    qtok.model_max_length = qtok.init_kwargs["model_max_length"] = min(cfg.max_instruction_len,
                                                                       cfg.max_position_embeddings)
    qtok.truncation_side = qtok.init_kwargs["truncation_side"] = model.vpg.tokenizer.truncation_side
    tok, lm_config = part.tokenizer, part.config
    context = getattr(lm_config, "max_position_embeddings", None) or getattr(lm_config, "n_positions", None)
    if tok.model_max_length > 10 ** 9:  # "no limit" would make every truncating call warn and cut nothing
        tok.model_max_length = tok.init_kwargs["model_max_length"] = context or 10 ** 9
    tok.init_kwargs["truncation"] = True
    return qtok


def _instruct_vpg(stock: Any, info: dict[str, Any], tokenizer_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(VPG spec, VPG weights) of an InstructBLIP Q-Former in the instruct-qformer layout."""
    q = stock.config.qformer_config
    spec = {"name": "instruct-qformer", "num_query_tokens": int(stock.config.num_query_tokens),
            **{k: getattr(q, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                                          "intermediate_size", "cross_attention_frequency", "max_position_embeddings")},
            "dropout": q.hidden_dropout_prob, "vision_width": stock.config.vision_config.hidden_size,
            "text_input": True, "tokenizer": str(tokenizer_dir), "init_from": None}
    old = (info.get("spec") or {}).get("vpg") or {}
    if old.get("name") == spec["name"] and "max_instruction_len" in old:
        spec["max_instruction_len"] = old["max_instruction_len"]
    # InstructBLIP keeps word/position embeddings and the input LayerNorm together in `embeddings`.
    qstate = {k: v.detach() for k, v in stock.qformer.state_dict().items()}
    for p in ("weight", "bias"):
        qstate[f"layernorm.{p}"] = qstate.pop(f"embeddings.layernorm.{p}")
    state = {"query_tokens": stock.query_tokens.detach(), **prefixed("qformer", qstate)}
    for name in ("word_embeddings", "position_embeddings"):
        state[f"text_embeddings.{name}.weight"] = state.pop(f"qformer.embeddings.{name}.weight")
    return spec, state


def _check_qformer_config(ours: Any, theirs: Any, src: Path) -> None:
    for key in ("hidden_act", "layer_norm_eps", "pad_token_id"):
        if getattr(ours, key, None) != getattr(theirs, key, None):
            raise CheckpointError(f"{src}: Q-Former {key}={getattr(theirs, key, None)!r} differs from what the "
                                  f"vpgtrans Q-Former builds ({getattr(ours, key, None)!r})",
                                  "this checkpoint's Q-Former cannot be represented by the built-in VPG")


def import_(src: str | Path, out: str | Path, family: Family) -> Path:
    """Turn a stock (InstructBlip|Blip2)ForConditionalGeneration directory into a vpgtrans model directory."""
    from transformers import AutoTokenizer, Blip2VisionConfig, Blip2VisionModel  # why: as above

    src, out = Path(src), Path(out)
    read_hf_config(src, (family.model_type,), family.fmt)
    info = read_export_info(src)
    stock = load_pretrained(_cls(family.model_cls).from_pretrained, str(src), str(src), what=family.fmt).eval()
    lm = stock.language_model
    tokenizer = restore_llm(src, info, lm)
    # Blip2VisionModel cannot load from a full BLIP-2 directory (its weights sit under `vision_model.`),
    # so the tower becomes its own checkpoint; InstructBLIP's tower has the same layout.
    vcfg = {k: v for k, v in stock.config.vision_config.to_dict().items() if k not in ("model_type", "architectures")}
    vision = assemble(Blip2VisionModel, Blip2VisionConfig(**vcfg), dict(stock.vision_model.state_dict()))
    proj_state = {k: v.detach() for k, v in stock.language_projection.state_dict().items()}
    with atomic_dir(out) as tmp:
        save_frozen_parts(tmp, vision, lm, tokenizer, preprocessor_settings(src))
        if family.instruct:
            qsrc = src / QFORMER_TOKENIZER if (src / QFORMER_TOKENIZER).is_dir() else src
            load_pretrained(AutoTokenizer.from_pretrained, str(qsrc), str(qsrc),
                            what="Q-Former tokenizer").save_pretrained(str(tmp / QFORMER_TOKENIZER))
            vpg_spec, vpg_state = _instruct_vpg(stock, info, tmp / QFORMER_TOKENIZER)
        else:  # the transfer sources' BLIP-2 reader: same key mapping, same VPG spec
            read = read_blip2_vpg(src)
            n_query = int(read.state["vpg.query_tokens"].shape[1])
            vpg_spec = qformer_vpg_spec(read.qformer_config, n_query, vision_layernorm=False)
            vpg_state = {k[len("vpg."):]: v for k, v in read.state.items() if k.startswith("vpg.")}
        spec = {"vision": {"name": "blip2-vit", "path": str(tmp / "vision"), "dtype": dtype_name(vision)},
                "vpg": vpg_spec,
                "llm": {"name": detect_llm_component(str(tmp / "llm")), "path": str(tmp / "llm"),
                        "dtype": dtype_name(lm)},
                "template": (info.get("spec") or {}).get("template") or {}}
        qformer_config = stock.config.qformer_config
        del stock, lm, vision
        model = build_imported(spec, src)
        _check_qformer_config(model.vpg.qformer_config, qformer_config, src)
        model.vpg.load_state_dict(vpg_state, strict=True)
        model.projector.load_state_dict(proj_state, strict=True)
        finish_import(model, tmp, out, extra={"imported_from": {"format": family.fmt, "path": str(src.resolve())}})
    return out
