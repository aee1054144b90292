"""Memory plan of a training run: the estimated peak memory per device, before any weight is loaded.

Weights, gradients and optimizer state are counted exactly from the architecture (its `config.json`, or the
sizes of the paper's models when only a name is given). Activations are *simulated*: the VPG, projector and a
1- and a 2-layer copy of the LLM run one forward and backward on fake tensors (shapes only, no memory, no
weights), every tensor alive at each moment is summed, and the LLM's per-layer share is extrapolated to its
depth — with and without activation checkpointing.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .resources import (  # noqa: F401 - the planner's helpers, and names callers import from here
    ASSUMED_VISION_FLOPS, CachePlan, _bytes, _duration, _flops, available_memory, dtype_bytes, free_disk)

GIB = 2 ** 30

# Sizes of the papers' models (their published config.json), used when the weights are not on disk.
KNOWN_LLMS: dict[str, dict[str, Any]] = {
    "opt-1.3b": dict(model_type="opt", hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
                     vocab_size=50272, word_embed_proj_dim=2048),
    "opt-2.7b": dict(model_type="opt", hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                     vocab_size=50272, word_embed_proj_dim=2560),
    "opt-6.7b": dict(model_type="opt", hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32,
                     vocab_size=50272, word_embed_proj_dim=4096),
    "llama-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, vocab_size=32000),
    "llama-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, vocab_size=32000),
    "flant5-xl": dict(model_type="t5", d_model=2048, d_ff=5120, d_kv=64, num_layers=24, num_heads=32,
                      vocab_size=32128, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0),
    "flant5-xxl": dict(model_type="t5", d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
                       vocab_size=32128, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0),
}
KNOWN_LLMS["vicuna-7b"] = KNOWN_LLMS["llama-7b"]
KNOWN_LLMS["vicuna-13b"] = KNOWN_LLMS["llama-13b"]
KNOWN_VISION: dict[str, dict[str, Any]] = {
    "eva-vit-g": dict(model_type="blip_2_vision_model", hidden_size=1408, intermediate_size=6144,
                      num_hidden_layers=39, num_attention_heads=16, image_size=224, patch_size=14),
    "clip-vit-l": dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                       num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=14),
    "clip-vit-l-336": dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14),
}
_VISION_COMPONENTS = {"blip2-vit": "blip_2_vision_model", "clip-vit": "clip_vision_model"}


class PlanError(Exception):
    """The run cannot be planned (an architecture is unknown); the message says what is needed."""


# --- measuring ---------------------------------------------------------------------------------------
class TensorMemoryTracker(TorchDispatchMode):
    """Live bytes of every tensor storage created inside the block (and of `existing`), and their peak.

    The CPU analogue of `torch.cuda.max_memory_allocated`: it counts tensors, not allocator slack.
    It also works under FakeTensorMode, where it measures what a real run would hold.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        for t in existing:
            self._add(t)
        self.baseline = self.live

    def _add(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        n = storage.nbytes()
        self._seen[storage] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._add(t)
        return out


def saved_activation_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensors autograd saves for the backward pass while `fn` runs (minus `exclude`)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# --- architectures -----------------------------------------------------------------------------------
def _hf_config(path: str, aliases: dict[str, str], known: dict[str, dict[str, Any]], what: str,
               sub: str | None = None) -> tuple[Any, str | None]:
    """(transformers config, note when sizes were assumed from the name) for a model path or alias."""
    from transformers import AutoConfig

    from .names import resolve

    try:
        target = resolve(path, aliases)
    except Exception as exc:  # e.g. a world model that is not built: fall back to the name table
        target = None
        reason = str(exc)
    else:
        reason = "weights not on disk"
    if target and not target.endswith(".gguf"):
        try:
            cfg = AutoConfig.from_pretrained(target, local_files_only=True, trust_remote_code=False)
            return (getattr(cfg, sub, None) or cfg) if sub else cfg, None
        except (OSError, ValueError):
            pass
    if path in known:
        entry = dict(known[path])
        return AutoConfig.for_model(entry.pop("model_type"), **entry), f"{what} {path}: sizes assumed from the name " \
                                                                       f"({reason})"
    raise PlanError(f"no config.json for {what} '{path}' on disk and vpgtrans does not know its size "
                    f"(known: {', '.join(sorted(known))})")


def _with_layers(cfg: Any, n: int) -> Any:
    out = copy.deepcopy(cfg)
    if getattr(out, "is_encoder_decoder", False):
        out.num_layers = out.num_decoder_layers = n
    else:
        out.num_hidden_layers = n
    return out


def _depth(cfg: Any) -> int:
    return int(getattr(cfg, "num_layers", None) or cfg.num_hidden_layers) if getattr(
        cfg, "is_encoder_decoder", False) else int(cfg.num_hidden_layers)


def _count(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


# --- the plan ----------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """Estimated peak bytes per device by category, and what the estimate assumed."""

    parts: dict[str, int]
    activations: dict[bool, int]
    checkpointing: bool
    llm_name: str
    llm_params: int
    llm_dtype: str
    details: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    host_features: int = 0

    @property
    def total(self) -> int:
        """Estimated peak bytes on one device."""
        return sum(self.parts.values())

    def total_with(self, checkpointing: bool) -> int:
        """The peak with checkpointing switched on or off."""
        return self.total - self.parts["activations"] + self.activations[checkpointing]

    def lines(self, capacity: int | None = None, where: str = "") -> list[str]:
        """The plan as console lines, ending with whether it fits `capacity` bytes."""
        out = ["memory  estimated peak per device (an estimate, not a measurement):"]
        for key, value in self.parts.items():
            out.append(f"  {key:<20}{_size(value):>13}  {self.details.get(key, '')}".rstrip())
        other = "" if (not self.checkpointing) not in self.activations else (
            f"; {'off' if self.checkpointing else 'on'}: {_size(self.total_with(not self.checkpointing))}")
        out.append(f"  {'total':<20}{_size(self.total):>13}  (checkpointing "
                   f"{'on' if self.checkpointing else 'off'}{other})")
        if self.host_features:
            out.append(f"  feature cache       {_size(self.host_features):>13} on disk / host memory, not on the device")
        out += [f"  note: {n}" for n in self.notes]
        if capacity is not None:
            verdict = "fits" if self.total <= capacity else "does NOT fit"
            out.append(f"  {verdict} {where} ({capacity / GIB:.1f} GiB)")
        return out


def _size(n: int) -> str:
    """GiB for real models, MiB below 1 GiB (the world's tiny models)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2 ** 20:.1f} MiB"


def estimate(spec: Any, train: Any, data: Any = None, *, n_examples: int = 0, checkpointing: bool | None = None,
             text_len: int | None = None, processes: int = 1, sharded: bool = False,
             modes: tuple[bool, ...] = (False, True)) -> MemoryPlan:
    """Estimate the peak memory of one device training `spec` with `train` (a TrainConfig) on `data`.

    `modes`: the checkpointing settings whose activations are simulated (both by default, for the printout).
    """
    from .model import ModelSpec

    spec = ModelSpec(**spec) if isinstance(spec, dict) else spec
    notes: list[str] = []
    llm_entry = dict(spec.llm)
    llm_cfg, note = _hf_config(llm_entry.get("path", "opt-2.7b"), _aliases("LLM"), KNOWN_LLMS, "LLM")
    notes += [note] if note else []
    llm_cfg = getattr(llm_cfg, "text_config", None) or llm_cfg
    vis_entry = dict(spec.vision)
    n_vis, width, vision_params, note = vision_shape(spec)
    notes += [note] if note else []
    llm_dtype = llm_entry.get("dtype", "float32")
    vis_dtype = vis_entry.get("dtype", "float32")

    max_text = text_len if text_len is not None else int(train.max_text_len)
    template = _template_tokens(spec, data, llm_entry.get("path", ""))
    batch = int(train.batch_size)
    on = bool(train.gradient_checkpointing if checkpointing is None else checkpointing)
    mp = getattr(train, "mixed_precision", "no")
    modes = tuple(sorted(set(modes) | {on}))
    sim = _simulate(spec, llm_cfg, llm_dtype, width, n_vis, batch, template, max_text, mp,
                    trainable=list(train.trainable), modes=modes)
    llm_params = sim["llm_params"]
    lora = sim["lora_params"]
    trainable = sim["trainable_params"] + lora
    frozen_llm = (llm_params - lora) * dtype_bytes(llm_dtype)
    frozen = frozen_llm + vision_params * dtype_bytes(vis_dtype) + sim["frozen_vpg_params"] * 4
    shard = processes if sharded and processes > 1 else 1
    feats_dtype = getattr(data, "cache_dtype", "float32") if data is not None else "float32"
    batch_feats = batch * n_vis * width * dtype_bytes(feats_dtype)
    parts = {"frozen weights": frozen // shard, "trainable weights": trainable * 4 // shard,
             "gradients": trainable * 4 // shard, "optimizer state": trainable * 8 // shard,
             "activations": sim["activations"][on], "features (batch)": batch_feats}
    depth = _depth(llm_cfg)
    details = {
        "frozen weights": f"LLM {llm_params - lora:,} @ {llm_dtype}, vision {vision_params:,} @ {vis_dtype}",
        "trainable weights": f"{trainable:,} params @ float32 (VPG + projector{' + LoRA' if lora else ''})",
        "gradients": "float32", "optimizer state": "AdamW: 2 × float32 per trainable parameter",
        "activations": f"batch {batch} × {sim['seq']} LLM tokens, {depth} layers, checkpointing "
                       + " / ".join(f"{'on' if m else 'off'} {_size(v)}" for m, v in sim["activations"].items()),
        "features (batch)": f"{batch} × {n_vis} × {width} @ {feats_dtype}",
    }
    if shard > 1:
        notes.append(f"weights, gradients and optimizer state sharded over {shard} processes (FSDP); the "
                     f"layers being computed are gathered in full on top (not included)")
    if torch.cuda.is_available() or mp != "no":
        notes.append("on a GPU add ~0.5-1 GiB for the CUDA context and allocator slack (not included)")
    host = n_examples * n_vis * width * dtype_bytes(feats_dtype)
    return MemoryPlan(parts, sim["activations"], on, llm_entry.get("path", "?"), llm_params, llm_dtype, details,
                      notes, host)


def _aliases(kind: str) -> dict[str, str]:
    from .names import LLM_ALIASES, VISION_ALIASES

    return LLM_ALIASES if kind == "LLM" else VISION_ALIASES


def vision_shape(spec: Any) -> tuple[int, int, int, str | None]:
    """(tokens per image, feature width, parameters, note) of the spec's vision encoder, from its config."""
    vis_entry = dict(spec.vision)
    vcfg, note = _hf_config(vis_entry.get("path", "eva-vit-g"), _aliases("vision"), KNOWN_VISION,
                            "vision encoder", sub="vision_config")
    size = int(vcfg.image_size if isinstance(vcfg.image_size, int) else vcfg.image_size[0])
    patch = int(vcfg.patch_size if isinstance(vcfg.patch_size, int) else vcfg.patch_size[0])
    n_vis = (size // patch) ** 2 + (0 if vis_entry.get("drop_cls") else 1)
    return n_vis, int(vcfg.hidden_size), _vision_params(vcfg), note


def _vision_params(vcfg: Any) -> int:
    from transformers import AutoModel, Blip2VisionModel, CLIPVisionModel

    classes = {"blip_2_vision_model": Blip2VisionModel, "clip_vision_model": CLIPVisionModel}
    with torch.device("meta"):
        cls = classes.get(vcfg.model_type)
        return _count(cls(vcfg) if cls else AutoModel.from_config(vcfg, trust_remote_code=False))


def _template_tokens(spec: Any, data: Any, llm_path: str) -> int:
    """Tokens of the text around the soft prompts (longest instruction): the tokenizer's count when on disk."""
    from .model import Template

    instructions = list(getattr(data, "instructions", []) or []) + [getattr(data, "prompt", "") or ""]
    instruction = max(instructions, key=len)
    sample = Template(**spec.template).sample(instruction)
    text = sample.before + sample.after
    try:
        from transformers import AutoTokenizer

        from .names import LLM_ALIASES, resolve

        tok = AutoTokenizer.from_pretrained(resolve(llm_path, LLM_ALIASES), local_files_only=True,
                                            trust_remote_code=False)
        return len(tok(text, add_special_tokens=False).input_ids) + 2
    except Exception:  # no tokenizer on disk: ~4 characters per token
        return math.ceil(len(text) / 4) + 2


def _simulate(spec: Any, llm_cfg: Any, llm_dtype: str, width: int, n_vis: int, batch: int, template: int,
              max_text: int, mixed_precision: str, trainable: list[str], modes: tuple[bool, ...]) -> dict[str, Any]:
    """Fake-tensor forward + backward of VPG + projector + a 1- and 2-layer LLM; extrapolate to full depth."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    depth = _depth(llm_cfg)
    runs = {}
    for on in modes:
        for layers in (1, 2):
            with FakeTensorMode(allow_non_fake_inputs=True):
                runs[on, layers] = _step(spec, _with_layers(llm_cfg, layers), llm_dtype, width, n_vis, batch,
                                         template, max_text, mixed_precision, trainable, on)
    one, two = runs[modes[0], 1], runs[modes[0], 2]
    out = dict(one)
    out["llm_params"] = one["llm_params"] + (depth - 1) * (two["llm_params"] - one["llm_params"])
    out["lora_params"] = one["lora_params"] + (depth - 1) * (two["lora_params"] - one["lora_params"])
    out["activations"] = {on: runs[on, 1]["peak"] + (depth - 1) * (runs[on, 2]["peak"] - runs[on, 1]["peak"])
                          for on in modes}
    return out


def _step(spec: Any, cfg: Any, llm_dtype: str, width: int, n_vis: int, batch: int, template: int, max_text: int,
          mixed_precision: str, trainable: list[str], checkpointing: bool) -> dict[str, Any]:
    """One fake training step; `peak` = most bytes alive beyond weights, gradients and optimizer state."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from .model import checkpoint_layers
    from .registry import get as get_component

    name, vcfg = spec.part("vpg")
    vcfg = {k: v for k, v in vcfg.items() if k not in ("init_from", "tokenizer")}
    vcfg["vision_width"] = width
    component = get_component("vpg", name).component
    vpg = component.build(component.make_config(vcfg))
    vpg.requires_grad_("vpg" in trainable)
    enc_dec = bool(getattr(cfg, "is_encoder_decoder", False))
    cls = AutoModelForSeq2SeqLM if enc_dec else AutoModelForCausalLM
    kw = {"attn_implementation": spec.llm.get("attn_implementation") or "sdpa"} if not enc_dec else {}
    llm = cls.from_config(cfg, dtype=getattr(torch, llm_dtype), trust_remote_code=False, **kw)
    llm.requires_grad_(False).eval()
    lora = 0
    if spec.lora:
        from peft import LoraConfig, inject_adapter_in_model

        from .lora import default_targets, settings

        from unittest import mock

        opts = settings(spec.lora)
        targets = list(opts.target_modules) if opts.target_modules else default_targets(llm)
        # peft moves each new module to its base layer's device with .to(), which fake tensors cannot swap;
        # they all sit on the one fake device already, and peft keeps adapters in float32 anyway.
        with mock.patch.object(torch.nn.Module, "to", lambda self, *a, **k: self):
            inject_adapter_in_model(LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                                               target_modules=targets, bias=opts.bias), llm)
        lora = _count(llm, trainable=True)
    checkpoint_layers(llm, checkpointing)
    hidden = llm.get_input_embeddings().embedding_dim
    projector = torch.nn.Linear(vpg.output_dim, hidden)
    projector.requires_grad_("projector" in trainable)
    params = [p for m in (vpg, projector, llm) for p in m.parameters()]
    feats = torch.empty(batch, n_vis, width)
    n_prompts = vpg.num_prompts(n_vis)
    seq = n_prompts + template + (0 if enc_dec else max_text)
    ids = torch.zeros(batch, seq, dtype=torch.long)
    soft = torch.zeros(batch, seq, dtype=torch.bool)
    soft[:, :n_prompts] = True
    labels = torch.zeros(batch, max_text + 1 if enc_dec else seq, dtype=torch.long)
    # CPU autocast stands in for CUDA's: both run matmuls in the low precision and keep their inputs for backward.
    amp = (torch.autocast("cpu", dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)
           if mixed_precision in ("bf16", "fp16") else contextlib.nullcontext())
    tracker = TensorMemoryTracker(existing=params)
    with tracker:
        with amp:
            prompts = projector(vpg(feats))
            embeds = llm.get_input_embeddings()(ids)
            embeds = embeds.masked_scatter(soft.unsqueeze(-1), prompts.to(embeds.dtype).reshape(-1, hidden))
            # Like the backend, keep only the loss: the logits are not held through the backward pass.
            loss = llm(inputs_embeds=embeds, attention_mask=torch.ones(batch, seq, dtype=torch.long), labels=labels,
                       use_cache=False).loss
        loss.backward()
        del loss, prompts, embeds
    trained = [p for p in params if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trained)
    return {"peak": max(tracker.peak - tracker.baseline - grads, 0), "seq": seq,
            "llm_params": _count(llm), "lora_params": lora,
            "trainable_params": _count(vpg, True) + _count(projector, True),
            "frozen_vpg_params": _count(vpg, False) + _count(projector, False)}


# --- the console and the early refusal ---------------------------------------------------------------
def _llm_bytes_roughly(spec: Any) -> int:
    """The frozen LLM's weight bytes from its config alone (12·h² per layer + embeddings), no simulation."""
    entry = dict(spec.llm) if not isinstance(spec, dict) else dict(spec["llm"])
    cfg, _ = _hf_config(entry.get("path", "opt-2.7b"), _aliases("LLM"), KNOWN_LLMS, "LLM")
    cfg = getattr(cfg, "text_config", None) or cfg
    h = int(getattr(cfg, "hidden_size", None) or cfg.d_model)
    params = 12 * _depth(cfg) * h * h * (2 if getattr(cfg, "is_encoder_decoder", False) else 1)
    return (params + 2 * int(cfg.vocab_size) * h) * dtype_bytes(entry.get("dtype", "float32"))


def plan_recipe(recipe: Any, n_examples: int = 0, **kw: Any) -> MemoryPlan:
    """The memory plan of a recipe's run (processes taken from the launcher's WORLD_SIZE)."""
    from .train.fsdp import fsdp_requested

    kw.setdefault("processes", int(os.environ.get("WORLD_SIZE", "1")))
    kw.setdefault("sharded", fsdp_requested(kw["processes"]))
    return estimate(recipe.model, recipe.train, recipe.data, n_examples=n_examples, **kw)


def print_memory_plan(recipe: Any, n_examples: int = 0, echo: Callable[[str], None] = print) -> MemoryPlan | None:
    """Print the data path (cache or on the fly), then the memory plan and whether it fits this machine's device."""
    for line in data_plan_lines(recipe, n_examples):
        echo(line)
    try:
        plan = plan_recipe(recipe, n_examples)
    except PlanError as exc:
        echo(f"memory  not estimated: {exc}")
        return None
    except Exception as exc:  # noqa: BLE001 - a component the simulation cannot build must not stop a dry run
        echo(f"memory  not estimated: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None
    device, free = available_memory()
    for line in plan.lines(free, f"in the free memory of this {device}"):
        echo(line)
    return plan


def check_run_fits(recipe: Any, n_examples: int = 0) -> None:
    """Refuse in one line, before any weight loads, a run whose estimated peak exceeds the device's free memory."""
    from .errors import TrainingError

    if os.environ.get("VPGTRANS_SKIP_MEMORY_CHECK") == "1":
        return
    device, free = available_memory()
    if free is None:
        return
    try:
        if _llm_bytes_roughly(recipe.model) * 100 < free:
            return  # an LLM under 1% of the free memory: skip the few seconds of simulation
        plan = plan_recipe(recipe, n_examples, modes=(bool(recipe.train.gradient_checkpointing),))
    except Exception:  # noqa: BLE001 - an estimate we cannot make must never stop a run
        return
    if plan.total <= free:
        return
    biggest = sorted(((v, k) for k, v in plan.parts.items()), reverse=True)[:2]
    split = ", ".join(f"{k} {v / GIB:.1f}" for v, k in biggest)
    hint = "" if plan.checkpointing else "train.gradient_checkpointing=true, "
    raise TrainingError(f"LLM {plan.llm_name} needs ~{plan.llm_params * dtype_bytes(plan.llm_dtype) / GIB:.1f} GiB "
                        f"at dtype {plan.llm_dtype} and the whole run ~{plan.total / GIB:.1f} GiB ({split}) but the "
                        f"{device} has {free / GIB:.1f} GiB free",
                        f"lower train.batch_size, set {hint}model.llm.dtype=bfloat16, or use a bigger device "
                        f"(`--dry-run` prints the plan; VPGTRANS_SKIP_MEMORY_CHECK=1 skips this check)")


def cache_plan(data: Any, images: int, tokens: int, width: int, vision_params: int) -> CachePlan:
    """The cache plan of `images` distinct images for a data config (its cache_dir and cache_dtype)."""
    from .data.cache import default_cache_root

    root = str(data.cache_dir or default_cache_root())
    return CachePlan(images, tokens, width, data.cache_dtype, vision_params, root, free_disk(root))


def _distinct_images(data: Any, n_examples: int) -> tuple[int, bool]:
    """(distinct images of the training split, known): read from the records, else the example count."""
    from .data import load_records

    try:
        records = load_records(data, "train")
        return len({(r.get("archive"), r["image"]) for r in records}), True
    except Exception:  # noqa: BLE001 - data absent at plan time: the plan still prints, from the count given
        return n_examples, False


def data_plan_lines(recipe: Any, n_examples: int = 0) -> list[str]:
    """The plan's data lines: the feature cache's disk and pre-pass when it is on; else how images are read."""
    from .data.streaming import streams

    data = recipe.data
    try:
        streamed = streams(data)
    except Exception:  # noqa: BLE001 - an unreadable data path is reported by whoever reads it
        streamed = False
    augment = ("the official train transform (random resized crop "
               f"{data.crop_scale[0]:g}-{data.crop_scale[1]:g}, bicubic, "
               + ("flip)" if data.flip else "no flip)")) if data.augment else "no augmentation"
    if streamed:
        lines = [f"data    streamed from webdataset shards (shuffle buffer {data.shuffle_buffer}), images encoded "
                 f"on the fly on the training device, {augment}; no cache"]
        try:  # the shard counts are remembered by now: naming the sources costs nothing
            from .data import load_records

            lines.append(f"        {load_records(data, 'train').describe()}")
        except Exception:  # noqa: BLE001 - unreadable shards are reported by whoever reads them
            pass
        return lines
    try:
        tokens, width, params, _ = vision_shape(recipe.model)
    except Exception as exc:  # noqa: BLE001 - an unknown encoder: the memory plan below says why
        return [f"data    feature cache {'on' if data.feature_cache else 'off'} (size not estimated: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"]
    images, known = _distinct_images(data, n_examples) if data.feature_cache else (n_examples, False)
    plan = cache_plan(data, images, tokens, width, params)
    count = "" if known else " (one per example: distinct images not counted)"
    if not images:  # no data to count yet: the cost per image is all the plan can say
        per = (f"{tokens} tokens × {width} × {data.cache_dtype} = {_bytes(plan.per_image)} per image, "
               f"{_flops(2.0 * params * tokens)} to encode it")
        state = "on" if data.feature_cache else "off (images encoded on the fly on the training device, " + augment + ")"
        return [f"data    feature cache {state}; its size is not known until the data is there: {per}"]
    if not data.feature_cache:
        return [f"data    images encoded on the fly on the training device every step, {augment}; a feature "
                f"cache would need {_bytes(plan.need)} on disk for {images:,} images{count} (data.feature_cache=true)"]
    lines = [f"data    feature cache on: {plan.size_line()}{count}"
             + ("" if plan.fits else " — does NOT fit: data.feature_cache=false streams instead"),
             f"        pre-pass (once per encoder, reused later): {plan.pre_pass()}"]
    if data.augment:
        lines.append("        note: data.augment is off while features are cached (they are of the plain image); "
                     "data.feature_cache=false trains on the official transform")
    return lines
