"""Pieces every stock-transformers format shares: clean LLM weights (LoRA merged or set aside), the image
token, the processor's tokenizer, assembling a stock model without copying weights, and the export marker.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from vpgtrans_adapters.llm import stop_token_ids

from ..errors import CheckpointError, ConfigError
from ..checkpoint import atomic_dir, save_model
from ..lora import LORA_DIR, is_applied, load_adapter, save_adapter
from ..model import build_model
from ..names import load_pretrained
from .usage import generation_config, write_usage

IMAGE_TOKEN = "<image>"
# Written beside an export: what vpgtrans did to the model, so `vpgtrans import` can undo it exactly.
EXPORT_INFO = "vpgtrans_export.json"
# The LLM tokenizer as vpgtrans used it (before the image token and BOS/EOS template were added).
SOURCE_TOKENIZER = "vpgtrans_tokenizer"
LORA_MODES = ("merge", "peft")
IGNORE = -100


@dataclass
class ExportResult:
    """What an export wrote and what the user should know about it."""

    out: Path
    format: str
    image_token_id: int
    notes: list[str] = field(default_factory=list)


class ExportRefused(ConfigError):
    """The chosen format cannot represent this model."""


def refuse_abstractor(model: Any, fmt: str) -> None:
    """No stock transformers class holds mPLUG-Owl's visual abstractor: say so instead of naming another format."""
    if model.spec.vpg.get("name") == "abstractor":
        raise ExportRefused(f"{fmt} cannot hold this model: no stock transformers class holds a visual abstractor "
                            "(mPLUG-Owl's VPG)", "use the vpgtrans model directory itself (vpgtrans generate / "
                            "eval / lmms-eval --model vpgtrans)")


def refuse_project_in(model: Any, fmt: str) -> None:
    """Stock classes splice soft prompts as wide as the LLM's hidden size: OPT-350m's project_in layout is refused."""
    config = model.llm.model.config
    proj_dim = getattr(config, "word_embed_proj_dim", None)
    if proj_dim is not None and proj_dim != config.hidden_size:
        raise ExportRefused(f"{fmt} splices soft prompts of the LLM's hidden size ({config.hidden_size}) but this "
                            f"OPT reads {proj_dim}-wide input embeddings (project_in, the OPT-350m layout)",
                            "keep this model in the vpgtrans format (vpgtrans generate / eval); no stock "
                            "transformers class holds it")


def _lora_layers(lm: nn.Module) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer  # why: importing peft costs a second; only LoRA models get here

    return {name: mod for name, mod in lm.named_modules() if isinstance(mod, LoraLayer)}


def _clean_key(key: str) -> str | None:
    """A peft-wrapped parameter name as the plain transformers model names it (None: adapter weights)."""
    return None if "lora_" in key else key.replace(".base_layer.", ".")


def llm_state(model: Any, lora: str) -> dict[str, torch.Tensor]:
    """The LLM's weights under plain transformers names; with `lora="merge"` every LoRA delta is folded in.

    The model itself is left exactly as it was (each layer is merged by peft, read, and restored).
    """
    if lora not in LORA_MODES:
        raise ConfigError(f"unknown --lora mode {lora!r}", f"use one of {', '.join(LORA_MODES)}")
    lm = model.llm.model
    layers = _lora_layers(lm) if is_applied(model) else {}  # (importing peft costs a second)
    if any(getattr(m, "merged", False) for m in layers.values()):
        raise ConfigError("the LoRA adapter is already merged into the LLM weights in memory",
                          "unmerge it (peft `unmerge_adapter`) or reload the model before exporting")
    state: dict[str, torch.Tensor] = {}
    for key, value in lm.state_dict().items():
        clean = _clean_key(key)
        if clean is not None:
            state[clean] = value
    if lora == "merge":
        with torch.no_grad():
            for name, layer in layers.items():
                base = layer.get_base_layer()
                params = {p: getattr(base, p) for p in ("weight", "bias") if getattr(base, p, None) is not None}
                original = {p: v.detach().clone() for p, v in params.items()}
                layer.merge(safe_merge=True)
                try:
                    for pname, value in params.items():
                        state[f"{name}.{pname}"] = value.detach().clone()
                finally:
                    layer.unmerge()  # clears peft's merged flag; the copy below undoes its rounding
                    for pname, value in params.items():
                        value.copy_(original[pname])
    return state


