"""Frozen vision encoders: BLIP-2's EVA ViT (`Blip2VisionModel`) and CLIP ViT (`CLIPVisionModel`)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from vpgtrans.config import help_field
from vpgtrans.images import to_rgb
from vpgtrans.interfaces import VisionEncoder
from vpgtrans.names import VISION_ALIASES, load_pretrained, resolve
from vpgtrans.registry import Component

# OpenAI CLIP statistics: also what BLIP-2's processor uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class HFVisionConfig:
    """Config of a transformers vision tower."""

    path: str = help_field("eva-vit-g", help="alias (eva-vit-g, clip-vit-l, world-vit), Hugging Face id or local dir")
    layer: int = help_field(-1, help="hidden layer to output: -1 = final output, -2 = penultimate (LLaVA), ...")
    drop_cls: bool = help_field(False, help="drop the CLS token from the output sequence")
    dtype: str = help_field("float32", help="float32, bfloat16 or float16")


def _read_preprocessor(target: str) -> dict[str, Any]:
    from transformers.utils import cached_file

    try:
        path = cached_file(target, "preprocessor_config.json", local_files_only=True,
                           _raise_exceptions_for_missing_entries=False)
    except OSError:
        path = None
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _load_tower(model_cls: Any, name: str, target: str, dtype: torch.dtype) -> Any:
    """Load a vision tower alone, or cut it out of a full BLIP-2 / InstructBLIP / LLaVA checkpoint.

    `Blip2VisionModel.from_pretrained(<full BLIP-2 dir>)` finds none of its weights (they sit under
    `vision_model.*`) and silently initialises at random; so read the tower's tensors ourselves.
    """
    from transformers import AutoConfig

    cfg = load_pretrained(AutoConfig.from_pretrained, name, target, what="vision encoder config")
    sub = getattr(cfg, "vision_config", None)
    if sub is None or model_cls.__name__.startswith("CLIP"):
        return load_pretrained(model_cls.from_pretrained, name, target, what="vision encoder", dtype=dtype)
    from pathlib import Path

    from huggingface_hub import snapshot_download

    from vpgtrans.hf_dirs import read_safetensors, safetensors_names

    directory = Path(target) if os.path.isdir(target) else Path(snapshot_download(target, local_files_only=True))
    prefixes = ("vision_model.", "vision_tower.", "model.vision_model.")
    keys = safetensors_names(directory)
    state = read_safetensors(directory, [k for k in keys if k.startswith(prefixes)])
    model = model_cls(sub)
    renamed = {}
    for k, v in state.items():
        for p in prefixes:
            if k.startswith(p):
                renamed[k[len(p):]] = v
                break
    result = model.load_state_dict(renamed, strict=False)
    if result.missing_keys:
        from vpgtrans.errors import WeightsNotFoundError

        raise WeightsNotFoundError(f"vision encoder '{name}': {len(result.missing_keys)} tower weights missing in "
                                   f"{directory} (e.g. {result.missing_keys[0]})",
                                   "pass a directory holding the vision tower's weights")
    return model.to(dtype)


def crop_settings(pre: dict[str, Any]) -> tuple[int, tuple[int, int]] | None:
    """(shortest edge, (crop height, width)) of a resize-short-side-then-centre-crop processor config, else None."""
    size, crop = pre.get("size"), pre.get("crop_size")
    if not (pre.get("do_center_crop") and isinstance(size, dict) and "shortest_edge" in size and crop):
        return None
    crop = crop if isinstance(crop, dict) else {"height": crop, "width": crop}
    return int(size["shortest_edge"]), (int(crop["height"]), int(crop["width"]))


class HFVisionEncoder(VisionEncoder):
    """A frozen transformers vision model; outputs patch (and CLS) features of one layer."""

    def __init__(self, model_cls: Any, config: HFVisionConfig):
        super().__init__()
        self.config = config
        target = resolve(config.path, VISION_ALIASES)
        dtype = getattr(torch, config.dtype)
        self.model = _load_tower(model_cls, config.path, target, dtype)
        self.model.requires_grad_(False).eval()
        self._target = target
        vc = self.model.config
        self.hidden_size = int(vc.hidden_size)
        self.image_size = int(vc.image_size)
        n_patches = (vc.image_size // vc.patch_size) ** 2
        self.num_tokens = n_patches + (0 if config.drop_cls else 1)
        pre = _read_preprocessor(target)
        self.mean = tuple(pre.get("image_mean", CLIP_MEAN))
        self.std = tuple(pre.get("image_std", CLIP_STD))
        size = pre.get("size", {})
        if isinstance(size, dict):
            self.input_hw = (int(size.get("height", size.get("shortest_edge", self.image_size))),
                             int(size.get("width", size.get("shortest_edge", self.image_size))))
        else:
            self.input_hw = (int(size), int(size))
        self.crop = crop_settings(pre)
        if self.crop is not None:
            self.input_hw = self.crop[1]

    def train(self, mode: bool = True) -> "HFVisionEncoder":
        # The encoder is frozen: keep it in eval mode whatever the parent module does.
        return super().train(False)

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """Resize (bicubic), rescale to [0, 1] and normalise with the encoder's own statistics."""
        from PIL import Image

        h, w = self.input_hw
        arrays = []
        for img in images:
            img = to_rgb(img)
            if self.crop is None:
                img = img.resize((w, h), Image.BICUBIC)
            else:  # CLIPImageProcessor: short side to `shortest_edge` (aspect kept), then the centre crop
                short, (ch, cw) = self.crop
                iw, ih = img.size
                nw, nh = (short, int(short * ih / iw)) if iw <= ih else (int(short * iw / ih), short)
                img = img.resize((nw, nh), Image.BICUBIC)
                top, left = (nh - ch) // 2, (nw - cw) // 2
                img = img.crop((left, top, left + cw, top + ch))
            arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.model.dtype)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[batch, 3, H, W] → [batch, tokens, hidden_size] features of the chosen layer."""
        want_hidden = self.config.layer != -1
        out = self.model(pixel_values=pixel_values.to(self.model.dtype), output_hidden_states=want_hidden)
        feats = out.hidden_states[self.config.layer] if want_hidden else out.last_hidden_state
        if self.config.drop_cls:
            feats = feats[:, 1:]
        return feats

    def cache_id(self) -> str:
        """Encoder class + weights identity + layer choice."""
        ident: list[str] = [type(self.model).__name__, self._target, str(self.config.layer),
                            str(self.config.drop_cls), self.config.dtype, repr(self.mean), repr(self.std),
                            repr(self.input_hw)] + ([repr(self.crop)] if self.crop else [])
        if os.path.isdir(self._target):
            for name in sorted(os.listdir(self._target)):
                if name.endswith((".safetensors", ".bin")):
                    st = os.stat(os.path.join(self._target, name))
                    ident.append(f"{name}:{st.st_size}:{int(st.st_mtime)}")
        return hashlib.sha256("|".join(ident).encode()).hexdigest()[:16]


def _blip2_vit(config: HFVisionConfig) -> HFVisionEncoder:
    from transformers import Blip2VisionModel

    return HFVisionEncoder(Blip2VisionModel, config)


def _clip_vit(config: HFVisionConfig) -> HFVisionEncoder:
    from transformers import CLIPVisionModel

    return HFVisionEncoder(CLIPVisionModel, config)


BLIP2_VIT = Component(kind="vision", name="blip2-vit", factory=_blip2_vit, config_class=HFVisionConfig,
                      description="BLIP-2 / EVA ViT image encoder (transformers Blip2VisionModel), frozen",
                      aliases=("eva-vit",))
CLIP_VIT = Component(kind="vision", name="clip-vit", factory=_clip_vit, config_class=HFVisionConfig,
                     description="CLIP ViT image encoder (transformers CLIPVisionModel), frozen")
