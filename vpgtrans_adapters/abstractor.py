"""mPLUG-Owl's visual abstractor: learned queries attend over [queries; patch features].

Each layer is one attention whose keys and values are the (normalised) queries concatenated with
the (normalised) patch features, followed by a SwiGLU MLP with a LayerNorm on its inner width.
After the last layer a learned end-of-vision prompt is appended (64 queries → 65 prompts).

mPLUG-Owl's final ``visual_fc`` (abstractor width → LLM width) is this toolkit's model projector, so
the end-of-vision prompt lives in the abstractor's width and reaches the LLM through the projector;
that keeps everything LLM-specific in the one Linear VPGTrans converts. transformers has no class for
the abstractor, so it is written here with torch modules and ``scaled_dot_product_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vpgtrans.config import help_field
from vpgtrans.errors import ConfigError
from vpgtrans.interfaces import VPG
from vpgtrans.registry import Component


@dataclass
class AbstractorConfig:
    """Visual abstractor size; defaults are mPLUG-Owl's (64 queries, 6 layers, width 1024, 16 heads)."""

    num_query_tokens: int = help_field(64, help="number of learned queries (prompts = queries + 1 end prompt)")
    hidden_size: int = help_field(1024, help="abstractor width")
    num_hidden_layers: int = help_field(6, help="abstractor layers")
    num_attention_heads: int = help_field(16, help="attention heads per layer")
    intermediate_size: int = help_field(2816, help="SwiGLU inner width (mPLUG-Owl: 2/3 of 4096 rounded up to 256)")
    dropout: float = help_field(0.0, help="attention dropout")
    layer_norm_eps: float = help_field(1e-6, help="LayerNorm epsilon")
    end_prompt: bool = help_field(True, help="append a learned end-of-vision prompt after the queries")
    vision_width: int = help_field(0, help="width of the vision features; 0 = taken from the vision encoder. "
                                           "When it differs from hidden_size a Linear maps features to hidden_size "
                                           "(mPLUG-Owl's CLIP ViT-L width equals its abstractor width)")


class SwiGLU(nn.Module):
    """silu(w1·x) * w3·x → LayerNorm → w2 (mPLUG-Owl's abstractor MLP)."""

    def __init__(self, width: int, inner: int, eps: float):
        super().__init__()
        self.w1 = nn.Linear(width, inner)
        self.w3 = nn.Linear(width, inner)
        self.ffn_ln = nn.LayerNorm(inner, eps=eps)
        self.w2 = nn.Linear(inner, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., width] → [..., width]."""
        return self.w2(self.ffn_ln(F.silu(self.w1(x)) * self.w3(x)))


class AbstractorLayer(nn.Module):
    """One attention over [queries; patches] plus a SwiGLU MLP, both residual."""

    def __init__(self, config: AbstractorConfig):
        super().__init__()
        width = config.hidden_size
        if width % config.num_attention_heads:
            raise ConfigError(f"abstractor: hidden_size {width} is not divisible by "
                              f"num_attention_heads {config.num_attention_heads}", "pick a head count that divides it")
        self.heads = config.num_attention_heads
        self.dropout = config.dropout
        self.norm_q = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.norm_kv = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = SwiGLU(width, config.intermediate_size, config.layer_norm_eps)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, queries: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """queries [B, Q, D], patches [B, T, D] → updated queries [B, Q, D]."""
        q = self.norm_q(queries)
        kv = torch.cat([q, self.norm_kv(patches)], dim=1)
        attn = F.scaled_dot_product_attention(self._split(self.q_proj(q)), self._split(self.k_proj(kv)),
                                              self._split(self.v_proj(kv)),
                                              dropout_p=self.dropout if self.training else 0.0)
        b, _, n, _ = attn.shape
        # As in mPLUG-Owl, the residual branch starts from the normalised queries.
        x = q + self.out_proj(attn.transpose(1, 2).reshape(b, n, -1))
        return x + self.mlp(self.norm_mlp(x))


class AbstractorVPG(VPG):
    """Learned queries → N abstractor layers → queries (+ end-of-vision prompt)."""

    # Reference vision width for parameter counts at the paper's size (CLIP ViT-L/14, as in mPLUG-Owl).
    reference_vision_width = 1024

    def __init__(self, config: AbstractorConfig):
        super().__init__()
        if config.vision_width <= 0:
            raise ConfigError("abstractor: vision_width is not set",
                              "build the VPG through build_model() or set vision_width to the encoder width")
        self.config = config
        width = config.hidden_size
        self.vision_proj = (nn.Linear(config.vision_width, width) if config.vision_width != width
                            else nn.Identity())
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, width))
        self.layers = nn.ModuleList(AbstractorLayer(config) for _ in range(config.num_hidden_layers))
        self.end_prompt = nn.Parameter(torch.zeros(1, 1, width)) if config.end_prompt else None
        self.output_dim = width
        self._init_weights()

    def _init_weights(self) -> None:
        # BERT-style initialisation (normal 0.02), as mPLUG-Owl's initializer_range.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.query_tokens, std=0.02)
        if self.end_prompt is not None:
            # Appended after the last layer (no LayerNorm follows), so it starts at the scale of layer outputs.
            nn.init.normal_(self.end_prompt, std=1.0)

    def num_prompts(self, num_vision_tokens: int) -> int:
        """Queries plus the end-of-vision prompt, whatever the image size."""
        return self.config.num_query_tokens + int(self.end_prompt is not None)

    def forward(self, features: torch.Tensor, instructions: Sequence[str] | None = None) -> torch.Tensor:
        """[batch, tokens, vision_width] → [batch, num_query_tokens (+1), hidden_size]."""
        patches = self.vision_proj(features.to(self.query_tokens.dtype))
        x = self.query_tokens.expand(features.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, patches)
        if self.end_prompt is not None:
            x = torch.cat([x, self.end_prompt.expand(x.shape[0], -1, -1)], dim=1)
        return x


ABSTRACTOR = Component(kind="vpg", name="abstractor", factory=AbstractorVPG, config_class=AbstractorConfig,
                       description="mPLUG-Owl visual abstractor: 64 queries attend over [queries; patches] in 6 "
                                   "layers with SwiGLU MLPs, plus a learned end-of-vision prompt",
                       aliases=("visual-abstractor", "mplug-owl"))
