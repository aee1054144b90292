"""BLIP-2 stage 1: train the Q-Former on frozen image features with ITC, ITM and ITG (no LLM).

One Q-Former runs over ``[queries; text]`` three times per batch, each time with its own
self-attention mask (image cross-attention is always on the query part only):

======  ==========================  ==============================================
loss    mask                        who sees whom
======  ==========================  ==============================================
ITC     uni-modal                   queries ↔ queries, text ↔ text
ITM     bi-directional              everyone ↔ everyone
ITG     multimodal-causal           queries ↔ queries; text → all queries + earlier text
======  ==========================  ==============================================

Single process only: under DDP, gather image and text embeddings across ranks before the
similarity matrix (as LAVIS's ``concat_all_gather``), otherwise ITC/ITM see only the local batch.

Text is ``[CLS] caption [SEP]`` with any tokenizer (BERT's own specials; others get ``[CLS]``,
``[SEP]``, ``[PAD]`` added). The text decoder (ITG) starts with a ``[DEC]`` token in place of
``[CLS]``: the tokenizer's own BOS token when it has one, otherwise ``[DEC]`` is added as BOS
(BLIP-2 does the same with BERT); the word-embedding table grows to fit added tokens. The LM head is BERT's (dense → GELU → LayerNorm)
with output weights tied to the text word embeddings plus a free bias.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import atomic_dir
from ..config import to_dict
from ..errors import CheckpointError, ConfigError
from ..registry import get as get_component

DEC_TOKEN = "[DEC]"
STAGE1_WEIGHTS = "stage1.safetensors"
STAGE1_MANIFEST = "stage1.json"
STAGE1_TOKENIZER = "tokenizer"
_TEXT_ONLY_PREFIXES = ("text_embeddings.",)


def attention_mask_4d(kind: str, n_query: int, text_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [batch, 1, Q+L, Q+L] self-attention mask for 'unimodal', 'bidirectional' or 'causal'."""
    batch, n_text = text_mask.shape
    n = n_query + n_text
    dev = text_mask.device
    allowed = torch.ones(n, n, dtype=torch.bool, device=dev)
    is_query = torch.arange(n, device=dev) < n_query
    if kind == "unimodal":
        allowed = is_query[:, None] == is_query[None, :]
    elif kind == "causal":
        allowed = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
        allowed[:, :n_query] = True  # every row sees all queries …
        allowed[:n_query, n_query:] = False  # … and queries never see text
    elif kind != "bidirectional":
        raise ConfigError(f"unknown attention mask kind {kind!r}", "use unimodal, bidirectional or causal")
    keys = torch.cat([torch.ones(batch, n_query, dtype=torch.bool, device=dev), text_mask.bool()], dim=1)
    allowed = allowed[None] & keys[:, None, :]
    out = torch.zeros(batch, 1, n, n, dtype=dtype, device=dev)
    return out.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def _smoothed_targets(positive: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Row-normalised positives mixed with a uniform ε (equals CE label smoothing for one positive per row)."""
    pos = positive.float()
    return (1.0 - smoothing) * pos / pos.sum(1, keepdim=True) + smoothing / pos.shape[1]


class Stage1Model(nn.Module):
    """A text-capable Q-Former plus BLIP-2's stage-1 heads: projections, temperature, ITM and LM heads."""

    def __init__(self, vpg: Mapping[str, Any] | Any, vision_width: int | None = None, *, embed_dim: int = 256,
                 max_text_len: int = 32, label_smoothing: float = 0.1, temp: float = 0.07, itm_share: float = 1.0):
        super().__init__()
        cfg = dict(to_dict(vpg) if not isinstance(vpg, Mapping) else vpg)
        name = cfg.pop("name", "qformer")
        cfg["text_input"] = True
        if vision_width:
            cfg["vision_width"] = int(vision_width)
        component = get_component("vpg", name).component
        self.vpg = component.build(component.make_config(cfg))
        if not all(hasattr(self.vpg, a) for a in ("text_embeddings", "encode", "tokenizer")):
            raise ConfigError(f"VPG {name!r} cannot read text, so it cannot be trained with BLIP-2 stage 1",
                              "use vpg name 'qformer' (a Q-Former)")
        if self.vpg.tokenizer is None:
            raise ConfigError("stage 1 needs a text tokenizer for the Q-Former",
                              "set vpg.tokenizer (or vpg.init_from) to a BERT checkpoint")
        self.vpg_name = name
        self.embed_dim, self.max_text_len, self.label_smoothing = embed_dim, max_text_len, label_smoothing
        self.itm_share = itm_share
        self.tokenizer = self.vpg.tokenizer
        if not getattr(self.vpg, "loaded_from_bert", None):
            # Fresh text embeddings come out of nn.Embedding at N(0, 1); BERT's scale (0.02) keeps the
            # tied LM head's first logits small, as after a BERT initialisation.
            for table in (self.vpg.text_embeddings.word_embeddings, self.vpg.text_embeddings.position_embeddings):
                nn.init.normal_(table.weight, std=self.vpg.qformer_config.initializer_range)
        self._ensure_special_tokens()
        hidden = self.vpg.output_dim
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

        self.lm_transform = BertPredictionHeadTransform(self.vpg.qformer_config)
        self.lm_bias = nn.Parameter(torch.zeros(self.vpg.text_embeddings.word_embeddings.num_embeddings))

    # --- text -----------------------------------------------------------------------------------
    def _ensure_special_tokens(self) -> None:
        """[CLS]/[SEP]/[PAD] for any tokenizer, and the decoder's start token; grow the embedding table to fit."""
        tok = self.tokenizer
        wanted = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "bos_token": DEC_TOKEN}
        missing = {k: v for k, v in wanted.items() if getattr(tok, k) is None}
        if missing:
            tok.add_special_tokens(missing)
        self.dec_token_id = int(tok.bos_token_id)
        emb = self.vpg.text_embeddings.word_embeddings
        if len(tok) > emb.num_embeddings:
            grown = nn.Embedding(len(tok), emb.embedding_dim, padding_idx=emb.padding_idx)
            nn.init.normal_(grown.weight, std=self.vpg.qformer_config.initializer_range)
            with torch.no_grad():
                grown.weight[: emb.num_embeddings] = emb.weight
            self.vpg.text_embeddings.word_embeddings = grown

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """[CLS] caption [SEP] ids (right-padded) and their mask, at most max_text_len tokens."""
        tok = self.tokenizer
        rows = tok(list(captions), add_special_tokens=False, truncation=True,
                   max_length=max(1, self.max_text_len - 2))["input_ids"]
        rows = [[tok.cls_token_id, *r, tok.sep_token_id] for r in rows]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows], device=self.temp.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.temp.device)
        return ids, mask

    @property
    def num_query_tokens(self) -> int:
        """Queries in front of the text."""
        return self.vpg.query_tokens.shape[1]

    def hidden_states(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
        q = self.num_query_tokens
        attn = attention_mask_4d(kind, q, mask, self.vpg.query_tokens.dtype)
        return self.vpg.encode(features, text_ids=ids, attention_mask=attn)

    def lm_logits(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits from text hidden states (output weights tied to the word embeddings)."""
        weight = self.vpg.text_embeddings.word_embeddings.weight
        return F.linear(self.lm_transform(text_hidden), weight, self.lm_bias)

    # --- losses ---------------------------------------------------------------------------------
    def embeddings(self, features: torch.Tensor, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Uni-modal pass: normalised query embeddings [B,Q,E], text [CLS] embeddings [B,E] and token ids."""
        ids, mask = self.tokenize(captions)
        features = features.to(self.temp.device)
        hidden = self.hidden_states(features, ids, mask, "unimodal")
        q = self.num_query_tokens
        return {"image": F.normalize(self.vision_proj(hidden[:, :q]), dim=-1),
                "text": F.normalize(self.text_proj(hidden[:, q]), dim=-1), "ids": ids, "mask": mask}

    @staticmethod
    def similarity(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """sim[i, j] = max over queries of image_i's query embeddings · text_j (BLIP-2's ITC score)."""
        return torch.einsum("bqe,te->btq", image, text).amax(dim=-1)

    def losses(self, features: torch.Tensor, captions: Sequence[str],
               image_ids: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
        """ITC + ITM + ITG for frozen image features [B,T,D] and their captions; returns loss and each part.

        Pairs with the same caption (or the same ``image_ids`` entry) count as positives for ITC and
        are never drawn as ITM hard negatives: synthetic and COCO-style data repeat captions.
        """
        if features.shape[0] != len(captions):
            raise ConfigError(f"stage 1: {features.shape[0]} images but {len(captions)} captions",
                              "pass one caption per image")
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        emb = self.embeddings(features, captions)
        features = features.to(self.temp.device)
        ids, mask, b = emb["ids"], emb["mask"], features.shape[0]
        positive = self._positive_pairs(captions, image_ids).to(features.device)  # built on the CPU

        sim_i2t = self.similarity(emb["image"], emb["text"])
        targets = _smoothed_targets(positive, self.label_smoothing)
        itc = (F.cross_entropy(sim_i2t / self.temp, targets) + F.cross_entropy(sim_i2t.t() / self.temp, targets.t())) / 2

        # ITM is over half the step's compute (three sequences per pair); a share of the batch (its first rows:
        # batches come shuffled) keeps the objective at a fraction of the cost.
        k = b if self.itm_share >= 1 else min(b, max(2, round(b * self.itm_share)))
        itm = self._itm_loss(features[:k], ids[:k], mask[:k], sim_i2t[:k, :k].detach() / self.temp.detach(),
                             positive[:k, :k])

        dec_ids = ids.clone()
        dec_ids[:, 0] = self.dec_token_id
        hidden = self.hidden_states(features, dec_ids, mask, "causal")[:, self.num_query_tokens:]
        labels = dec_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        logits = self.lm_logits(hidden[:, :-1])
        itg = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                              ignore_index=-100, label_smoothing=self.label_smoothing)
        return {"loss": itc + itm + itg, "itc": itc, "itm": itm, "itg": itg}

    def forward(self, features: torch.Tensor, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Same as `losses` (calling the module keeps DDP's gradient hooks in the loop)."""
        return self.losses(features, captions)

    @staticmethod
    def _positive_pairs(captions: Sequence[str], image_ids: Sequence[Any] | None) -> torch.Tensor:
        keys = [" ".join(c.lower().split()) for c in captions]
        pos = torch.tensor([[a == b for b in keys] for a in keys])
        if image_ids is not None:
            pos |= torch.tensor([[a == b for b in image_ids] for a in image_ids])
        return pos | torch.eye(len(keys), dtype=torch.bool)

    def _itm_loss(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, logits_i2t: torch.Tensor,
                  positive: torch.Tensor) -> torch.Tensor:
        """Image-text matching on positives plus one hard negative per side, drawn ∝ softmax(similarity)."""
        positive = positive.to(logits_i2t.device)
        has_neg = (~positive).any(dim=1)
        rows = has_neg.nonzero().squeeze(1)
        blocked = logits_i2t.masked_fill(positive, float("-inf"))
        feats, text_ids, text_mask = [features], [ids], [mask]
        if rows.numel():
            # For text j: a negative image; for image i: a negative text (LAVIS samples both).
            neg_img = torch.multinomial(F.softmax(blocked.t()[rows], dim=1), 1).squeeze(1)
            neg_txt = torch.multinomial(F.softmax(blocked[rows], dim=1), 1).squeeze(1)
            feats += [features[neg_img], features[rows]]
            text_ids += [ids[rows], ids[neg_txt]]
            text_mask += [mask[rows], mask[neg_txt]]
        hidden = self.hidden_states(torch.cat(feats), torch.cat(text_ids), torch.cat(text_mask), "bidirectional")
        logits = self.itm_head(hidden[:, : self.num_query_tokens]).mean(dim=1)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        labels[: features.shape[0]] = 1
        return F.cross_entropy(logits, labels)

    @torch.no_grad()
    def retrieval_recall(self, features: torch.Tensor, captions: Sequence[str], batch_size: int = 64) -> dict[str, float]:
        """Recall@1 of image→text and text→image by ITC similarity (a duplicate caption counts as a hit)."""
        parts = [self.embeddings(features[i:i + batch_size], captions[i:i + batch_size])
                 for i in range(0, len(captions), batch_size)]
        sim = self.similarity(torch.cat([p["image"] for p in parts]), torch.cat([p["text"] for p in parts]))
        positive = self._positive_pairs(captions, None).to(sim.device)
        rng = torch.arange(sim.shape[0], device=sim.device)
        i2t = positive[rng, sim.argmax(1)].float().mean().item()
        t2i = positive[sim.argmax(0), rng].float().mean().item()
        return {"i2t_r1": i2t, "t2i_r1": t2i}

    # --- handing the Q-Former to stage 2 --------------------------------------------------------
    def vpg_state(self, include_text: bool = False) -> dict[str, torch.Tensor]:
        """The Q-Former's weights under QFormerVPG names; text-only parts dropped unless include_text."""
        return {k: v.detach().clone() for k, v in self.vpg.state_dict().items()
                if include_text or not _is_text_only(k)}

    def manifest(self) -> dict[str, Any]:
        """What is needed to rebuild this model: VPG config and head sizes."""
        return {"format": "vpgtrans-stage1", "vpg": {"name": self.vpg_name, **to_dict(self.vpg.config)},
                "embed_dim": self.embed_dim, "max_text_len": self.max_text_len,
                "label_smoothing": self.label_smoothing}


def _is_text_only(key: str) -> bool:
    """Text embeddings and the text branch's feed-forward (stage 2 without text input has neither)."""
    if key.startswith(_TEXT_ONLY_PREFIXES):
        return True
    parts = key.split(".")
    return len(parts) > 4 and parts[:3] == ["qformer", "encoder", "layer"] and parts[4] in ("intermediate", "output")


def save_stage1(model: Stage1Model, out_dir: str | Path) -> Path:
    """Write stage1.safetensors (whole stage-1 model), its tokenizer and stage1.json atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = model.manifest()
    # The tokenizer (with the specials stage 1 added) travels inside the dir, named relative to it: a stage-1
    # dir stays loadable wherever it is moved (the world build trains it in a temporary dir).
    meta["vpg"]["tokenizer"] = STAGE1_TOKENIZER
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / STAGE1_WEIGHTS), metadata={"format": "pt"})
        model.tokenizer.save_pretrained(str(tmp / STAGE1_TOKENIZER))
        (tmp / STAGE1_MANIFEST).write_text(json.dumps(meta, indent=2, default=str))
    return Path(out_dir)


def load_stage1(model_dir: str | Path) -> Stage1Model:
    """Rebuild a Stage1Model from a directory written by save_stage1."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    meta_path = model_dir / STAGE1_MANIFEST
    if not meta_path.exists():
        raise CheckpointError(f"{model_dir} is not a stage-1 checkpoint (no {STAGE1_MANIFEST})",
                              "pass a directory written by BLIP-2 stage-1 training")
    meta = json.loads(meta_path.read_text())
    vpg = dict(meta["vpg"])
    # Weights come from the file; don't re-read the BERT checkpoint (its tokenizer is still needed).
    vpg["tokenizer"] = vpg.get("tokenizer") or vpg.get("init_from")
    if vpg["tokenizer"] and (model_dir / vpg["tokenizer"]).is_dir():  # saved inside the dir (relative name)
        vpg["tokenizer"] = str(model_dir / vpg["tokenizer"])
    vpg["init_from"] = None
    model = Stage1Model(vpg, embed_dim=meta["embed_dim"], max_text_len=meta["max_text_len"],
                        label_smoothing=meta["label_smoothing"])
    model.load_state_dict(load_file(str(model_dir / STAGE1_WEIGHTS)))
    return model


def _stage1_vpg_weights(source: Stage1Model | Mapping[str, torch.Tensor] | str | Path) -> dict[str, torch.Tensor]:
    if isinstance(source, Stage1Model):
        return source.vpg_state(include_text=True)
    if isinstance(source, (str, Path)):
        from safetensors.torch import load_file

        path = Path(source)
        if path.is_dir():
            path = path / STAGE1_WEIGHTS
        if not path.exists():
            raise CheckpointError(f"stage-1 weights not found: {path}",
                                  "pass the directory written by stage-1 training (it holds stage1.safetensors)")
        source = load_file(str(path))
    state = dict(source)
    if any(k.startswith("vpg.") for k in state):
        state = {k[len("vpg."):]: v for k, v in state.items() if k.startswith("vpg.")}
    return state


def init_vpg_from_stage1(vpg: nn.Module, source: Stage1Model | Mapping[str, torch.Tensor] | str | Path) -> list[str]:
    """Copy stage-1 Q-Former weights into a stage-2 VPG (same module names); returns the keys loaded.

    Text-only parts are skipped when the target has no text input. If the target reads text, the
    stage-1 word-embedding rows it has room for are copied (stage 1 may have added ``[DEC]``).
    """
    state = _stage1_vpg_weights(source)
    target = vpg.state_dict()
    missing = sorted(k for k in target if k not in state)
    if missing:
        raise CheckpointError(f"stage-1 checkpoint lacks {len(missing)} VPG weights (e.g. {missing[:2]})",
                              "initialise from a stage-1 Q-Former of the same config")
    loaded, wrong = {}, []
    for key, value in target.items():
        src = state[key]
        if src.shape == value.shape:
            loaded[key] = src
        elif key.endswith("word_embeddings.weight") and src.shape[1:] == value.shape[1:]:
            rows = min(src.shape[0], value.shape[0])
            loaded[key] = torch.cat([src[:rows], value[rows:].detach().cpu().to(src.dtype)])
        else:
            wrong.append(f"{key} {tuple(src.shape)} vs {tuple(value.shape)}")
    if wrong:
        raise CheckpointError(f"stage-1 Q-Former has other shapes than the stage-2 VPG: {wrong[:2]}",
                              "use the same Q-Former size (queries, hidden size, layers) in both stages")
    vpg.load_state_dict(loaded, strict=True)
    return sorted(loaded)


@torch.no_grad()
def stage1_metrics(model: Stage1Model, dataset: Any, max_samples: int = 256, batch_size: int = 64,
                   encode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Validation ITC/ITM/ITG losses and image↔text recall@1 over the first max_samples examples.

    `encode` turns pixel batches into features when the dataset has no feature cache.
    """
    n = min(len(dataset), max_samples)
    device = model.temp.device
    sums: dict[str, float] = {}
    feats, caps = [], []
    for start in range(0, n, batch_size):
        batch = dataset.collate([dataset[i] for i in range(start, min(n, start + batch_size))])
        features = batch["features"] if "features" in batch else encode(batch["pixels"].to(device))
        features = features.to(device)
        captions = [s.target for s in batch["samples"]]
        for key, value in model.losses(features, captions).items():
            sums[key] = sums.get(key, 0.0) + float(value) * len(captions)
        feats.append(features)
        caps += captions
    out = {f"val_{k}": v / max(n, 1) for k, v in sums.items()}
    if feats:
        out.update(model.retrieval_recall(torch.cat(feats), caps, batch_size=batch_size))
    return out
