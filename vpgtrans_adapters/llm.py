"""Frozen LLM backends that take soft prompts: decoder-only (OPT, LLaMA, Vicuna, …) and FlanT5."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from vpgtrans.config import help_field
from vpgtrans.interfaces import GenerationConfig, LLMBackend, TextSample
from vpgtrans.resources import available_memory as _available_memory
from vpgtrans.resources import dtype_bytes
from vpgtrans.names import LLM_ALIASES, load_pretrained, resolve
from vpgtrans.registry import Component

IGNORE = -100
# Causal LMs whose logits are exactly lm_head(base model's last hidden state): no logit scaling or soft-capping,
# so the loss may skip the head at positions that are not targets. Others take the stock forward.
HEAD_AT_TARGETS_ONLY = frozenset({"LlamaForCausalLM", "OPTForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})


@dataclass
class LLMConfig:
    """Where the frozen LLM comes from and how to hold it."""

    path: str = help_field("opt-2.7b", help="alias (opt-2.7b, llama-7b, vicuna-7b, flant5-xl, world-llama, "
                                            "smollm2-135m, …), Hugging Face id, local directory or .gguf file")
    dtype: str = help_field("float32", help="float32, bfloat16 or float16 for the frozen weights")
    # Kept so manifests that carry it still load; never read: only `vpgtrans --trust-remote-code` lets code run.
    trust_remote_code: bool = help_field(False, help="ignored: code shipped with a checkpoint runs only with the "
                                                     "command-line flag --trust-remote-code")
    gguf_file: str | None = help_field(None, help="GGUF file inside `path` to dequantise (once; a dense copy "
                                                  "is cached) and load")
    attn_implementation: str | None = help_field("sdpa", help="attention kernel (sdpa, eager, flash_attention_2)")


def _count_params(target: str) -> int | None:
    """Parameter count of a local checkpoint from its safetensors headers (cheap), else from its config."""
    import json
    import math
    import os
    import struct
    from pathlib import Path

    files = sorted(Path(target).glob("*.safetensors")) if os.path.isdir(target) else []
    if files:
        total = 0
        try:
            for f in files:
                with open(f, "rb") as fh:
                    header = json.loads(fh.read(min(struct.unpack("<Q", fh.read(8))[0], 100 << 20)))
                total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
        except (OSError, ValueError, struct.error, TypeError, KeyError, AttributeError):
            return None  # a damaged file: the loader itself reports it, in one line
        return total
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(target, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError):
        return None
    cfg = getattr(cfg, "text_config", None) or cfg
    h = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "num_layers", None)
    if not (h and layers):
        return None
    ffn = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or getattr(cfg, "d_ff", None) or 4 * h
    return layers * (4 * h * h + 3 * h * ffn) + 2 * getattr(cfg, "vocab_size", 0) * h


def check_fits(name: str, target: str, dtype: str) -> None:
    """Refuse early, in one line, when the LLM at `dtype` cannot fit in the free memory of the device."""
    import os

    from vpgtrans.errors import TrainingError

    if os.environ.get("VPGTRANS_SKIP_MEMORY_CHECK") == "1":
        return
    params = _count_params(target)
    device, free = _available_memory()
    if not params or free is None:
        return
    need = params * dtype_bytes(dtype)
    # 10% headroom for activations and allocator slack; not more, so models that just fit still load.
    if need * 1.1 > free:
        gib = 2 ** 30
        raise TrainingError(f"LLM {name} needs ~{need / gib:.1f} GiB at dtype {dtype} but the {device} has "
                            f"{free / gib:.1f} GiB free",
                            "use a smaller model, model.llm.dtype=bfloat16, or a bigger device "
                            "(VPGTRANS_SKIP_MEMORY_CHECK=1 skips this check)")


def _load(model_cls: Any, config: LLMConfig) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    target = resolve(config.path, LLM_ALIASES)
    if config.gguf_file or target.endswith(".gguf"):
        from vpgtrans.gguf import dense_checkpoint

        # Dequantising takes about a minute on a small CPU: done once, then a dense copy loads fast.
        target = str(dense_checkpoint(config.path, target, config.gguf_file, model_cls))
    # load_pretrained decides trust_remote_code from the command line alone (vpgtrans.trust).
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, config.path, target, what="tokenizer")
    check_fits(config.path, target, config.dtype)
    kwargs: dict[str, Any] = dict(dtype=getattr(torch, config.dtype))
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    model = load_pretrained(model_cls.from_pretrained, config.path, target, what="LLM", **kwargs)
    model.requires_grad_(False).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


class _Backend(LLMBackend):
    def __init__(self, config: LLMConfig, model_cls: Any):
        super().__init__()
        self.config = config
        self.tokenizer, self.model = _load(model_cls, config)
        self.embed_dim = int(self.model.get_input_embeddings().embedding_dim)

    def train(self, mode: bool = True) -> "_Backend":
        # Frozen LLM: no dropout, whatever the parent module's mode (LoRA training re-enables this).
        return super().train(mode and getattr(self, "trainable", False))

    def input_embedding_matrix(self) -> torch.Tensor:
        """Input word embeddings as the first layer sees them: the space the projector writes soft prompts into."""
        emb = self.model.get_input_embeddings()
        # Gemma multiplies by sqrt(width) inside the embedding's forward: text reaches the first layer scaled,
        # and soft prompts (which skip the lookup) must match it, so converters are fitted on the scaled rows.
        scale = getattr(emb, "embed_scale", None)
        return emb.weight if scale is None else emb.weight * scale.to(emb.weight.dtype)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def set_gradient_checkpointing(self, on: bool) -> None:
        """Recompute each transformer layer in the backward pass instead of keeping its activations."""
        from vpgtrans.errors import ConfigError
        from vpgtrans.model import checkpoint_layers

        if not checkpoint_layers(self.model, on) and on:
            raise ConfigError(f"LLM {self.config.path} has no layers transformers can checkpoint",
                              "set train.gradient_checkpointing=false")

    def _embed(self, ids: torch.Tensor, soft_mask: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        # One embedding lookup for the whole batch, then soft prompts scattered into their slots.
        embeds = self.model.get_input_embeddings()(ids)
        prompts = prompts.to(embeds.dtype)
        return embeds.masked_scatter(soft_mask.unsqueeze(-1), prompts.reshape(-1, prompts.shape[-1]))


def _pad(rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r)))
                         for r in rows], dtype=torch.long)


class CausalLMBackend(_Backend):
    """Decoder-only LLM: `[soft][BOS] after target` or `[BOS] before [soft] after target`."""

    def __init__(self, config: LLMConfig):
        from transformers import AutoModelForCausalLM

        super().__init__(config, AutoModelForCausalLM)

    def _sequences(self, n_soft: int, samples: Sequence[TextSample], max_text_len: int, with_target: bool,
                   left_pad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        pad = tok.pad_token_id
        ids, soft, labels = [], [], []
        for s in samples:
            before, after = self._ids(s.before), self._ids(s.after)
            target = (self._ids(s.target) + eos) if with_target else []
            target = target[:max_text_len]
            if before:
                # A template that writes BOS itself (`<s><ImageHere>…`: BOS before the image) gets it once.
                head = (bos if before[:len(bos)] != bos else []) + before
                seq = head + [pad] * n_soft + after + target
                is_soft = [0] * len(head) + [1] * n_soft + [0] * (len(after) + len(target))
            else:
                seq = [pad] * n_soft + bos + after + target
                is_soft = [1] * n_soft + [0] * (len(bos) + len(after) + len(target))
            ids.append(seq)
            soft.append(is_soft)
            labels.append([IGNORE] * (len(seq) - len(target)) + target)
        attn = _pad([[1] * len(r) for r in ids], 0, left_pad)
        return (_pad(ids, pad, left_pad), _pad(soft, 0, left_pad).bool(), _pad(labels, IGNORE, left_pad), attn)

    def _teacher_forced(self, prompts: torch.Tensor, samples: Sequence[TextSample],
                        max_text_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input embeddings with the soft prompts in place, labels, attention mask) on the LLM's device."""
        ids, soft, labels, attn = self._sequences(prompts.shape[1], samples, max_text_len, True, False)
        dev = self.device
        return self._embed(ids.to(dev), soft.to(dev), prompts), labels.to(dev), attn.to(dev)

    def _forward(self, prompts: torch.Tensor, samples: Sequence[TextSample], max_text_len: int) -> Any:
        embeds, labels, attn = self._teacher_forced(prompts, samples, max_text_len)
        # No KV cache: nothing reads it here, and a checkpointed layer would append to it again on replay.
        return self.model(inputs_embeds=embeds, attention_mask=attn, labels=labels, use_cache=False)

    def loss(self, prompts: torch.Tensor, samples: Sequence[TextSample], max_text_len: int = 128) -> torch.Tensor:
        """Mean next-token loss over target tokens (+EOS), the LM head applied at those positions only."""
        body, head = getattr(self.model, self.model.base_model_prefix, None), self.model.get_output_embeddings()
        if type(self.model).__name__ not in HEAD_AT_TARGETS_ONLY or body is None or head is None:
            return self._forward(prompts, samples, max_text_len).loss
        embeds, labels, attn = self._teacher_forced(prompts, samples, max_text_len)
        hidden = body(inputs_embeds=embeds, attention_mask=attn, use_cache=False).last_hidden_state
        # Why: the head's [positions x vocab] product over every prompt position is most of a small LLM's
        # step (49k-token vocabulary: ~60% of a 6-layer SmolLM2 surrogate's FLOPs); only targets need it.
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = head(hidden[:, :-1][keep])
        return torch.nn.functional.cross_entropy(logits.float(), targets[keep])

    def logits(self, prompts: torch.Tensor, samples: Sequence[TextSample], max_text_len: int = 128) -> torch.Tensor:
        """Logits of the teacher-forced forward."""
        return self._forward(prompts, samples, max_text_len).logits

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, samples: Sequence[TextSample], config: GenerationConfig) -> list[str]:
        """Greedy or beam decoding after the prompt; left padding keeps every row's end aligned."""
        ids, soft, _, attn = self._sequences(prompts.shape[1], samples, 0, False, True)
        dev = self.device
        embeds = self._embed(ids.to(dev), soft.to(dev), prompts)
        out = self.model.generate(inputs_embeds=embeds, attention_mask=attn.to(dev), **_gen_kwargs(self, config))
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