def embedding_keys(lm: nn.Module) -> list[str]:
    """State-dict names of the input and output embedding matrices (all names of tied ones)."""
    wanted = {id(lm.get_input_embeddings().weight)}
    out = lm.get_output_embeddings()
    if out is not None:
        wanted.add(id(out.weight))
    names = [n for n, p in lm.named_parameters(remove_duplicate=False) if id(p) in wanted]
    return [n.replace(".base_layer.", ".") for n in names]


def grow_vocab(state: dict[str, torch.Tensor], keys: Sequence[str], rows: int) -> int:
    """Give every embedding matrix in `keys` at least `rows` rows; returns how many rows were added.

    New rows are the mean of the existing ones: the image token's input row is never looked up (the
    soft prompts replace it), and a mean output row keeps its logit ordinary rather than zero.
    """
    added = 0
    grown: dict[int, torch.Tensor] = {}
    for key in keys:
        value = state[key]
        if value.shape[0] >= rows:
            continue
        ptr = value.data_ptr()
        if ptr not in grown:  # tied matrices: grow once, share the result
            extra = value.float().mean(0, keepdim=True).to(value.dtype).expand(rows - value.shape[0], -1)
            grown[ptr] = torch.cat([value, extra])
        added = rows - value.shape[0]
        state[key] = grown[ptr]
    return added


def image_token_tokenizer(tokenizer: Any, decoder_only: bool, add_bos: bool = True) -> tuple[Any, int, list[str]]:
    """A copy of the LLM tokenizer with the `<image>` token, set to frame text as vpgtrans does.

    vpgtrans feeds `[soft prompts][BOS] text` (decoder-only) and `[soft prompts] text [EOS]` (T5); BLIP-2's
    processor puts the image tokens in front of whatever the tokenizer's own template makes, so the
    template must add BOS (resp. EOS) for both to build the same sequence. `add_bos=False`: the chat
    template writes BOS itself (after the image, where the tokenizer cannot put it).
    """
    from tokenizers.processors import TemplateProcessing  # why: these (and transformers) cost seconds to import
    from transformers.tokenization_utils_base import AddedToken

    notes: list[str] = []
    tok = copy.deepcopy(tokenizer)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    image_id = int(tok.convert_tokens_to_ids(IMAGE_TOKEN))
    # Decoder-only generation appends on the right: prompts of different lengths must be padded on the left.
    # T5's encoder uses relative positions, so the processor's image tokens must touch the text: pad right.
    tok.padding_side = tok.init_kwargs["padding_side"] = "left" if decoder_only else "right"
    special = (tok.bos_token if add_bos else None) if decoder_only else tok.eos_token
    flag = "add_bos_token" if decoder_only else "add_eos_token"
    if hasattr(tok, flag):  # saved in tokenizer_config.json: on reload it rebuilds the template from this flag
        setattr(tok, flag, special is not None)
        tok.init_kwargs[flag] = special is not None
    plain = tok("a", add_special_tokens=False).input_ids
    if special is None:
        want = plain
    else:
        sid = tok.convert_tokens_to_ids(special)
        want = [sid] + plain if decoder_only else plain + [sid]
    if tok("a", add_special_tokens=True).input_ids != want:
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            notes.append(f"the tokenizer cannot be told how to frame text ({special or 'no BOS'}); build the "
                         "ids yourself")
        elif special is None:
            backend.post_processor = TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
        else:
            single, pair = (f"{special} $A", f"{special} $A $B") if decoder_only else (f"$A {special}",
                                                                                        f"$A $B {special}")
            backend.post_processor = TemplateProcessing(single=single, pair=pair, special_tokens=[(special, sid)])
    return tok, image_id, notes


def image_processor(vision: Any) -> Any:
    """An image processor doing what the vision encoder's preprocess does (size, crop, statistics, bicubic)."""
    from transformers import BlipImageProcessor, CLIPImageProcessor  # why: importing transformers costs seconds

    h, w = vision.input_hw
    crop = getattr(vision, "crop", None)
    if crop is not None:
        return CLIPImageProcessor(size={"shortest_edge": crop[0]}, crop_size={"height": h, "width": w},
                                  do_center_crop=True, image_mean=list(vision.mean), image_std=list(vision.std),
                                  resample=3, do_convert_rgb=True)
    return BlipImageProcessor(size={"height": h, "width": w}, image_mean=list(vision.mean),
                              image_std=list(vision.std), resample=3, do_convert_rgb=True)


