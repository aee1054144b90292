"""Surrogate LLMs: the target's embeddings + first K decoder layers + final norm + LM head (docs/design.md#surrogates).

A vision adapter trained against a surrogate writes soft prompts into the target's own embedding space,
so it grafts onto the full LLM with an identity converter (zero-shot graft, arXiv 2505.22664) and needs
only brief fine-tuning there. The surrogate is a plain Hugging Face causal-LM directory (config.json,
model.safetensors, tokenizer) that `AutoModelForCausalLM.from_pretrained` loads; `surrogate.json` and the
config's `surrogate_of` field record where it came from. Optional healing distils the full LLM's
next-token distribution into the surrogate's top decoder layer and final norm on the user's text.

With `last_layers` L > 0 the surrogate is the paper's: layers 0..K-1, then layer K as a *translator* that
stands in for the bypassed middle, then the target's last L layers. The last layers read the residual stream
the way the full LLM does, so what a VPG learns against them is what the full LLM's top reads; healing then
trains the translator alone.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, DataError

MANIFEST = "surrogate.json"
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
FAMILIES = (*LLAMA_FAMILY, "opt")


def resolve_llm(llm: str) -> tuple[str, str]:
    """(dense checkpoint dir or hub id, where the weights came from) for an alias, dir, hub id or .gguf file."""
    from .names import LLM_ALIASES, resolve

    source = resolve(llm, LLM_ALIASES)
    if source.endswith(".gguf"):
        from .gguf import dense_checkpoint

        return str(dense_checkpoint(llm, source)), source  # GGUF is dequantised once, then cached
    return source, source


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a LLaMA-family or OPT causal LM."""
    inner = model.model
    return inner.decoder.layers if hasattr(inner, "decoder") else inner.layers


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last decoder layer (None for OPT variants without one)."""
    inner = model.model
    return getattr(inner.decoder, "final_layer_norm", None) if hasattr(inner, "decoder") else inner.norm


def _check_family(llm: str, config: Any) -> str:
    kind = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"{llm} is an encoder-decoder LLM ({kind}, e.g. FlanT5): a surrogate of its first layers "
                          "is not supported", "use a decoder-only LLM (LLaMA family or OPT)")
    if kind not in FAMILIES:
        raise ConfigError(f"{llm} is a '{kind}' model: surrogates support {', '.join(FAMILIES)}",
                          "use a LLaMA-family or OPT LLM")
    return kind


def check_layers(layers: int, total: int, llm: str) -> None:
    """Refuse K outside 1..N in one line."""
    if not 1 <= layers <= total:
        raise ConfigError(f"--layers {layers} is out of range: {llm} has {total} decoder layers",
                          f"choose 1 ≤ K ≤ {total} (e.g. {max(1, total // 3)})")


def surrogate_layers(layers: int, total: int, last_layers: int = 0) -> list[int]:
    """Indices of the decoder layers a surrogate keeps: 0..K-1, plus (with a translator) layer K and the last L."""
    if not last_layers:
        return list(range(layers))
    return [*range(layers + 1), *range(total - last_layers, total)]


def keep_layers(model: nn.Module, indices: Sequence[int]) -> nn.Module:
    """Keep the decoder layers at `indices` (in order) in place and update the config to match."""
    stack = decoder_layers(model)
    total = len(stack)
    kept = [stack[i] for i in indices]
    del stack[:]
    for new_idx, layer in enumerate(kept):
        stack.append(layer)
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx  # the KV cache is indexed by position in the stack, not by origin
    cfg = model.config
    cfg.num_hidden_layers = len(kept)
    for attr in ("layer_types",):  # per-layer lists in some configs must follow the stack
        value = getattr(cfg, attr, None)
        if isinstance(value, list) and len(value) == total:
            setattr(cfg, attr, [value[i] for i in indices])
    return model


def read_texts(path: str | Path) -> list[str]:
    """Healing text: one passage per non-empty line (.jsonl: the 'text', 'caption' or question+answer fields)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"heal data not found: {p}", "pass a text file, one passage per line")
    texts: list[str] = []
    for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if p.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p} line {i}: malformed JSON ({exc.msg})", "fix that line") from None
            line = row.get("text") or row.get("caption") or " ".join(
                str(row[k]) for k in ("question", "answer") if k in row)
        if line:
            texts.append(line)
    if len(texts) < 2:
        raise DataError(f"heal data {p} has {len(texts)} passage(s)", "give at least 2 (one is held out)")
    return texts


