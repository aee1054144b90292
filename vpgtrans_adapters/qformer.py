"""BLIP-2 Q-Former VPG: learned query tokens read the image through transformers' `Blip2QFormerModel`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from vpgtrans.config import help_field
from vpgtrans.errors import ConfigError
from vpgtrans.interfaces import VPG
from vpgtrans.names import load_pretrained, resolve
from vpgtrans.registry import Component


@dataclass
class QFormerConfig:
    """Q-Former size and initialisation; defaults are BLIP-2's (BERT-base, 32 queries)."""

    num_query_tokens: int = help_field(32, help="number of learned queries = number of soft prompts")
    hidden_size: int = help_field(768, help="Q-Former width (taken from the BERT checkpoint when init_from is set)")
    num_hidden_layers: int = help_field(12, help="Q-Former layers")
    num_attention_heads: int = help_field(12, help="attention heads per layer")
    intermediate_size: int = help_field(3072, help="feed-forward width")
    cross_attention_frequency: int = help_field(2, help="a cross-attention to the image every N layers")
    dropout: float = help_field(0.1, help="hidden and attention dropout")
    vision_width: int = help_field(0, help="width of the vision features; 0 = taken from the vision encoder")
    vision_layernorm: bool = help_field(False, help="LayerNorm on vision features before cross-attention "
                                                    "(LAVIS's ln_vision); transformers' BLIP-2 folds it into the ViT")
    init_from: str | None = help_field(None, help="BERT checkpoint (name or dir) to initialise self-attention "
                                                 "and feed-forward layers from, as BLIP-2 does")
    text_input: bool = help_field(False, help="also build text embeddings and text feed-forward layers "
                                              "(needed for BLIP-2 stage 1 and instruction-aware Q-Formers)")
    tokenizer: str | None = help_field(None, help="tokenizer for text input (defaults to init_from)")
    vocab_size: int = help_field(30522, help="text vocabulary size when text_input is set without a tokenizer")
    max_position_embeddings: int = help_field(512, help="text positions (taken from the BERT checkpoint when "
                                                        "init_from is set)")


def _bert_state_to_qformer(bert_state: dict[str, torch.Tensor], num_layers: int,
                           with_text: bool) -> dict[str, torch.Tensor]:
    """Rename BERT weights onto Q-Former modules (BLIP-2 copies the FFN into the query branch)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in bert_state.items():
        key = key.removeprefix("bert.")
        if key.startswith("embeddings.LayerNorm."):
            out["qformer.layernorm." + key.split(".")[-1]] = value
        elif key.startswith("embeddings.word_embeddings.") and with_text:
            out["text_embeddings.word_embeddings.weight"] = value
        elif key.startswith("embeddings.position_embeddings.") and with_text:
            out["text_embeddings.position_embeddings.weight"] = value
        elif key.startswith("encoder.layer."):
            parts = key.split(".")
            if int(parts[2]) >= num_layers:
                continue
            rest = ".".join(parts[3:])
            prefix = f"qformer.encoder.layer.{parts[2]}."
            if rest.startswith("attention.self."):
                out[prefix + "attention.attention." + rest[len("attention.self."):]] = value
            elif rest.startswith("attention.output."):
                out[prefix + rest] = value
            elif rest.startswith("intermediate."):
                out[prefix + "intermediate_query." + rest[len("intermediate."):]] = value
                if with_text:
                    out[prefix + rest] = value
            elif rest.startswith("output."):
                out[prefix + "output_query." + rest[len("output."):]] = value
                if with_text:
                    out[prefix + rest] = value
    return out


class QFormerVPG(VPG):
    """Learned queries → Q-Former (self-attention, cross-attention to image features) → prompts."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        if config.vision_width <= 0:
            raise ConfigError("qformer: vision_width is not set",
                              "build the VPG through build_model() or set vision_width to the encoder width")
        self.config = config
        bert = None
        if config.init_from:
            from transformers import AutoModel

            bert = load_pretrained(AutoModel.from_pretrained, config.init_from, resolve(config.init_from, {}),
                                   what="Q-Former init checkpoint")
            bc = bert.config
            config.hidden_size, config.num_attention_heads = bc.hidden_size, bc.num_attention_heads
            config.intermediate_size = bc.intermediate_size
            config.num_hidden_layers = min(config.num_hidden_layers, bc.num_hidden_layers)
            config.vocab_size = bc.vocab_size
            config.max_position_embeddings = bc.max_position_embeddings
        self.tokenizer = None
        tok_path = config.tokenizer or config.init_from
        if config.text_input and tok_path:
            from transformers import AutoTokenizer

            self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, tok_path, resolve(tok_path, {}),
                                             what="Q-Former tokenizer")
            config.vocab_size = max(config.vocab_size, len(self.tokenizer))
        self.qformer_config = Blip2QFormerConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size, hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.dropout, cross_attention_frequency=config.cross_attention_frequency,
            encoder_hidden_size=config.vision_width, use_qformer_text_input=config.text_input,
            max_position_embeddings=config.max_position_embeddings,
        )
        self.qformer = Blip2QFormerModel(self.qformer_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.hidden_size))
        nn.init.normal_(self.query_tokens, std=self.qformer_config.initializer_range)
        self.ln_vision = nn.LayerNorm(config.vision_width) if config.vision_layernorm else nn.Identity()
        if config.text_input:
            from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

            self.text_embeddings = Blip2TextEmbeddings(self.qformer_config)
        self.output_dim = config.hidden_size
        if bert is not None:
            mapped = _bert_state_to_qformer(bert.state_dict(), config.num_hidden_layers, config.text_input)
            missing = self.load_state_dict(mapped, strict=False)
            self.loaded_from_bert = sorted(set(mapped) - set(missing.unexpected_keys))

    def num_prompts(self, num_vision_tokens: int) -> int:
        """Always the number of queries, whatever the image size."""
        return self.config.num_query_tokens

    def encode(self, features: torch.Tensor, text_ids: torch.Tensor | None = None,
               text_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run queries (optionally followed by text tokens) over image features; returns all hidden states."""
        features = self.ln_vision(features.to(self.query_tokens.dtype))
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        n_query = queries.shape[1]
        if text_ids is not None:
            embeds = self.text_embeddings(input_ids=text_ids, query_embeds=queries)
            if attention_mask is None:
                q_mask = torch.ones(queries.shape[:2], dtype=torch.long, device=queries.device)
                attention_mask = torch.cat([q_mask, text_mask.long()], dim=1) if text_mask is not None else None
        else:
            embeds = queries
        image_mask = torch.ones(features.shape[:2], dtype=torch.long, device=features.device)
        out = self.qformer(query_embeds=embeds, query_length=n_query, attention_mask=attention_mask,
                           encoder_hidden_states=features, encoder_attention_mask=image_mask)
        return out.last_hidden_state

    def forward(self, features: torch.Tensor, instructions: Sequence[str] | None = None) -> torch.Tensor:
        """[batch, tokens, vision_width] → [batch, num_query_tokens, hidden_size]."""
        return self.encode(features)[:, : self.config.num_query_tokens]


QFORMER = Component(kind="vpg", name="qformer", factory=QFormerVPG, config_class=QFormerConfig,
                    description="BLIP-2 Q-Former: learned queries + transformers Blip2QFormerModel, "
                                "optional BERT initialisation",
                    aliases=("blip2-qformer",))
