"""`hf-llava`: per-patch VPGs (`mlp`, `linear`) on a CLIP tower ↔ transformers' LlavaForConditionalGeneration.

LLaVA's projector is Linear-act-Linear with the LLM width in the middle:
- `mlp` (Linear-GELU) + our projector is exactly that when the VPG's hidden width is the LLM width;
- `linear` (identity) + our projector becomes linear_1 = projector, act = identity ("linear"),
  linear_2 = the identity matrix — exact in floating point.
LLaVA reads `hidden_states[vision_feature_layer]` of its tower; for CLIP, vpgtrans's layer -1 (final
output) is the same tensor. Dropping CLS (on the vision component or the VPG) is the "default" strategy.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_dir
from ..errors import CheckpointError
from ..hf_dirs import preprocessor_settings, read_hf_config, save_frozen_parts
from ..model import IMAGE_SLOT, detect_llm_component
from ..names import load_pretrained
from ._common import (IMAGE_TOKEN, ExportRefused, ExportResult, assemble, build_imported, dtype_name, finish_import,
                      image_processor, llm_part, prefixed, read_export_info, refuse_abstractor, refuse_project_in,
                      restore_llm, write_export)
from .usage import Usage, chat_template

FMT = "hf-llava"


def _check(model: Any) -> tuple[bool, str]:
    """(drop CLS?, projector activation) if LLaVA can represent the model, else a plain refusal."""
    from transformers import CLIPVisionModel  # why: importing transformers costs seconds

    name = model.spec.vpg.get("name")
    if name not in ("mlp", "linear", "llava", "llava-1.5"):
        raise ExportRefused(f"{FMT} represents the per-patch 'mlp' and 'linear' VPGs, this model's VPG is '{name}'",
                            "export Q-Former models with --format hf-blip2 (or hf-instructblip)")
    if not isinstance(getattr(model.vision, "model", None), CLIPVisionModel):
        raise ExportRefused(f"{FMT} needs a CLIP vision tower (LLaVA builds it with AutoModel), this model uses "
                            f"{type(getattr(model.vision, 'model', model.vision)).__name__}",
                            "rebuild the model on clip-vit to export it as LLaVA")
    if model.llm.model.config.is_encoder_decoder:
        raise ExportRefused(f"{FMT} needs a decoder-only LLM; LlavaForConditionalGeneration cannot hold "
                            f"{type(model.llm.model).__name__}", "use --format hf-blip2 for FlanT5 backends")
    drop_vision, drop_vpg = bool(model.vision.config.drop_cls), bool(getattr(model.vpg, "drop_cls", False))
    if drop_vision and drop_vpg:
        raise ExportRefused("CLS is dropped twice (vision drop_cls and VPG drop_cls)",
                            "LLaVA drops at most the CLS token; rebuild with one of them")
    if hasattr(model.vpg, "fc"):
        if not (isinstance(model.vpg.act, torch.nn.GELU) and model.vpg.act.approximate == "none"):
            raise ExportRefused(f"the mlp VPG's activation {model.vpg.act} is not LLaVA's exact GELU",
                                "rebuild the VPG with the default GELU")
        if model.vpg.output_dim != model.llm.embed_dim:
            raise ExportRefused(f"LLaVA's MLP is as wide as the LLM ({model.llm.embed_dim}), this mlp VPG is "
                                f"{model.vpg.output_dim} wide", f"rebuild it with hidden_size={model.llm.embed_dim}")
        return drop_vision or drop_vpg, "gelu"
    return drop_vision or drop_vpg, "linear"


def check(model: Any) -> tuple[bool, str]:
    """Every reason LLaVA cannot hold `model`, raised as ExportRefused; else (drop CLS?, projector activation)."""
    refuse_abstractor(model, FMT)
    layout = _check(model)
    refuse_project_in(model, FMT)
    return layout


def _projector_state(model: Any, act: str) -> dict[str, torch.Tensor]:
    proj = {k: v.detach() for k, v in model.projector.state_dict().items()}
    if act == "gelu":
        first = {k: v.detach() for k, v in model.vpg.fc.state_dict().items()}
        second = proj
    else:
        first = proj
        width = proj["weight"].shape[0]
        second = {"weight": torch.eye(width, dtype=proj["weight"].dtype),
                  "bias": torch.zeros(width, dtype=proj["bias"].dtype)}
    return {**prefixed("model.multi_modal_projector.linear_1", first),
            **prefixed("model.multi_modal_projector.linear_2", second)}


def _text_keys(state: dict[str, torch.Tensor], prefix: str, to_llava: bool) -> dict[str, torch.Tensor]:
    """CausalLM names (`model.…`, `lm_head.…`) ↔ LLaVA names (`model.language_model.…`, `lm_head.…`)."""
    ours, theirs = f"{prefix}.", "model.language_model."
    src, dst = (ours, theirs) if to_llava else (theirs, ours)
    return {(dst + k[len(src):] if k.startswith(src) else k): v for k, v in state.items()}


def export(model: Any, out: str | Path, lora: str | None, card: dict[str, Any] | None = None) -> ExportResult:
    """Write `model` as a stock LlavaForConditionalGeneration directory (+ LlavaProcessor)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor  # why: as above

    drop_cls, act = check(model)
    lm = model.llm.model
    # vpgtrans feeds `[image][BOS] text` for image-first templates; the tokenizer can only put BOS first, so
    # there the chat template writes BOS after the image and the tokenizer adds none.
    image_first = model.template.text.startswith(IMAGE_SLOT)
    part = llm_part(model, lora, FMT, add_bos=not image_first)
    # LLaVA ties lm_head to `language_model.embed_tokens`; LLMs keeping it elsewhere (OPT: decoder.embed_tokens)
    # ship an untied copy instead, which gives the same logits.
    tie = bool(getattr(lm.config, "tie_word_embeddings", False))
    part.config.tie_word_embeddings = tie and hasattr(getattr(lm, lm.base_model_prefix), "embed_tokens")
    if tie and not part.config.tie_word_embeddings:
        part.notes.append("the output embeddings are stored untied (LLaVA cannot tie them for this LLM)")
        for key in [k for k in part.state if k.startswith("lm_head.")]:
            part.state[key] = part.state[key].clone()  # its own storage, or save_pretrained drops it as tied
    if image_first:
        part.notes.append("the model was trained on [image][BOS] text: the tokenizer adds no BOS, the chat template "
                          "writes it after <image> (hand-written prompts must do the same)")
    vision = model.vision
    config = LlavaConfig(vision_config=vision.model.config.to_dict(), text_config=part.config.to_dict(),
                         image_token_index=part.image_id, image_seq_length=model.vpg.num_prompts(vision.num_tokens),
                         projector_hidden_act=act, vision_feature_layer=int(vision.config.layer),
                         vision_feature_select_strategy="default" if drop_cls else "full",
                         multimodal_projector_bias=True)
    config.tie_word_embeddings = part.config.tie_word_embeddings
    state = {**prefixed("model.vision_tower", vision.model), **_projector_state(model, act),
             **_text_keys(part.state, lm.base_model_prefix, True)}
    stock = assemble(LlavaForConditionalGeneration, config, state)
    improc = image_processor(vision)
    usage = Usage("LlavaForConditionalGeneration", chat_template(model, IMAGE_TOKEN, bos_after_image=image_first),
                  True, model.template.end)
    return write_export(Path(out), stock, part, model, lambda template: LlavaProcessor(
        image_processor=improc, tokenizer=part.tokenizer, patch_size=vision.model.config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1,
        chat_template=template), improc, usage, card)