class Seq2SeqBackend(_Backend):
    """Encoder-decoder LLM (FlanT5): encoder reads `before [soft] after`, decoder predicts the target."""

    is_encoder_decoder = True

    def __init__(self, config: LLMConfig):
        from transformers import AutoModelForSeq2SeqLM

        super().__init__(config, AutoModelForSeq2SeqLM)

    def _encoder_inputs(self, n_soft: int, samples: Sequence[TextSample]) -> tuple[torch.Tensor, ...]:
        tok = self.tokenizer
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        ids, soft = [], []
        for s in samples:
            before, after = self._ids(s.before), self._ids(s.after)
            ids.append(before + [tok.pad_token_id] * n_soft + after + eos)
            soft.append([0] * len(before) + [1] * n_soft + [0] * (len(after) + len(eos)))
        attn = _pad([[1] * len(r) for r in ids], 0, False)
        return _pad(ids, tok.pad_token_id, False), _pad(soft, 0, False).bool(), attn

    def _forward(self, prompts: torch.Tensor, samples: Sequence[TextSample], max_text_len: int) -> Any:
        ids, soft, attn = self._encoder_inputs(prompts.shape[1], samples)
        eos = [self.tokenizer.eos_token_id]
        labels = _pad([(self._ids(s.target) + eos)[:max_text_len] for s in samples], IGNORE, False)
        dev = self.device
        embeds = self._embed(ids.to(dev), soft.to(dev), prompts)
        return self.model(inputs_embeds=embeds, attention_mask=attn.to(dev), labels=labels.to(dev), use_cache=False)

    def loss(self, prompts: torch.Tensor, samples: Sequence[TextSample], max_text_len: int = 128) -> torch.Tensor:
        """Mean decoder loss over target tokens (+EOS)."""
        return self._forward(prompts, samples, max_text_len).loss

    def logits(self, prompts: torch.Tensor, samples: Sequence[TextSample], max_text_len: int = 128) -> torch.Tensor:
        """Decoder logits of the teacher-forced forward."""
        return self._forward(prompts, samples, max_text_len).logits

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, samples: Sequence[TextSample], config: GenerationConfig) -> list[str]:
        """Decode from the encoder's view of prompt + text."""
        ids, soft, attn = self._encoder_inputs(prompts.shape[1], samples)
        dev = self.device
        embeds = self._embed(ids.to(dev), soft.to(dev), prompts)
        out = self.model.generate(inputs_embeds=embeds, attention_mask=attn.to(dev), **_gen_kwargs(self, config))
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