def assemble(model_cls: Any, config: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    """Instantiate a stock model on the meta device and hand it our tensors (no copy, no random init)."""
    with torch.device("meta"):
        target = model_cls(config)
    expected = set(target.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{model_cls.__name__} layout mismatch: {len(missing)} missing (e.g. {missing[:3]}), "
                              f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})",
                              "this transformers version lays the model out differently; please report it")
    target.load_state_dict(state, strict=True, assign=True)
    target.tie_weights()
    return target.eval()


def prefixed(prefix: str, module: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module's (or state dict's) tensors under `prefix.`."""
    items = module.items() if isinstance(module, dict) else module.state_dict().items()
    return {f"{prefix}.{k}": v.detach() for k, v in items}


@dataclass
class LLMPart:
    """The LLM side of an export: tokenizer with the image token, plain weights, config, what to tell the user."""

    tokenizer: Any
    image_id: int
    state: dict[str, torch.Tensor]
    config: Any
    lora: str | None
    info: dict[str, Any]
    notes: list[str]


def llm_part(model: Any, lora: str | None, fmt: str, add_bos: bool = True) -> LLMPart:
    """Prepare the LLM for a stock checkpoint: image token (growing the vocabulary if needed), LoRA handled."""

    lm = model.llm.model
    refuse_project_in(model, fmt)
    lora = (lora or "merge") if is_applied(model) else None
    tok, image_id, notes = image_token_tokenizer(model.llm.tokenizer, not lm.config.is_encoder_decoder, add_bos)
    state = llm_state(model, lora or "merge")
    rows = lm.get_input_embeddings().weight.shape[0]
    added = grow_vocab(state, embedding_keys(lm), image_id + 1)
    if added:
        notes.append(f"the LLM vocabulary grew by {added} row(s) for the image token (id {image_id}); that input row "
                     "is never read (the soft prompts replace it)")
    config = copy.deepcopy(lm.config)
    config.vocab_size = max(int(config.vocab_size), image_id + 1)
    # The stock BLIP-2 generate reads the language model's own config (not generation_config.json): the stop ids
    # go there. T5 has no BOS; BLIP-2's image-only call puts `bos_token_id` after the image, where vpgtrans has EOS.
    eos = stop_token_ids(model.llm)
    config.eos_token_id = eos[0] if len(eos) == 1 else eos
    config.pad_token_id = tok.pad_token_id
    if lm.config.is_encoder_decoder:
        config.bos_token_id = tok.eos_token_id
    info = {"format": fmt, "image_token_id": image_id, "vocab_rows": rows, "vocab_size": int(lm.config.vocab_size),
            "added_rows": added, "lora": lora, "spec": asdict(model.spec)}
    return LLMPart(tok, image_id, state, config, lora, info, notes)


def write_export(out: Path, stock: nn.Module, part: LLMPart, model: Any, make_processor: Any,
                 improc: Any, usage: Any, card: dict[str, Any] | None = None) -> ExportResult:
    """Save the stock model with what its stock call needs (processor, generation config, chat template, card)."""
    notes = part.notes
    card = card or {}
    part.tokenizer.chat_template = usage.chat_template
    generation_config(stock, part)
    with atomic_dir(out) as tmp:
        stock.save_pretrained(str(tmp))
        try:
            make_processor(usage.chat_template).save_pretrained(str(tmp))
        except Exception as exc:  # noqa: BLE001 - the model is still useful without a processor
            notes.append(f"no processor written ({type(exc).__name__}: {exc}); the tokenizer and image processor "
                         "are saved separately")
            part.tokenizer.save_pretrained(str(tmp))
            improc.save_pretrained(str(tmp))
        if part.lora == "peft":
            save_adapter(model, tmp / LORA_DIR)
            notes.append(f"LoRA adapter left unmerged in {LORA_DIR}/: load it with "
                         f"PeftModel.from_pretrained(<stock model's language model>, '<dir>/{LORA_DIR}')")
        elif part.lora == "merge":
            notes.append("LoRA adapter merged into the LLM weights")
        (tmp / EXPORT_INFO).write_text(json.dumps(part.info, indent=2, default=str))
        write_usage(tmp, model, usage, part.info["format"], card.get("manifest"), notes, card.get("scores"))
        model.llm.tokenizer.save_pretrained(str(tmp / SOURCE_TOKENIZER))
    return ExportResult(out=out, format=part.info["format"], image_token_id=part.image_id, notes=notes)


def check_out(out: str | Path, fmt: str, reads: dict[str, Any], *, force: bool, kind: str = "export") -> None:
    """Before any work: refuse an --out holding what is read, or files that are not an earlier `kind` to `fmt`.

    An earlier export (import) to the same format is replaced atomically, as is anything else with --force;
    --force never replaces what the command reads.
    """
    from ..claim import check_writable, refuse_overlap

    out = Path(out).expanduser()
    refuse_overlap(out, reads)
    check_writable(out)
    if force or not out.is_dir() or not any(out.iterdir()):
        return
    held = _written_format(out, kind)
    if held == fmt:
        return
    holds = (f"an {kind} {'to' if kind == 'export' else 'from'} {held}" if held
             else f"files that are not a vpgtrans {kind}")
    raise ConfigError(f"--out {out} is not empty: it holds {holds}",
                      "choose another --out, or pass --force to replace it (everything in it is deleted)")


def _written_format(out: Path, kind: str) -> str | None:
    """The format an earlier export (EXPORT_INFO) or import (manifest's imported_from) wrote into `out`."""
    try:
        if kind == "export":
            return json.loads((out / EXPORT_INFO).read_text())["format"]
        return json.loads((out / "manifest.json").read_text())["imported_from"]["format"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def model_reads(model_dir: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """What exporting a model reads: its directory and the local files its spec points at (vision, LLM, ...)."""
    reads: dict[str, Any] = {"model": model_dir}
    for part, cfg in (manifest.get("spec") or {}).items():
        for key in ("path", "tokenizer", "init_from"):
            value = cfg.get(key) if isinstance(cfg, dict) else None
            if isinstance(value, str) and Path(value).expanduser().is_absolute():
                reads[f"{part} {key} of the model"] = value
    return reads


def restore_llm(src: Path, info: dict[str, Any], lm: nn.Module) -> Any:
    """Undo what an export did to the LLM (extra vocabulary rows); returns the tokenizer vpgtrans used."""
    from transformers import AutoTokenizer  # why: as above

    if info.get("added_rows"):
        lm.resize_token_embeddings(int(info["vocab_rows"]))
        lm.config.vocab_size = int(info["vocab_size"])
    tok_dir = src / SOURCE_TOKENIZER if (src / SOURCE_TOKENIZER).is_dir() else src
    return load_pretrained(AutoTokenizer.from_pretrained, str(tok_dir), str(tok_dir), what="LLM tokenizer")


def read_export_info(src: Path) -> dict[str, Any]:
    """The marker an export left (empty for directories vpgtrans did not write)."""
    path = src / EXPORT_INFO
    return json.loads(path.read_text()) if path.exists() else {}


def adapter_settings(src: Path) -> dict[str, Any] | None:
    """The `lora:` spec of a peft LoRA adapter shipped beside a stock checkpoint (`--lora peft`), if any."""
    path = src / LORA_DIR / "adapter_config.json"
    if not path.exists():
        return None
    cfg = json.loads(path.read_text())
    targets = cfg.get("target_modules")
    if cfg.get("peft_type", "LORA") != "LORA" or not isinstance(targets, list):
        raise CheckpointError(f"{path} is not a LoRA adapter with a list of target modules",
                              "merge it into the LLM before importing (peft merge_and_unload)")
    return {"r": cfg["r"], "alpha": cfg["lora_alpha"], "dropout": cfg.get("lora_dropout", 0.0),
            "target_modules": sorted(targets), "bias": cfg.get("bias", "none")}


def build_imported(spec: dict[str, Any], src: Path) -> Any:
    """Build the imported model (with the shipped LoRA adapter, if any, loaded into its LLM)."""
    spec = {**spec, "lora": adapter_settings(src)}
    model = build_model(spec)
    if spec["lora"]:
        load_adapter(model, src / LORA_DIR)
    return model


def finish_import(model: Any, tmp: Path, final: Path, extra: dict[str, Any]) -> None:
    """Save the assembled model's manifest + trainable weights into `tmp`, its paths pointing into `final`."""

    for kind in ("vision", "vpg", "llm"):
        part = getattr(model.spec, kind)
        for key, value in part.items():
            if isinstance(value, str) and value.startswith(str(tmp)):
                part[key] = str(final.resolve()) + value[len(str(tmp)):]
    staged = save_model(model, tmp / ".model", extra=extra)
    for f in staged.iterdir():
        shutil.move(str(f), str(tmp / f.name))
    staged.rmdir()


def dtype_name(module: nn.Module) -> str:
    """float32 / bfloat16 / float16 of a module's first floating parameter."""
    for p in module.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "float32"
