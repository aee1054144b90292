"""LLaVA-style VPGs: every patch feature becomes one soft prompt.

The model's projector (one ``nn.Linear(vpg.output_dim, llm_width)``) is the last layer of both:

- ``linear`` (LLaVA-1): the VPG itself is the identity, so the whole LLaVA-1 projection *is* the
  model projector, and VPGTrans' converter merge applies to all of it.
- ``mlp`` (LLaVA-1.5): the VPG is ``Linear(vision, hidden)``-GELU and the model projector is the
  second Linear, together LLaVA-1.5's Linear-GELU-Linear.

Which vision layer feeds them (LLaVA uses the penultimate one) is the vision component's ``layer``
option, e.g. ``vision: {name: clip-vit, path: clip-vit-l, layer: -2}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from vpgtrans.config import help_field
from vpgtrans.errors import ConfigError
from vpgtrans.interfaces import VPG
from vpgtrans.registry import Component

_DROP_CLS_HELP = ("drop the first (CLS) token of the features, as LLaVA does; leave off when the vision "
                  "component already has drop_cls set (one feature cache can then serve both choices)")


@dataclass
class LinearVPGConfig:
    """LLaVA-1 projection: the VPG passes patch features through; the model projector maps them to the LLM."""

    drop_cls: bool = help_field(False, help=_DROP_CLS_HELP)
    vision_width: int = help_field(0, help="width of the vision features; 0 = taken from the vision encoder")


@dataclass
class MLPVPGConfig:
    """LLaVA-1.5 projection: Linear(vision, hidden)-GELU here, the second Linear is the model projector."""

    hidden_size: int = help_field(4096, help="width after the first Linear (LLaVA-1.5 uses the LLM width, "
                                             "4096 for 7B models)")
    drop_cls: bool = help_field(False, help=_DROP_CLS_HELP)
    vision_width: int = help_field(0, help="width of the vision features; 0 = taken from the vision encoder")


def _check_width(name: str, width: int) -> None:
    if width <= 0:
        raise ConfigError(f"{name}: vision_width is not set",
                          "build the VPG through build_model() or set vision_width to the encoder width")


class _PerPatchVPG(VPG):
    """Shared token handling: one prompt per (kept) vision token."""

    # Reference vision width for parameter counts at the paper's size (CLIP ViT-L/14, as in LLaVA).
    reference_vision_width = 1024

    def __init__(self, drop_cls: bool):
        super().__init__()
        self.drop_cls = drop_cls

    def num_prompts(self, num_vision_tokens: int) -> int:
        """One prompt per vision token (minus the CLS token when it is dropped)."""
        return num_vision_tokens - int(self.drop_cls)

    def _tokens(self, features: torch.Tensor) -> torch.Tensor:
        return features[:, 1:] if self.drop_cls else features


class LinearVPG(_PerPatchVPG):
    """Identity VPG (no parameters of its own): the model projector is LLaVA-1's linear layer."""

    def __init__(self, config: LinearVPGConfig):
        _check_width("linear", config.vision_width)
        super().__init__(config.drop_cls)
        self.config = config
        self.output_dim = config.vision_width

    def forward(self, features: torch.Tensor, instructions: Sequence[str] | None = None) -> torch.Tensor:
        """[batch, tokens, vision_width] → the same features (optionally without CLS)."""
        return self._tokens(features)


class MLPVPG(_PerPatchVPG):
    """Linear-GELU; followed by the model projector it is LLaVA-1.5's two-layer MLP."""

    def __init__(self, config: MLPVPGConfig):
        _check_width("mlp", config.vision_width)
        super().__init__(config.drop_cls)
        self.config = config
        self.fc = nn.Linear(config.vision_width, config.hidden_size)
        self.act = nn.GELU()
        self.output_dim = config.hidden_size

    def forward(self, features: torch.Tensor, instructions: Sequence[str] | None = None) -> torch.Tensor:
        """[batch, tokens, vision_width] → [batch, tokens, hidden_size]."""
        tokens = self._tokens(features).to(self.fc.weight.dtype)
        return self.act(self.fc(tokens))


LINEAR = Component(kind="vpg", name="linear", factory=LinearVPG, config_class=LinearVPGConfig,
                   description="LLaVA-1 linear projection: every patch feature becomes a soft prompt; the model "
                               "projector is the whole projection (0 parameters of its own)",
                   aliases=("llava",))
MLP = Component(kind="vpg", name="mlp", factory=MLPVPG, config_class=MLPVPGConfig,
                description="LLaVA-1.5 MLP projection: Linear-GELU per patch, then the model projector "
                            "(the second Linear)", aliases=("llava-1.5",))
