"""The world LMs' own tokenizers, trained on the world's text with the `tokenizers` library.

Three families, different vocabularies and ids, each following its real model's conventions:

- OPT: byte-level BPE (``Ġ`` word starts); ``<s>=0 <pad>=1 </s>=2 <unk>=3``; BOS = EOS = ``</s>``,
  prepended to every encoding (as the real OPT tokenizer does).
- LLaMA: SentencePiece-style BPE with ``▁`` (Metaspace) and byte fallback (``<0x00>``..``<0xFF>``
  right after the specials); ``<unk>=0 <s>=1 </s>=2 <pad>=3``; BOS added, no EOS.
- FlanT5: Unigram (word pieces + character fallback) with ``▁``; ``<pad>=0 </s>=1 <unk>=2``; EOS appended, no BOS.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..errors import VpgtransError

OPT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]


def _wrap(tok: Tokenizer, max_len: int, **specials: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_len, **specials)


def opt_tokenizer(corpus: list[str], vocab_size: int, max_len: int):
    """Byte-level BPE in the GPT-2/OPT style."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=OPT_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A $B",
                                                       special_tokens=[("</s>", 2)])
    return _wrap(tok, max_len, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def _metaspace() -> tuple[pre_tokenizers.PreTokenizer, decoders.Decoder]:
    return (pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
            decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True))


def llama_tokenizer(corpus: list[str], vocab_size: int, max_len: int):
    """SentencePiece-style BPE with byte fallback, laid out like LLaMA's vocabulary.

    Punctuation is split off the words: on this repetitive corpus BPE would otherwise learn ``▁left.``
    and ``▁it,`` as tokens of their own, which real LLaMA vocabularies mostly do not have, and which
    no other tokenizer has a partner for.
    """
    pre = pre_tokenizers.Sequence([_metaspace()[0], pre_tokenizers.Punctuation(behavior="isolated")])
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = pre
    draft.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA_SPECIALS,
                                                          show_progress=False))
    trained = draft.get_vocab()
    merges = [tuple(m) for m in _merges(draft)]
    # Re-lay the vocabulary: specials, then the 256 byte-fallback pieces, then the learned pieces.
    vocab: dict[str, int] = {s: i for i, s in enumerate(LLAMA_SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(LLAMA_SPECIALS)
    tok.pre_tokenizer = pre
    # LLaMA's own decoder chain: ▁ back to spaces, bytes re-assembled, the prepended space dropped.
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return _wrap(tok, max_len, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def _merges(tok: Tokenizer) -> list[list[str]]:
    import json

    model = json.loads(tok.to_str())["model"]
    return [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]


def t5_tokenizer(corpus: list[str], vocab_size: int, max_len: int):
    """Unigram with Metaspace, T5 conventions (pad=0, eos=1, unk=2, no BOS).

    The pieces are the corpus' frequent words (``▁word``) and punctuation, plus every character as a
    fallback; scores are log relative frequencies, which is where Unigram-LM training converges on a
    corpus this repetitive (the `tokenizers` Unigram trainer degenerates on it into characters).
    """
    counts: Counter[str] = Counter()
    chars: set[str] = set()
    for text in corpus:
        for m in re.finditer(r"\S+", text):
            for k, part in enumerate(re.findall(r"\w+|[^\w\s]", m.group())):
                counts["▁" + part if k == 0 else part] += 1
                chars.update(part)
    budget = vocab_size - len(T5_SPECIALS) - len(chars) - 1
    kept = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max(0, budget)]
    total = float(sum(counts.values()))
    floor = math.log(0.5 / total)
    vocab = [(s, 0.0) for s in T5_SPECIALS] + [(p, math.log(c / total)) for p, c in kept]
    seen = {p for p, _ in vocab}
    vocab += [(c, floor - 1.0) for c in ["▁", *sorted(chars)] if c not in seen]
    pre, dec = _metaspace()
    tok = Tokenizer(models.Unigram(vocab, unk_id=T5_SPECIALS.index("<unk>"), byte_fallback=False))
    tok.add_special_tokens(T5_SPECIALS)
    tok.pre_tokenizer = pre
    tok.decoder = dec
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return _wrap(tok, max_len, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def training_corpus(segments: Iterable[str], words: Iterable[str]) -> list[str]:
    """Text the tokenizers learn from: every segment as tokenized later, plus each world word alone
    and after a space, so both forms (``red``/``Ġred``) become whole tokens."""
    words = sorted(words)
    return [s for s in segments if s] + ([" ".join(words)] + words) * 20


def check_whole_words(tokenizer, words: Iterable[str], name: str) -> None:
    """Every world word must be one token alone and after a space (pairing by string needs it)."""
    def pieces(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    split = [w for w in sorted(words) if pieces(w) != 1 or pieces(f"the {w}") != 2]
    if split:
        raise VpgtransError(f"world tokenizer '{name}' splits the world words {split[:8]}",
                            "raise the tokenizer vocabulary size in vpgtrans/world/lms.py")
