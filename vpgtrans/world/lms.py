"""The world's tiny LLMs (OPT small/larger, LLaMA, FlanT5): configs, pretraining data, training, checks.

Pretraining text always carries a *context* the model must read (the scene's attribute words),
placed exactly where a VPG's soft prompts go later (see ``vpgtrans_adapters/llm.py``), with every text
segment tokenized on its own, as the backends do:

- decoder-only, ``before`` empty:  ``ctx [BOS] after target [EOS]``
- decoder-only, ``before`` set:    ``[BOS] before ctx after target [EOS]`` (MiniGPT-4 template)
- FlanT5: encoder ``before ctx after [EOS]``, decoder ``target [EOS]`` (captions are sometimes split
  into an encoder prefix and a decoder target: BLIP-2's prefix-LM).

Sample kinds: captions (``after`` empty), VQA (``after`` = "Question: … Answer:", target = the
answer), MiniGPT-4 instructions, and a few with no context at all (the model's prior).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from . import language
from .config import WorldConfig
from .scene import (INSTRUCTIONS, MINIGPT4_AFTER, MINIGPT4_BEFORE, MINIGPT4_END, VQA_PROMPT, captions, context,
                    qa_pairs, rng_for, sample_scene, vocabulary)

IGNORE = -100
KIND_WEIGHTS = {"caption": 0.45, "vqa": 0.18, "instruct": 0.06, "prior": 0.05, "paraphrase": 0.1, "list": 0.04,
                "lexicon": 0.12}
EMBED_DECAY = 0.01  # AdamW weight decay of the token embeddings (input and untied output)
CONTEXT_SWAP = 0.25  # share of context words said with a synonym (the caption to predict stays canonical)


@dataclass(frozen=True)
class Sample:
    """One pretraining example; `ctx` sits where the soft prompts will."""

    before: str
    ctx: str
    after: str
    target: str


@dataclass(frozen=True)
class LMSpec:
    """One world LM: its directory name, tokenizer family and architecture sizes."""

    name: str
    family: str  # opt | llama | t5
    hidden: int
    layers: int
    heads: int
    ffn: int
    embed_proj: int | None = None  # OPT word_embed_proj_dim when it differs from hidden (like OPT-350m)
    kv_heads: int | None = None
    step_share: float = 1.0  # multiple of cfg.lm_steps this model trains for
    lr_share: float = 1.0  # multiple of cfg.lm_lr (wider models need a smaller peak LR to stay stable)


def lm_specs(cfg: WorldConfig) -> list[LMSpec]:
    """The four world LMs at the configured scale."""
    if cfg.lm_scale == "tiny":
        return [LMSpec("opt-s", "opt", 32, 1, 2, 64), LMSpec("opt-m", "opt", 48, 1, 2, 96, embed_proj=40),
                LMSpec("llama", "llama", 48, 1, 2, 96, kv_heads=1), LMSpec("flant5", "t5", 32, 1, 2, 64)]
    # Narrow embeddings: each LM's few hundred meaningful tokens must share the space, so where a word
    # sits is decided by what it means rather than by its random init (docs/design.md#measuring-transfer).
    return [LMSpec("opt-s", "opt", 64, 3, 4, 256, step_share=1.4),
            LMSpec("opt-m", "opt", 128, 3, 4, 384, embed_proj=96, lr_share=0.7),
            LMSpec("llama", "llama", 96, 3, 4, 256, kv_heads=2, step_share=1.2),
            LMSpec("flant5", "t5", 64, 2, 4, 192, step_share=1.3)]


def make_model(spec: LMSpec, tok: Any, max_len: int) -> torch.nn.Module:
    """A freshly initialised transformers model for `spec` whose special ids match `tok`."""
    from transformers import (LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, T5Config,
                              T5ForConditionalGeneration)

    vocab = len(tok)
    if spec.family == "opt":
        model = OPTForCausalLM(OPTConfig(
            vocab_size=vocab, hidden_size=spec.hidden, num_hidden_layers=spec.layers, ffn_dim=spec.ffn,
            num_attention_heads=spec.heads, max_position_embeddings=max_len,
            word_embed_proj_dim=spec.embed_proj or spec.hidden, dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, do_layer_norm_before=True, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True))
        dec = model.model.decoder
        for lin in (dec.project_in, dec.project_out):
            if lin is not None:
                # Default std-0.02 init shrinks token embeddings ~50x below the positional ones through
                # project_in, and the model then barely learns; a norm-preserving init trains like opt-s.
                torch.nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
        return model
    if spec.family == "llama":
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
            intermediate_size=spec.ffn, num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads or spec.heads, max_position_embeddings=max_len,
            rms_norm_eps=1e-6, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, tie_word_embeddings=False))
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=vocab, d_model=spec.hidden, d_kv=spec.hidden // spec.heads, d_ff=spec.ffn,
        num_layers=spec.layers, num_decoder_layers=spec.layers, num_heads=spec.heads, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
        relative_attention_num_buckets=32, relative_attention_max_distance=max_len))
    # T5 starts its embeddings at std 1.0, which a million pretraining steps wash out; in a few hundred
    # they stay mostly init (measured: held-out converter cosine ~0.05 to any other LM). Start them like
    # the other families (std 0.02); the rest of T5 keeps its own init.
    for emb in (model.shared, model.lm_head):
        torch.nn.init.normal_(emb.weight, std=0.02)
    return model


def text_samples(cfg: WorldConfig, seed: int, n: int, family: str) -> list[Sample]:
    """`n` pretraining samples drawn from the text-only scenes (same scenes for every LM)."""
    kinds, weights = list(KIND_WEIGHTS), list(KIND_WEIGHTS.values())
    scenes = [sample_scene(rng_for(seed, "text", i), cfg) for i in range(min(n, cfg.n_text_scenes))]
    rng = random.Random(f"vpgtrans-world/{seed}/lm-samples/{family}")
    out = []
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        out.append(_sample(kind, scenes[i % len(scenes)], rng, cfg, family))
    return out


def _sample(kind: str, scene: dict[str, Any], rng: random.Random, cfg: WorldConfig, family: str) -> Sample:
    ctx = context(scene, rng)
    if CONTEXT_SWAP and rng.random() < 0.5:
        ctx = language.varied_context(ctx, rng, CONTEXT_SWAP)
    caption = captions(scene, rng, 1)[0]
    if kind == "lexicon":
        voc = vocabulary(cfg)
        return Sample("", "", "", " ".join(language.lexicon_sentence(rng, voc) for _ in range(rng.randint(1, 3))))
    if kind == "paraphrase":
        return Sample("", ctx, language.PARAPHRASE_PROMPT, language.paraphrase(caption, rng))
    if kind == "list":
        return Sample("", ctx, language.LIST_PROMPT, language.attribute_list(scene, rng))
    if kind == "vqa":
        pairs = qa_pairs(scene, rng, cfg)
        q, a = rng.choice(pairs)
        return Sample("", ctx, VQA_PROMPT.format(q), a)
    if kind == "instruct":
        instruction = rng.choice(INSTRUCTIONS)
        return Sample(MINIGPT4_BEFORE, ctx, MINIGPT4_AFTER.format(instruction), caption + MINIGPT4_END)
    if kind == "prior":
        return Sample("", "", "", caption)
    if family == "t5" and rng.random() < 0.5:  # prefix-LM: part of the caption goes to the encoder
        words = caption.split(" ")
        k = rng.randrange(1, len(words))
        return Sample("", ctx, " ".join(words[:k]), " ".join(words[k:]))
    return Sample("", ctx, "", caption)


class Encoder:
    """Turns Samples into token ids the way the soft-prompt backends lay sequences out."""

    def __init__(self, tok: Any, family: str):
        self.tok, self.family = tok, family
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        """Token ids of one segment, no special tokens (memoised: the world repeats itself)."""
        if not text:
            return []
        got = self._cache.get(text)
        if got is None:
            got = self._cache[text] = self.tok(text, add_special_tokens=False).input_ids
        return got

    def encode(self, s: Sample) -> tuple[list[int], list[int]]:
        """(input ids, labels) for decoder-only; (encoder ids, decoder labels) for T5."""
        tok = self.tok
        before, ctx, after, target = (self.ids(x) for x in (s.before, s.ctx, s.after, s.target))
        if self.family == "t5":
            return before + ctx + after + [tok.eos_token_id], target + [tok.eos_token_id]
        bos, eos = [tok.bos_token_id], [tok.eos_token_id]
        head = (bos + before + ctx) if before else (ctx + bos)
        text = after + target + eos
        return head + text, [IGNORE] * len(head) + text


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def batch_inputs(enc: Encoder, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Model keyword arguments (padded) for a list of samples."""
    pairs = [enc.encode(s) for s in samples]
    ids = _pad([p[0] for p in pairs], enc.tok.pad_token_id)
    mask = _pad([[1] * len(p[0]) for p in pairs], 0)
    labels = _pad([p[1] for p in pairs], IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _length_buckets(lengths: list[int], batch: int, gen: torch.Generator) -> list[list[int]]:
    """Random batches of similar length (sorted within windows of 16 batches): far less padding."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    window = batch * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[k:k + batch] for k in range(0, len(chunk), batch)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def pretrain(model: torch.nn.Module, enc: Encoder, samples: list[Sample], cfg: WorldConfig, steps: int, seed: int,
             log: Callable[[str], None], lr: float | None = None) -> list[float]:
    """AdamW, linear warm-up then cosine; returns the loss curve."""
    gen = torch.Generator().manual_seed(seed)
    # Token embeddings decay harder: real LLMs train so long (lr·λ·steps ≫ 1) that nothing of their random
    # init survives; a few hundred steps reach that regime only with a larger λ (docs/design.md#measuring-transfer).
    emb = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    named = list(model.named_parameters())
    embeds = [p for _, p in named if id(p) in emb]
    decay = [p for n, p in named if p.ndim >= 2 and "norm" not in n and id(p) not in emb]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0},
                             {"params": embeds, "weight_decay": EMBED_DECAY}],
                            lr=lr or cfg.lm_lr, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    model.train()
    losses, t0 = [], time.time()
    batches = _length_buckets([sum(map(len, enc.encode(s))) for s in samples], cfg.lm_batch, gen)
    for step in range(steps):
        idx = batches[step % len(batches)]
        loss = model(**batch_inputs(enc, [samples[i] for i in idx])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
            log(f"    step {step + 1}/{steps} loss {np.mean(losses[-20:]):.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    return losses


def eval_samples(cfg: WorldConfig, seed: int) -> list[tuple[Sample, Sample, Sample]]:
    """Held-out caption samples (val scenes) with the true, a shuffled and no context."""
    n = cfg.eval_samples
    scenes = [sample_scene(rng_for(seed, "val", i), cfg) for i in range(n)]
    rng = random.Random(f"vpgtrans-world/{seed}/lm-eval")
    rows = []
    for i, scene in enumerate(scenes):
        caption = captions(scene, rng, 1)[0]
        other = scenes[(i + 1) % n]
        # Derange until the other scene really differs (tiny worlds repeat scenes).
        k = 1
        while other["objects"] == scene["objects"] and k < n:
            k += 1
            other = scenes[(i + k) % n]
        rows.append((Sample("", context(scene, rng), "", caption), Sample("", context(other, rng), "", caption),
                     Sample("", "", "", caption)))
    return rows


@torch.no_grad()
def context_check(model: torch.nn.Module, enc: Encoder, rows: list[tuple[Sample, Sample, Sample]]) -> dict[str, float]:
    """Mean caption-token loss given the true context, a shuffled one, and none."""
    out = {}
    for j, key in enumerate(("true_context", "shuffled_context", "no_context")):
        total, count = 0.0, 0
        for start in range(0, len(rows), 64):
            batch = batch_inputs(enc, [r[j] for r in rows[start:start + 64]])
            logits = model(**{k: v for k, v in batch.items() if k != "labels"},
                           **({"labels": batch["labels"]} if enc.family == "t5" else {})).logits
            labels = batch["labels"]
            if enc.family != "t5":  # causal: token t predicts t+1
                logits, labels = logits[:, :-1], labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                    ignore_index=IGNORE, reduction="sum")
            total += float(nll)
            count += int((labels != IGNORE).sum())
        out[key] = round(total / max(1, count), 4)
    return out