def _batches(tokenizer: Any, texts: Sequence[str], batch: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(list(texts[i:i + batch]), return_tensors="pt", padding=True, truncation=True,
                        max_length=seq_len)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def _kl_and_agreement(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Token-mean KL(teacher || student) over masked positions, top-1 agreements, token count."""
    m = mask.bool()
    s, t = F.log_softmax(student[m].float(), -1), F.log_softmax(teacher[m].float(), -1)
    kl = (t.exp() * (t - s)).sum(-1).mean()
    return kl, int((s.argmax(-1) == t.argmax(-1)).sum()), int(m.sum())


class TeacherCache:
    """The full LLM's final hidden states per batch, computed once: each step then pays only for its LM head."""

    def __init__(self, teacher: nn.Module):
        self.teacher, self.states = teacher, {}

    @torch.no_grad()
    def logits(self, key: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher logits of one batch (hidden states cached under `key`)."""
        if key not in self.states:
            self.states[key] = self.teacher.model(**batch).last_hidden_state
        return self.teacher.get_output_embeddings()(self.states[key])


@torch.no_grad()
def agreement(student: nn.Module, teacher: TeacherCache, batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Top-1 next-token agreement and mean KL(full ‖ surrogate) on held-out text."""
    kls, hits, n = 0.0, 0, 0
    for i, b in enumerate(batches):
        kl, h, c = _kl_and_agreement(student(**b).logits, teacher.logits(("held", i), b), b["attention_mask"])
        kls, hits, n = kls + float(kl) * c, hits + h, n + c
    return {"top1_agreement": round(hits / max(n, 1), 4), "kl": round(kls / max(n, 1), 4), "tokens": n}


def heal(student: nn.Module, teacher: nn.Module, tokenizer: Any, texts: Sequence[str], *, steps: int,
         lr: float = 2e-3, batch: int = 8, seq_len: int = 64, seed: int = 0, translator: int | None = None,
         echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Distil the full LLM's next-token distribution into the translator layer (default: top layer + final norm)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = list(texts)
    random.Random(seed).shuffle(texts)
    n_held = max(1, len(texts) // 10)
    held = _batches(tokenizer, texts[:n_held], batch, seq_len)
    train = _batches(tokenizer, texts[n_held:], batch, seq_len)
    teacher.eval().requires_grad_(False)
    student.eval().requires_grad_(False)
    cache = TeacherCache(teacher)
    # Embeddings and LM head stay the target's own: that shared space is what makes the graft work. With a
    # translator, the layers on both sides of it stay the target's own too: it alone learns to stand in for
    # the bypassed middle.
    if translator is None:
        trainable = [*decoder_layers(student)[-1].parameters(), *(final_norm(student) or nn.Identity()).parameters()]
        trained = "last decoder layer + final norm"
    else:
        trainable = list(decoder_layers(student)[translator].parameters())
        trained = f"translator (decoder layer {translator})"
    for p in trainable:
        p.requires_grad_(True)
    before = agreement(student, cache, held)
    echo(f"heal: before  top-1 agreement {before['top1_agreement']:.4f}, KL {before['kl']:.4f} "
         f"on {before['tokens']} held-out tokens")
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    torch.manual_seed(seed)
    start, losses = time.perf_counter(), []
    for step in range(steps):
        b = train[step % len(train)]
        target = cache.logits(("train", step % len(train)), b)
        loss, _, _ = _kl_and_agreement(student(**b).logits, target, b["attention_mask"])
        if not math.isfinite(float(loss.detach())):
            from .errors import TrainingError

            raise TrainingError(f"healing loss is {float(loss.detach())} at step {step}", "lower --heal-lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    student.requires_grad_(False)
    after = agreement(student, cache, held)
    echo(f"heal: after   top-1 agreement {after['top1_agreement']:.4f}, KL {after['kl']:.4f} "
         f"({steps} steps, {time.perf_counter() - start:.1f}s)")
    return {"steps": steps, "lr": lr, "batch": batch, "seq_len": seq_len, "trained": trained,
            "train_passages": len(texts) - n_held, "heldout_passages": n_held, "before": before, "after": after,
            "final_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4) if losses else None,
            "seconds": round(time.perf_counter() - start, 1)}


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConfigError(f"{out} already exists and is not empty", "pass --force to replace it, or another --out")


def make_surrogate(llm: str, layers: int, out: str | Path, *, last_layers: int = 0, heal_steps: int = 0,
                   heal_data: str | Path | None = None, heal_lr: float = 2e-3, force: bool = False, seed: int = 0,
                   echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the surrogate of `llm` (first `layers` decoder layers, optionally translator + last ones) to `out`."""
    out = Path(out).expanduser()
    if layers < 1:  # before loading anything: K=0 is wrong whatever the model
        raise ConfigError(f"--layers {layers} is out of range", "choose K ≥ 1 (e.g. a third of the LLM's layers)")
    if last_layers < 0:
        raise ConfigError(f"--last-layers {last_layers} is negative", "use 0 (no translator) or a positive count")
    if heal_steps < 0:
        raise ConfigError(f"--heal-steps {heal_steps} is negative", "use 0 (no healing) or a positive count")
    if heal_steps and not heal_data:
        raise ConfigError("--heal-steps needs --heal-data", "pass a text file, one passage per line")
    texts = read_texts(heal_data) if heal_steps else []
    from .claim import claim_dir, refuse_overlap

    with claim_dir(out, echo=echo):  # before anything is looked at: two surrogates into one --out cannot both pass
        target, source = resolve_llm(llm)
        refuse_overlap(out, {"LLM": target, "LLM file": source, "healing text": heal_data})
        _check_out(out, force)
        return _write(llm, layers, out, target, source, last_layers=last_layers, heal_steps=heal_steps, texts=texts,
                      heal_lr=heal_lr, seed=seed, echo=echo)


def _write(llm: str, layers: int, out: Path, target: str, source: str, *, last_layers: int, heal_steps: int,
           texts: list[str], heal_lr: float, seed: int, echo: Callable[[str], None]) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import atomic_dir
    from .names import load_pretrained

    config = load_pretrained(AutoConfig.from_pretrained, llm, target, what="LLM config")
    kind = _check_family(llm, config)
    total = int(config.num_hidden_layers)
    check_layers(layers, total, llm)
    if last_layers and layers + 1 + last_layers >= total:
        raise ConfigError(f"--layers {layers} + a translator + --last-layers {last_layers} bypass no layer of {llm}'s "
                          f"{total}", f"keep K + 1 + L < {total} (e.g. --layers {max(1, total // 5)} --last-layers 1)")
    start = time.perf_counter()
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, llm, target, what="tokenizer")
    model = load_pretrained(AutoModelForCausalLM.from_pretrained, llm, target, what="LLM", dtype=torch.float32)
    full_params = sum(p.numel() for p in model.parameters())
    teacher = None
    if heal_steps:
        import copy

        teacher = copy.deepcopy(model)  # the full LLM stays the teacher while its copy is cut down
    kept_idx = surrogate_layers(layers, total, last_layers)
    keep_layers(model, kept_idx)
    params = sum(p.numel() for p in model.parameters())
    shape = (f"layers 0..{layers - 1} + translator (from layer {layers}) + layers {total - last_layers}..{total - 1}"
             if last_layers else f"{layers} of {total} decoder layers")
    echo(f"surrogate of {llm}: {shape} ({kind}), {params:,} of {full_params:,} parameters")
    healed = None
    if teacher is not None:
        healed = heal(model, teacher, tokenizer, texts, steps=heal_steps, lr=heal_lr, seed=seed,
                      translator=layers if last_layers else None, echo=echo)
        del teacher
    origin = {"llm": llm, "source": source, "model_type": kind, "layers": layers, "of_layers": total,
              "last_layers": last_layers, "kept_layers": kept_idx, "params": params, "full_params": full_params,
              "healed": bool(healed)}
    model.config.surrogate_of = origin
    kept = (f"input embeddings, decoder layers 0..K-1, a translator initialised from layer K (it stands in for "
            f"layers K..{total - last_layers - 1}), the last {last_layers} decoder layer(s), final norm, LM head"
            if last_layers else "input embeddings, decoder layers 0..K-1, final norm, LM head")
    manifest = {"format": "vpgtrans-surrogate", "surrogate-of": origin, "heal": healed, "kept": kept,
                "seconds": None}
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest["seconds"] = round(time.perf_counter() - start, 1)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    echo(f"wrote {out} ({manifest['seconds']}s)")
    return manifest


def read_surrogate(path: str | Path) -> dict[str, Any] | None:
    """The surrogate manifest of a directory, or None when it is not a surrogate."""
    p = Path(path).expanduser() / MANIFEST
    return json.loads(p.read_text()) if p.is_file() else None


def zero_shot_metrics(recipe: Any, model: nn.Module) -> dict[str, float]:
    """The recipe's validation metrics of a freshly grafted model, before any training (empty without val data)."""
    from .data import build_dataset, load_records
    from .train.objectives import EvalContext, make_eval_fn

    if not recipe.data.val:
        return {}
    val_set, _ = build_dataset(load_records(recipe.data, "val"), model, recipe.data, seed=recipe.train.seed,
                               progress=False)
    ctx = EvalContext(records=val_set.records, dataset=val_set, config=recipe.eval,
                      max_text_len=recipe.train.max_text_len)
    fn = make_eval_fn(ctx)
    if fn is None:
        return {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return {k: round(float(v), 4) for k, v in fn(model).items()}
    finally:
        model.train(was_training)
