"""Pair tokens of two LLM tokenizers, so that their input embeddings can be aligned by a converter.

Same vocabulary → identity. Different vocabularies → tokens whose *strings* match once the
word-start conventions are made common (SentencePiece ``▁x``, byte-level BPE ``Ġx``, WordPiece
``x`` all start a word; ``x`` in BPE/SentencePiece and ``##x`` in WordPiece continue one).
The official VPGTrans code instead pairs tokens by position in captions that happen to tokenize to
the same length in both vocabularies; `pair_tokens_positional` reproduces that for comparison.
`converter_pairs` decides which of the pairs the converter is fitted on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Literal, Sequence

import torch

from vpgtrans.errors import VpgtransError

# One word-start marker for every scheme (internal: it only has to be the same on both sides).
WORD_START = "\u2581"
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class TokenPairingError(VpgtransError):
    """Two tokenizers share too few tokens for an embedding converter to be fitted reliably."""


@dataclass
class TokenPairs:
    """Source/destination token ids whose input embeddings should correspond, plus coverage figures."""

    src_ids: torch.Tensor
    dst_ids: torch.Tensor
    n_pairs: int
    src_coverage: float
    dst_coverage: float
    method: str
    src_vocab_size: int = 0
    dst_vocab_size: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    # Tokens with a string of their own that found no partner (what anchor-based converters map).
    src_unpaired: torch.Tensor | None = None
    dst_unpaired: torch.Tensor | None = None

    def summary(self) -> str:
        """One line for logs and `--dry-run`."""
        extra = "".join(f", {k.replace('_', ' ')} {v}" for k, v in self.details.items())
        return (f"{self.n_pairs} token pairs ({self.method}{extra}): {self.src_coverage:.1%} of the source "
                f"vocabulary ({self.src_vocab_size}), {self.dst_coverage:.1%} of the destination "
                f"vocabulary ({self.dst_vocab_size})")


def _as_hf(tok: Any) -> Any:
    """Accept a raw `tokenizers.Tokenizer` as well as a transformers tokenizer."""
    from tokenizers import Tokenizer

    if isinstance(tok, Tokenizer):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=tok)
    return tok


def _special_ids(tok: Any) -> set[int]:
    ids = set(getattr(tok, "all_special_ids", []) or [])
    for idx, added in (getattr(tok, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(idx))
    return ids


def _scheme(tok: Any) -> tuple[str, str]:
    """('bytelevel' | 'sentencepiece' | 'wordpiece' | 'plain', WordPiece continuation prefix)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        model = spec.get("model") or {}
        if model.get("type") == "WordPiece":
            return "wordpiece", model.get("continuing_subword_prefix") or "##"
        parts = json.dumps([spec.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")], ensure_ascii=False)
        if '"ByteLevel"' in parts:
            return "bytelevel", ""
        if '"Metaspace"' in parts or WORD_START in parts:
            return "sentencepiece", ""
    # Slow (pure-Python) tokenizers: judge by the vocabulary itself.
    vocab = list(tok.get_vocab())
    share = {m: sum(t.startswith(m) for t in vocab) / max(len(vocab), 1) for m in ("\u0120", WORD_START, "##")}
    if share[WORD_START] > 0.05:
        return "sentencepiece", ""
    if share["\u0120"] > 0.05:
        return "bytelevel", ""
    if share["##"] > 0.05:
        return "wordpiece", "##"
    return "plain", ""


def _normalise(token: str, scheme: str, prefix: str, byte_decoder: Any) -> str | None:
    """Token string → common form (word-start marker + text, or bare text); None when unmatchable."""
    if scheme == "bytelevel":
        text = byte_decoder.decode([token])
        if "\ufffd" in text:  # a fragment of a multi-byte character has no string of its own
            return None
        return WORD_START + text[1:] if text.startswith(" ") else text
    if scheme == "sentencepiece":
        if _BYTE_FALLBACK.fullmatch(token):
            return None
        if token.startswith(WORD_START):
            return WORD_START + token[1:].replace(WORD_START, " ")
        return token.replace(WORD_START, " ")
    if scheme == "wordpiece":
        # WordPiece tokens start a word unless they carry the continuation prefix.
        if token.startswith(prefix):
            return token[len(prefix):] or None
        return WORD_START + token
    return WORD_START + token[1:] if token.startswith(" ") else token


def normalised_vocab(tok: Any) -> dict[int, str]:
    """Token id → normalised string for every non-special token that has a string of its own."""
    from tokenizers import decoders

    tok = _as_hf(tok)
    scheme, prefix = _scheme(tok)
    byte_decoder = decoders.ByteLevel()
    specials = _special_ids(tok)
    out: dict[int, str] = {}
    for token, idx in tok.get_vocab().items():
        if idx in specials:
            continue
        norm = _normalise(token, scheme, prefix, byte_decoder)
        if norm:
            out[idx] = norm
    return out


def _vocab_size(tok: Any) -> int:
    return max(len(tok), max(tok.get_vocab().values(), default=-1) + 1)


def _check_coverage(pairs: TokenPairs, min_coverage: float) -> TokenPairs:
    if pairs.dst_coverage < min_coverage:
        raise TokenPairingError(
            f"only {pairs.n_pairs} token pairs ({pairs.method}) cover {pairs.dst_coverage:.1%} of the destination "
            f"vocabulary, below the minimum {min_coverage:.1%}",
            "use a destination tokenizer with more overlap, lower --min-coverage, or pair_tokens_positional() from Python")
    return pairs


def _make_pairs(pairs: list[tuple[int, int]], src_tok: Any, dst_tok: Any, method: str,
                details: dict[str, Any] | None = None, unpaired: tuple[list[int], list[int]] | None = None
                ) -> TokenPairs:
    src_vocab, dst_vocab = _vocab_size(src_tok), _vocab_size(dst_tok)
    src_ids = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    dst_ids = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    lone = [torch.tensor(sorted(u), dtype=torch.long) for u in unpaired] if unpaired is not None else [None, None]
    return TokenPairs(src_ids=src_ids, dst_ids=dst_ids, n_pairs=len(pairs),
                      src_coverage=len(set(src_ids.tolist())) / max(src_vocab, 1),
                      dst_coverage=len(set(dst_ids.tolist())) / max(dst_vocab, 1),
                      method=method, src_vocab_size=src_vocab, dst_vocab_size=dst_vocab, details=details or {},
                      src_unpaired=lone[0], dst_unpaired=lone[1])


def pair_tokens(src_tok: Any, dst_tok: Any, *, case: Literal["sensitive", "insensitive"] = "sensitive",
                min_coverage: float = 0.05) -> TokenPairs:
    """Pair source and destination tokens with equal normalised strings (identity for one vocabulary)."""
    if case not in ("sensitive", "insensitive"):
        raise TokenPairingError(f"unknown case policy '{case}'", "use 'sensitive' or 'insensitive'")
    src_tok, dst_tok = _as_hf(src_tok), _as_hf(dst_tok)
    src_vocab = src_tok.get_vocab()
    if src_tok is dst_tok or src_vocab == dst_tok.get_vocab():
        ids = sorted(set(src_vocab.values()))
        return _check_coverage(_make_pairs([(i, i) for i in ids], src_tok, dst_tok, "identity"), min_coverage)

    src_norm, dst_norm = normalised_vocab(src_tok), normalised_vocab(dst_tok)
    exact: dict[str, int] = {}
    folded: dict[str, int] = {}
    for idx in sorted(src_norm):  # lowest id wins a tie: deterministic
        exact.setdefault(src_norm[idx], idx)
        folded.setdefault(src_norm[idx].lower(), idx)
    pairs: list[tuple[int, int]] = []
    n_folded = 0
    for idx in sorted(dst_norm):
        key = dst_norm[idx]
        if key in exact:
            pairs.append((exact[key], idx))
        elif case == "insensitive" and key.lower() in folded:
            # An exact-case partner is always preferred; a case-folded one only fills the gap.
            pairs.append((folded[key.lower()], idx))
            n_folded += 1
    details = {"case_folded": n_folded} if case == "insensitive" else {}
    method = f"string match, case-{case}"
    unpaired = (set(src_norm) - {p[0] for p in pairs}, set(dst_norm) - {p[1] for p in pairs})
    return _check_coverage(_make_pairs(pairs, src_tok, dst_tok, method, details, unpaired), min_coverage)


def restrict_to_texts(pairs: TokenPairs, src_tok: Any, dst_tok: Any, texts: Iterable[str], *,
                      min_pairs: int = 16) -> TokenPairs:
    """Keep the pairs (and unpaired tokens) that occur in `texts`, e.g. the training captions.

    The official VPGTrans code fits its converter on the tokens of training captions; a token that
    never occurs in text keeps an untrained embedding that no map relates. Coverage figures stay those
    of the string match; `details` says how many pairs the texts kept. With fewer than `min_pairs`
    left, the pairs are returned unchanged (and `details` says so).
    """
    src_tok, dst_tok = _as_hf(src_tok), _as_hf(dst_tok)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        return pairs
    src_seen = {i for ids in src_tok(texts, add_special_tokens=False)["input_ids"] for i in ids}
    dst_seen = {i for ids in dst_tok(texts, add_special_tokens=False)["input_ids"] for i in ids}
    keep = [k for k, (s, d) in enumerate(zip(pairs.src_ids.tolist(), pairs.dst_ids.tolist()))
            if s in src_seen and d in dst_seen]
    details = dict(pairs.details)
    if len(keep) < min_pairs:
        details["in_texts"] = f"only {len(keep)} pairs occur in the texts: all pairs kept"
        return replace(pairs, details=details)
    paired_dst = {pairs.dst_ids[k].item() for k in keep}
    details["in_texts"] = (f"{len(keep)} of {pairs.n_pairs} pairs occur in {len(texts)} texts, covering "
                           f"{len(paired_dst & dst_seen)}/{len(dst_seen)} destination tokens there")
    lone = [None if u is None else torch.tensor([i for i in u.tolist() if i in seen], dtype=torch.long)
            for u, seen in ((pairs.src_unpaired, src_seen), (pairs.dst_unpaired, dst_seen))]
    idx = torch.tensor(keep, dtype=torch.long)
    return replace(pairs, src_ids=pairs.src_ids[idx], dst_ids=pairs.dst_ids[idx], n_pairs=len(keep),
                   details=details, src_unpaired=lone[0], dst_unpaired=lone[1])


TEXT_PAIRS_PER_UNKNOWN = 2  # text pairs per unknown of the linear map (embed_dim + 1 per output) to fit on them alone


def converter_pairs(src_llm: Any, dst_llm: Any, records: Sequence[dict[str, Any]], *,
                    min_coverage: float = 0.05) -> TokenPairs:
    """The pairs VPGTrans fits its converter on: those in the training text when they determine the fit."""
    pairs = pair_tokens(src_llm.tokenizer, dst_llm.tokenizer, min_coverage=min_coverage)
    # The official code fits its converter on caption tokens; tokens that never occur in text keep an
    # untrained embedding; on the world they pulled the fit off the caption tokens (docs/design.md#measuring-transfer).
    # But a linear map has embed_dim + 1 unknowns per output: fewer text pairs than that (38 of a real
    # LLM pair's 46,017 on easy-vqa, against width 640) are fitted exactly and carry nothing. Then every
    # string pair is kept: in a real LLM every row is trained, so the reason to restrict is gone. The world
    # falls back too (49-58 caption pairs against OPT-s's 64), untrained rows included: OPT-m and FlanT5 fit
    # better for it, LLaMA worse (README, Transfer efficiency).
    # "Determine" means twice the unknowns, not just more: at 74 text pairs for 65 unknowns (a world with 16
    # colours and shapes) least squares all but interpolates them — on held-out caption tokens (5-fold) it maps
    # at cosine 0.40 / 0.33 where a fit on every pair reaches 0.63 / 0.58 (OPT-m / opt-l), and the merged
    # projector started worse than a fresh one (docs/results/world-regime.md, experiments 13-14).
    texts = [r[k] for r in records[:20000] for k in ("caption", "question", "answer") if isinstance(r.get(k), str)]
    return restrict_to_texts(pairs, src_llm.tokenizer, dst_llm.tokenizer, texts,
                             min_pairs=max(16, TEXT_PAIRS_PER_UNKNOWN * (int(src_llm.embed_dim) + 1)))


def pair_tokens_positional(src_tok: Any, dst_tok: Any, texts: Iterable[str], *,
                           min_coverage: float = 0.0) -> TokenPairs:
    """The official code's pairing, for comparison: positions in texts that tokenize to equal lengths.

    Only texts with the same number of tokens in both vocabularies are kept, and their tokens are
    paired position by position; a pair seen many times is listed once. Nothing guarantees that the
    tokens at one position spell the same thing, which `details` quantifies.
    """
    src_tok, dst_tok = _as_hf(src_tok), _as_hf(dst_tok)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise TokenPairingError("positional pairing got no texts", "pass captions from the training data")
    src_seqs = src_tok(texts, add_special_tokens=False)["input_ids"]
    dst_seqs = dst_tok(texts, add_special_tokens=False)["input_ids"]
    seen: dict[tuple[int, int], None] = {}
    kept = positions = 0
    for s, d in zip(src_seqs, dst_seqs):
        if len(s) != len(d) or not s:
            continue
        kept += 1
        positions += len(s)
        for pair in zip(s, d):
            seen.setdefault((int(pair[0]), int(pair[1])), None)
    partners: dict[int, set[int]] = {}
    for s_id, d_id in seen:
        partners.setdefault(s_id, set()).add(d_id)
    details = {"texts_kept": f"{kept}/{len(texts)}", "positions": positions,
               "source_tokens_with_several_partners": sum(len(v) > 1 for v in partners.values())}
    return _check_coverage(_make_pairs(list(seen), src_tok, dst_tok, "positional", details), min_coverage)