def _vpg_from_projector(stock: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(VPG spec, VPG weights, projector weights) from LLaVA's Linear-act-Linear."""
    cfg = stock.config
    mm = stock.model.multi_modal_projector
    first = {k: v.detach() for k, v in mm.linear_1.state_dict().items()}
    second = {k: v.detach() for k, v in mm.linear_2.state_dict().items()}
    if not cfg.multimodal_projector_bias:
        raise CheckpointError("this LLaVA projector has no biases, the vpgtrans projector always has one",
                              "not importable as it is")
    if cfg.projector_hidden_act == "gelu":
        return {"name": "mlp", "hidden_size": first["weight"].shape[0]}, prefixed("fc", first), second
    if cfg.projector_hidden_act == "linear":
        eye = torch.eye(second["weight"].shape[0], dtype=second["weight"].dtype)
        if not (torch.equal(second["weight"], eye) and not second["bias"].any()):
            # Two linear maps in a row are one: fold linear_2 into linear_1.
            w2 = second["weight"]
            first = {"weight": w2 @ first["weight"], "bias": w2 @ first["bias"] + second["bias"]}
        return {"name": "linear"}, {}, first
    raise CheckpointError(f"LLaVA projector activation '{cfg.projector_hidden_act}' has no vpgtrans VPG",
                          "only gelu (mlp VPG) and linear (linear VPG) projectors import")


_INSTRUCTION = "\ue000instruction\ue000"  # a private-use sentinel no chat template writes by itself


def _source_chat_template(src: Path, tokenizer: Any) -> str | None:
    """The chat template a LLaVA directory ships (processor's chat_template.json/.jinja, else the tokenizer's)."""
    import json

    for name in ("chat_template.jinja", "chat_template.json"):
        path = src / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            return json.loads(text).get("chat_template") if name.endswith(".json") else text
    return getattr(tokenizer, "chat_template", None) or None


def template_from_source(src: Path, tokenizer: Any, image_token: str) -> tuple[dict[str, str], str | None]:
    """(vpgtrans template, a warning) read from the source's chat template: the prompt layout it was trained on.

    The template is rendered for one user turn (an image, then a sentinel instruction) with the generation prompt;
    the image token becomes the soft-prompt slot. The stock processor tokenizes that text with the tokenizer's
    special tokens, so a BOS the tokenizer adds leads it: with no text before the image, the template writes BOS
    itself (`<s><ImageHere>…`, BOS before the image); with text before it, vpgtrans puts BOS first anyway.
    """
    chat = _source_chat_template(src, tokenizer)
    plain = f"the imported model uses vpgtrans's plain layout '{IMAGE_SLOT}{{instruction}}'"
    if not chat:
        return {}, (f"{src} ships no chat template, so its prompt layout is unknown: {plain}; if it was trained on "
                    "another, set the template in the imported manifest.json (spec.template.text)")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _INSTRUCTION}]}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=chat, add_generation_prompt=True,
                                             tokenize=False)
    except Exception as exc:  # noqa: BLE001 - any template that cannot render one turn is reported, not fatal
        return {}, f"{src}'s chat template cannot render one user turn ({type(exc).__name__}: {exc}): {plain}"
    if text.count(image_token) != 1 or text.count(_INSTRUCTION) != 1:
        return {}, (f"{src}'s chat template does not write one {image_token} and one instruction for a user turn: "
                    f"{plain}")
    bos = tokenizer.bos_token or ""
    adds_bos = bool(bos) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
    if bos and text.startswith(bos):
        text, adds_bos = text[len(bos):], True
    before, after = text.split(image_token)
    if not before and bos and after.startswith(bos):  # `[image][BOS] text`: vpgtrans's own image-first layout
        after, adds_bos = after[len(bos):], False
    if adds_bos and not before:
        before = bos
    return {"text": before + IMAGE_SLOT + after.replace(_INSTRUCTION, "{instruction}")}, None


