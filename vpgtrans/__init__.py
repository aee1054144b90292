"""vpgtrans: multimodal LLMs built from frozen parts, and a trained VPG moved between LLMs (VPGTrans).

The public API, importable from here (each name is loaded on first use: `import vpgtrans` and `vpgtrans --help`
load no torch):

    Component, register, available            the component plugin API (vpgtrans.registry)
    VisionEncoder, VPG, LLMBackend, Converter what components implement (vpgtrans.interfaces)
    TextSample, GenerationConfig
    build_model, load_model, save_model       a model from parts; model directories
    transfer, TransferOptions, TransferResult VPGTrans: `vpgtrans.transfer(vpgtrans.TransferOptions(src=..., dst=...))`
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name → the module defining it.
_EXPORTS: dict[str, str] = {
    "Component": "vpgtrans.registry",
    "register": "vpgtrans.registry",
    "available": "vpgtrans.registry",
    "VisionEncoder": "vpgtrans.interfaces",
    "VPG": "vpgtrans.interfaces",
    "LLMBackend": "vpgtrans.interfaces",
    "Converter": "vpgtrans.interfaces",
    "TextSample": "vpgtrans.interfaces",
    "GenerationConfig": "vpgtrans.interfaces",
    "build_model": "vpgtrans.model",
    "load_model": "vpgtrans.checkpoint",
    "save_model": "vpgtrans.checkpoint",
    "TransferOptions": "vpgtrans.transfer.options",
    "TransferResult": "vpgtrans.transfer.race",
}

__all__ = sorted([*_EXPORTS, "transfer"])

if TYPE_CHECKING:
    from .checkpoint import load_model, save_model
    from .interfaces import VPG, Converter, GenerationConfig, LLMBackend, TextSample, VisionEncoder
    from .model import build_model
    from .registry import Component, available, register
    from .transfer.options import TransferOptions
    from .transfer.race import TransferResult, transfer


def __getattr__(name: str) -> Any:
    if name == "transfer":
        # The subpackage vpgtrans.transfer is itself callable (transfer/__init__.py): importing any of its modules
        # sets this attribute to the package, so the function and the package have to be one object.
        return importlib.import_module("vpgtrans.transfer")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vpgtrans' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
