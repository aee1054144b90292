"""How related the world LMs' input embeddings are: converter cosines for every ordered pair of LMs.

For each ordered pair (source, destination) the tokens are paired by string (`pair_tokens`), restricted
to pairs whose two tokens both occur in the LMs' pretraining text (a token the LMs never saw keeps its
random init, which no map can relate and no soft prompt imitates), and each converter is scored by
k-fold cross-validation: every pair is held out exactly once, fitted on the rest. Two held-out means:
uniform over the pairs, and weighted by how often the destination token occurs in captions (the tokens
soft prompts must imitate).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

DEFAULT_CONVERTERS = ("linear-cosine", "lstsq", "procrustes", "ridge", "ridge-whitened", "anchor-omp")


def token_counts(tok: Any, texts: Iterable[str]) -> Counter:
    """How often each token id occurs in `texts` (each text tokenized alone, no special tokens)."""
    counts: Counter = Counter()
    texts = [t for t in texts if t]
    for ids in tok(texts, add_special_tokens=False)["input_ids"] if texts else []:
        counts.update(ids)
    return counts


def seen_pairs(src_tok: Any, dst_tok: Any, src_seen: Counter, dst_seen: Counter, *,
               min_coverage: float = 0.0) -> tuple[Any, torch.Tensor]:
    """String pairs whose two tokens occur in text, and a mask of those among all string pairs."""
    from ..transfer.pairing import pair_tokens

    pairs = pair_tokens(src_tok, dst_tok, min_coverage=min_coverage)
    keep = torch.tensor([src_seen[int(s)] > 0 and dst_seen[int(d)] > 0
                         for s, d in zip(pairs.src_ids, pairs.dst_ids)], dtype=torch.bool)
    return pairs, keep


def crossval_cosines(converter: Any, src: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor, *,
                     folds: int = 5, seed: int = 0, lone_src: torch.Tensor | None = None,
                     lone_dst: torch.Tensor | None = None) -> dict[str, float]:
    """Held-out cosine of `converter` by k-fold over the rows: uniform and `weights`-weighted means.

    A converter that uses unmatched tokens (`uses_unpaired`) gets the held-out rows of each side as
    unmatched (their pairing is hidden, not their embeddings: a transfer knows both vocabularies) plus
    `lone_src` / `lone_dst`, the tokens the string match could not pair.
    """
    n = src.shape[0]
    folds = max(2, min(folds, n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cos = torch.zeros(n)
    for k in range(folds):
        held = order[k::folds]
        fit = torch.ones(n, dtype=torch.bool)
        fit[held] = False
        if getattr(converter, "uses_unpaired", False):
            extra_s = src[held] if lone_src is None else torch.cat([src[held], lone_src])
            extra_d = dst[held] if lone_dst is None else torch.cat([dst[held], lone_dst])
            linear = converter.fit(src[fit], dst[fit], seed=seed + k, unpaired_src=extra_s, unpaired_dst=extra_d)
        else:
            linear = converter.fit(src[fit], dst[fit], seed=seed + k)
        with torch.no_grad():
            cos[held] = F.cosine_similarity(linear(src[held].float()), dst[held].float(), dim=-1)
    w = weights.double()
    weighted = float((cos.double() * w).sum() / w.sum()) if float(w.sum()) > 0 else float("nan")
    return {"uniform": round(float(cos.mean()), 4), "caption_weighted": round(weighted, 4)}


def pair_report(src: dict[str, Any], dst: dict[str, Any], converters: Sequence[str] = DEFAULT_CONVERTERS,
                folds: int = 5, seed: int = 0, configs: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Coverage and held-out cosines of each converter for one ordered pair of LMs.

    `src` / `dst`: {"tok", "emb" [V, D], "seen" Counter (pretraining text), "captions" Counter}.
    """
    from ..registry import build

    pairs, keep = seen_pairs(src["tok"], dst["tok"], src["seen"], dst["seen"])
    s_ids, d_ids = pairs.src_ids[keep], pairs.dst_ids[keep]
    n_dst_caption = sum(1 for c in dst["captions"].values() if c > 0)
    weights = torch.tensor([float(dst["captions"][int(d)]) for d in d_ids])
    out: dict[str, Any] = {
        "string_pairs": pairs.n_pairs, "src_coverage": round(pairs.src_coverage, 4),
        "dst_coverage": round(pairs.dst_coverage, 4), "seen_pairs": int(keep.sum()),
        "dst_seen_tokens": sum(1 for c in dst["seen"].values() if c > 0),
        "dst_caption_tokens": n_dst_caption,
        "dst_caption_tokens_paired": int((weights > 0).sum()),
        "caption_mass_paired": round(float(weights.sum()) / max(1.0, float(sum(dst["captions"].values()))), 4),
        "converters": {}}
    if len(s_ids) < 4:
        return out
    x = src["emb"].detach().float()[s_ids]
    y = dst["emb"].detach().float()[d_ids]
    lone_s = _lone(src, set(pairs.src_ids.tolist()))
    lone_d = _lone(dst, set(pairs.dst_ids.tolist()))
    out["unmatched_seen"] = [len(lone_s), len(lone_d)]
    for name in converters:
        t = time.perf_counter()
        scores = crossval_cosines(build("converter", name, (configs or {}).get(name)), x, y, weights, folds=folds, seed=seed,
                                  lone_src=src["emb"].detach().float()[lone_s], lone_dst=dst["emb"].detach().float()[lone_d])
        out["converters"][name] = {**scores, "seconds": round(time.perf_counter() - t, 2)}
    return out


def _lone(side: dict[str, Any], paired: set[int]) -> list[int]:
    """Seen tokens with a string of their own that the string match left without a partner."""
    from ..transfer.pairing import normalised_vocab

    return sorted(i for i in normalised_vocab(side["tok"]) if side["seen"][i] > 0 and i not in paired)


def converter_report(lms: dict[str, dict[str, Any]], converters: Sequence[str] = DEFAULT_CONVERTERS,
                     folds: int = 5, seed: int = 0, configs: dict[str, dict[str, Any]] | None = None
                     ) -> dict[str, Any]:
    """`pair_report` for every ordered pair of the named LMs (keys "src>dst"); `configs` per converter name."""
    return {f"{a}>{b}": pair_report(lms[a], lms[b], converters, folds, seed, configs)
            for a in lms for b in lms if a != b}


def report_lines(report: dict[str, Any]) -> list[str]:
    """One line per ordered pair and converter: coverage and held-out cosines."""
    lines = []
    for key, row in report.items():
        head = (f"{key}: {row['seen_pairs']} seen pairs, {row['dst_caption_tokens_paired']}/"
                f"{row['dst_caption_tokens']} caption tokens paired ({row['caption_mass_paired']:.0%} of mass)")
        conv = ", ".join(f"{n} {v['caption_weighted']:.3f}/{v['uniform']:.3f}" for n, v in row["converters"].items())
        lines.append(f"{head}; held-out cosine weighted/uniform: {conv}")
    return lines