def import_(src: str | Path, out: str | Path) -> Path:
    """Turn a stock LlavaForConditionalGeneration directory into a vpgtrans model directory."""
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration  # why: as above
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    src, out = Path(src), Path(out)
    read_hf_config(src, ("llava",), FMT)
    info = read_export_info(src)
    stock = load_pretrained(LlavaForConditionalGeneration.from_pretrained, str(src), str(src), what=FMT).eval()
    cfg = stock.config
    tower = stock.model.vision_tower
    if not isinstance(tower, CLIPVisionModel):
        raise CheckpointError(f"{src}: vision tower {type(tower).__name__} has no vpgtrans vision component",
                              "only CLIP towers import")
    if not isinstance(cfg.vision_feature_layer, int):
        raise CheckpointError(f"{src}: features from several vision layers {cfg.vision_feature_layer}",
                              "vpgtrans vision components read one layer")
    lm_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg.text_config)]
    lm_state = {k: v for k, v in stock.state_dict().items() if k.startswith(("model.language_model.", "lm_head."))}
    lm = assemble(lm_cls, cfg.text_config, _text_keys(lm_state, lm_cls.base_model_prefix, False))
    lm.generation_config = stock.generation_config  # LLaVA's generate stops on the top-level config's eos
    tokenizer = restore_llm(src, info, lm)
    vpg_spec, vpg_state, proj_state = _vpg_from_projector(stock)
    old = info.get("spec") or {}
    drop_cls = cfg.vision_feature_select_strategy == "default"
    vision_spec = {"name": "clip-vit", "layer": int(cfg.vision_feature_layer), "dtype": dtype_name(tower)}
    if old.get("vpg", {}).get("name") == vpg_spec["name"] and old.get("vision", {}).get("drop_cls") == drop_cls:
        vision_spec["drop_cls"] = drop_cls  # keep the CLS choice where the original model made it
    else:
        vpg_spec["drop_cls"] = drop_cls
    template = old.get("template")
    if template is None:  # not a vpgtrans export: the layout comes from the source itself
        image_token = tokenizer.convert_ids_to_tokens(int(cfg.image_token_index))
        template, warning = template_from_source(src, tokenizer, image_token or IMAGE_TOKEN)
        if warning:  # on stderr, not as a Python warning: the CLI hides those unless --debug
            print(f"warning: {warning}", file=sys.stderr)
    with atomic_dir(out) as tmp:
        save_frozen_parts(tmp, tower, lm, tokenizer, preprocessor_settings(src))
        spec = {"vision": {**vision_spec, "path": str(tmp / "vision")}, "vpg": vpg_spec,
                "llm": {"name": detect_llm_component(str(tmp / "llm")), "path": str(tmp / "llm"),
                        "dtype": dtype_name(lm)},
                "template": template}
        del stock, lm, tower
        model = build_imported(spec, src)
        model.vpg.load_state_dict(vpg_state, strict=True)
        model.projector.load_state_dict(proj_state, strict=True)
        finish_import(model, tmp, out, extra={"imported_from": {"format": FMT, "path": str(src.resolve())}})
    return out
