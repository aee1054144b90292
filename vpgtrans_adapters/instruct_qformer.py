"""InstructBLIP's instruction-aware Q-Former.

The instruction, tokenised with the Q-Former's own BERT tokenizer, enters the Q-Former's
self-attention beside the learned queries (bidirectional mask over [queries; instruction]); only
the queries cross-attend to the image, and only the query outputs become soft prompts. This is
the BLIP-2 Q-Former of ``qformer.py`` with its text branch switched on, so BERT initialisation and
the weight layout are shared with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from vpgtrans.config import help_field
from vpgtrans.errors import ConfigError
from vpgtrans.registry import Component

from .qformer import QFormerConfig, QFormerVPG


@dataclass
class InstructQFormerConfig(QFormerConfig):
    """Q-Former config plus the instruction input; defaults are InstructBLIP's (BERT-base, 32 queries)."""

    text_input: bool = help_field(True, help="must stay true: the instruction is the text input")
    max_instruction_len: int = help_field(128, help="instruction tokens kept (InstructBLIP truncates on the left)")


class InstructQFormerVPG(QFormerVPG):
    """Q-Former whose queries also read the instruction through self-attention."""

    uses_instruction = True

    def __init__(self, config: InstructQFormerConfig):
        if not config.text_input:
            raise ConfigError("instruct-qformer: text_input is false",
                              "leave text_input at true (or use the plain 'qformer' VPG)")
        super().__init__(config)
        if self.tokenizer is not None:
            # Long instructions lose their beginning, not the question at the end (as InstructBLIP).
            self.tokenizer.truncation_side = "left"

    def tokenize(self, instructions: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Instruction ids and attention mask, padded to the longest in the batch."""
        if self.tokenizer is None:
            raise ConfigError("instruct-qformer has no tokenizer for the instructions",
                              "set vpg.tokenizer or vpg.init_from to a BERT checkpoint (name or directory)")
        enc = self.tokenizer(list(instructions), padding="longest", truncation=True,
                             max_length=min(self.config.max_instruction_len, self.config.max_position_embeddings),
                             return_tensors="pt")
        return enc.input_ids.to(device), enc.attention_mask.to(device)

    def forward(self, features: torch.Tensor, instructions: Sequence[str] | None = None) -> torch.Tensor:
        """[batch, tokens, vision_width] + one instruction per image → [batch, num_query_tokens, hidden_size]."""
        batch = features.shape[0]
        instructions = [""] * batch if instructions is None else list(instructions)
        if len(instructions) != batch:
            raise ConfigError(f"instruct-qformer got {len(instructions)} instructions for {batch} images",
                              "pass one instruction per image")
        ids, mask = self.tokenize(instructions, features.device)
        return self.encode(features, ids, mask)[:, : self.config.num_query_tokens]


INSTRUCT_QFORMER = Component(kind="vpg", name="instruct-qformer", factory=InstructQFormerVPG,
                             config_class=InstructQFormerConfig,
                             description="InstructBLIP Q-Former: instruction tokens join the queries in "
                                         "self-attention; only query outputs become prompts",
                             aliases=("instructblip-qformer",))