def stop_token_ids(backend: LLMBackend) -> list[int]:
    """Token ids that end generation: the checkpoint's own eos ids, then the tokenizer's EOS."""
    # The checkpoint's generation config is what the stock model stops on (BLIP-2 OPT ends on "\\n");
    # the tokenizer's EOS is what vpgtrans appends to every training target.
    ids: list[int] = []
    gen = getattr(backend.model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), backend.tokenizer.eos_token_id):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def _gen_kwargs(backend: _Backend, config: GenerationConfig) -> dict[str, Any]:
    tok = backend.tokenizer
    kw: dict[str, Any] = dict(max_new_tokens=config.max_new_tokens, num_beams=config.num_beams,
                              min_new_tokens=config.min_new_tokens, repetition_penalty=config.repetition_penalty,
                              do_sample=False, eos_token_id=stop_token_ids(backend), pad_token_id=tok.pad_token_id)
    if config.num_beams > 1:
        kw["length_penalty"] = config.length_penalty
    kw.update(config.extra)
    return kw


_DESC = "frozen decoder-only LLM via AutoModelForCausalLM; soft prompts before BOS"
OPT = Component(kind="llm", name="opt", factory=CausalLMBackend, config_class=LLMConfig,
                description="OPT (" + _DESC + ")")
LLAMA = Component(kind="llm", name="llama", factory=CausalLMBackend, config_class=LLMConfig,
                  description="LLaMA / Vicuna (" + _DESC + ")", aliases=("vicuna",))
CAUSAL_LM = Component(kind="llm", name="causal-lm", factory=CausalLMBackend, config_class=LLMConfig,
                      description="any " + _DESC)
FLANT5 = Component(kind="llm", name="flant5", factory=Seq2SeqBackend, config_class=LLMConfig,
                   description="FlanT5 / T5 encoder-decoder via AutoModelForSeq2SeqLM; prefix-LM with soft prompts "
                               "in the encoder", aliases=("t5",))
