"""What each component kind must provide. Built-ins and plugins subclass these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn


class VisionEncoder(nn.Module):
    """A frozen image encoder: images → features of shape [batch, tokens, hidden_size].

    Subclasses set ``hidden_size`` and ``num_tokens`` and implement ``preprocess`` and ``forward``.
    ``cache_id`` names the encoder *and its weights* so cached features are never reused across models.
    """

    hidden_size: int
    num_tokens: int

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """Turn PIL images into the pixel tensor `forward` expects."""
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def cache_id(self) -> str:
        """A string that changes whenever the features for the same image would change."""
        raise NotImplementedError


class VPG(nn.Module):
    """A visual prompt generator: vision features → [batch, num_prompts, output_dim] prompts.

    The projector to the LLM is *not* part of the VPG: it is the model's `projector`, the only
    piece that depends on the LLM's embedding space (what VPGTrans exploits).
    """

    output_dim: int
    # True when forward() uses the text instruction (InstructBLIP-style VPGs).
    uses_instruction: bool = False

    def num_prompts(self, num_vision_tokens: int) -> int:
        """How many soft prompts this VPG emits for a given number of vision tokens."""
        raise NotImplementedError

    def forward(self, features: torch.Tensor, instructions: Sequence[str] | None = None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - interface


@dataclass
class TextSample:
    """The text around the soft prompts for one example.

    Decoder-only sequence: ``[BOS] before <soft prompts> after target [end]`` — when ``before`` is
    empty the soft prompts come first and BOS follows them (BLIP-2 convention).
    Encoder-decoder: encoder gets ``before <soft prompts> after``; the decoder predicts ``target``.
    """

    before: str = ""
    after: str = ""
    target: str = ""


@dataclass
class GenerationConfig:
    """Decoding settings for `generate`."""

    max_new_tokens: int = 30
    num_beams: int = 1
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    # Text is cut at the first of these strings, as lmms-eval's `until`: a model asked for one word that
    # writes on after it ("yes\n---") is read by its answer, not counted wrong for the rest.
    stop: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


class LLMBackend(nn.Module):
    """A frozen language model that accepts soft prompts as input embeddings.

    ``embed_dim`` is the width of the space soft prompts live in (the input-embedding width, which
    for OPT with ``project_in`` is ``word_embed_proj_dim``, not the hidden size).
    """

    embed_dim: int
    is_encoder_decoder: bool = False
    tokenizer: Any
    model: nn.Module

    def input_embedding_matrix(self) -> torch.Tensor:
        """The [vocab, embed_dim] matrix that maps token ids into the soft-prompt space."""
        raise NotImplementedError

    def loss(self, prompts: torch.Tensor, samples: Sequence[TextSample], max_text_len: int = 128) -> torch.Tensor:
        """Mean LM loss over the target tokens given soft prompts [batch, n, embed_dim]."""
        raise NotImplementedError

    def logits(self, prompts: torch.Tensor, samples: Sequence[TextSample], max_text_len: int = 128) -> torch.Tensor:
        """Raw logits of the forward used by `loss` (for export equivalence checks)."""
        raise NotImplementedError

    def generate(self, prompts: torch.Tensor, samples: Sequence[TextSample], config: GenerationConfig) -> list[str]:
        """Decode text after the soft prompts; `target` of each sample is ignored."""
        raise NotImplementedError


class Converter:
    """Fits a map g(x) = W·x + b from source to destination LLM input embeddings."""

    def fit(self, src: torch.Tensor, dst: torch.Tensor, *, seed: int = 0) -> nn.Linear:
        """Return an nn.Linear(src_dim, dst_dim) mapping rows of `src` onto rows of `dst`."""
        raise NotImplementedError
