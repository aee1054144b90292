"""VPGTrans's merge: the fitted converter folded into the source projector, W_dst = W_c·W_src."""

from __future__ import annotations

import torch
from torch import nn

from vpgtrans.errors import CheckpointError

@torch.no_grad()
def merge_projector(src_proj: nn.Linear, conv: nn.Linear) -> nn.Linear:
    """The destination projector conv∘src_proj: W_dst = W_c·W_src, b_dst = W_c·b_src + b_c."""
    # Official code order. The paper's Eq. (2) writes the product the other way round, which does not
    # even type-check (W_src is [d_src, d_vpg], W_c is [d_dst, d_src]).
    if conv.in_features != src_proj.out_features:
        raise CheckpointError(
            f"converter input width {conv.in_features} does not match the source projector output width "
            f"{src_proj.out_features}", "fit the converter on the source LLM the VPG was trained with")
    dev = src_proj.weight.device
    w_src, w_c = src_proj.weight.double(), conv.weight.to(dev, torch.float64)
    b_src = src_proj.bias.double() if src_proj.bias is not None else w_src.new_zeros(w_src.shape[0])
    b_c = conv.bias.to(dev, torch.float64) if conv.bias is not None else w_c.new_zeros(w_c.shape[0])
    merged = nn.Linear(src_proj.in_features, conv.out_features, device=dev, dtype=src_proj.weight.dtype)
    merged.weight.copy_(w_c @ w_src)
    merged.bias.copy_(w_c @ b_src + b_c)
    return merged


def merged_equals(projector: nn.Linear, source_projector: nn.Linear, conv: nn.Linear, atol: float = 1e-5) -> bool:
    """True when `projector` is W_c·W_src, W_c·b_src + b_c (a check for tests and --debug)."""
    with torch.no_grad():
        w = conv.weight.double() @ source_projector.weight.double()
        b = conv.weight.double() @ source_projector.bias.double() + conv.bias.double()
        return bool(torch.allclose(projector.weight.double(), w, atol=atol)
                    and torch.allclose(projector.bias.double(), b, atol=atol))
