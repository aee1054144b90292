"""VPGTrans's converter fitting: a map between the two LLMs' input embeddings, fitted on paired tokens.

Which pairs it is fitted on is pairing.py's `converter_pairs`; this file splits them into fitted and held-out
pairs (seeded), resolves the `auto` choice, fits a registered `converter` component (the identity is one too)
and writes the fitted map to ``out/converter/``. Folding it into the projector is merge.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import atomic_dir
from ..errors import DataError
from ..registry import build
from .pairing import TokenPairs


@dataclass
class ConverterFit:
    """A fitted converter and how well it maps pairs it was and was not fitted on."""

    linear: nn.Linear
    train_cosine: float
    heldout_cosine: float | None
    n_fit: int
    n_heldout: int
    seconds: float

    def summary(self) -> str:
        """One line for logs and reports."""
        held = f"{self.heldout_cosine:.4f} on {self.n_heldout} held-out pairs" if self.heldout_cosine is not None \
            else "no held-out pairs"
        return (f"converter {self.linear.in_features}→{self.linear.out_features}: mean cosine "
                f"{self.train_cosine:.4f} on {self.n_fit} fitted pairs, {held} ({self.seconds:.1f}s)")


IDENTITY = "identity"
AUTO = "auto"


def choose_converter(name: str, pairs: TokenPairs, src_width: int, dst_width: int) -> str:
    """Resolve 'auto': the identity for identical vocabularies of equal width (measured best), else linear-cosine."""
    if name != AUTO:
        return name
    same = pairs.method == "identity" and src_width == dst_width
    return IDENTITY if same else "linear-cosine"


@torch.no_grad()
def mean_cosine(linear: nn.Linear, src: torch.Tensor, dst: torch.Tensor) -> float:
    """Mean cosine similarity between linear(src) and dst, row by row."""
    return float(F.cosine_similarity(linear(src.float()), dst.float(), dim=-1).mean())


def fit_converter(converter: Any, src_emb: torch.Tensor, dst_emb: torch.Tensor,
                  pairs: TokenPairs | tuple[torch.Tensor, torch.Tensor], *, heldout: float = 0.1,
                  seed: int = 0) -> ConverterFit:
    """Fit `converter` (a Converter or a registered converter name) on a seeded split of the token pairs."""
    if isinstance(converter, str):
        converter = build("converter", converter)
    src_ids, dst_ids = (pairs.src_ids, pairs.dst_ids) if isinstance(pairs, TokenPairs) else pairs
    src_ids, dst_ids = torch.as_tensor(src_ids, dtype=torch.long), torch.as_tensor(dst_ids, dtype=torch.long)
    for name, ids, emb in (("source", src_ids, src_emb), ("destination", dst_ids, dst_emb)):
        if ids.numel() and int(ids.max()) >= emb.shape[0]:
            raise DataError(f"{name} token id {int(ids.max())} is outside the {name} embedding matrix "
                            f"({emb.shape[0]} rows)", "pair tokens with the tokenizer that belongs to that LLM")
    if not 0.0 <= heldout < 1.0:
        raise DataError(f"held-out fraction {heldout} is not in [0, 1)", "use e.g. 0.1")
    n = src_ids.numel()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = int(round(n * heldout))
    if n - n_held < 2:
        raise DataError(f"only {n} token pairs: too few to fit a converter", "pair more tokens (see --pairing)")
    fit_idx, held_idx = order[n_held:], order[:n_held]
    src = src_emb.detach()[src_ids.to(src_emb.device)].float()
    dst = dst_emb.detach()[dst_ids.to(dst_emb.device)].float().to(src.device)
    fit_idx, held_idx = fit_idx.to(src.device), held_idx.to(src.device)
    extra: dict[str, torch.Tensor] = {}
    if getattr(converter, "uses_unpaired", False):
        # Anchor-based converters also map tokens without a partner; the held-out pairs count as such
        # (their embeddings are known, their pairing is hidden from the fit).
        lone = (pairs.src_unpaired, pairs.dst_unpaired) if isinstance(pairs, TokenPairs) else (None, None)
        for key, ids, emb, rows in (("unpaired_src", lone[0], src_emb, src), ("unpaired_dst", lone[1], dst_emb, dst)):
            parts = [rows[held_idx]]
            if ids is not None and ids.numel():
                parts.append(emb.detach()[ids.to(emb.device)].float().to(src.device))
            extra[key] = torch.cat(parts)
    start = time.perf_counter()
    linear = converter.fit(src[fit_idx], dst[fit_idx], seed=seed, **extra)
    seconds = time.perf_counter() - start
    return ConverterFit(linear=linear, train_cosine=mean_cosine(linear, src[fit_idx], dst[fit_idx]),
                        heldout_cosine=mean_cosine(linear, src[held_idx], dst[held_idx]) if n_held else None,
                        n_fit=n - n_held, n_heldout=n_held, seconds=seconds)




def save_converter(fit: ConverterFit, pairs: TokenPairs, name: str, out: Path) -> Path:
    """out/converter/: converter.safetensors (weight, bias) + converter.json (name, pairs, cosines)."""
    from safetensors.torch import save_file

    lin = fit.linear
    info = {"converter": name, "in_features": lin.in_features, "out_features": lin.out_features,
            "pairs": pairs.summary(), "n_pairs": pairs.n_pairs,
            "src_coverage": pairs.src_coverage, "dst_coverage": pairs.dst_coverage,
            "train_cosine": fit.train_cosine, "heldout_cosine": fit.heldout_cosine,
            "seconds": round(fit.seconds, 3)}
    target = out / "converter"
    with atomic_dir(target) as tmp:
        state = {"weight": lin.weight.detach().float().contiguous()}
        if lin.bias is not None:
            state["bias"] = lin.bias.detach().float().contiguous()
        save_file(state, str(tmp / "converter.safetensors"))
        (tmp / "converter.json").write_text(json.dumps(info, indent=2))
    return target
