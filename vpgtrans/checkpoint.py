"""Model directories: `manifest.json` + `model.safetensors` of the trainable parts, written atomically.

Frozen parts (vision encoder, LLM) are never copied: the manifest says where they come from.
Loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .paths import honour_umask
from .errors import CheckpointError

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produced a checkpoint."""
    import importlib.metadata as md

    out = {}
    for pkg in ("vpgtrans", "torch", "transformers", "peft", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final` in one rename, on error it vanishes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    honour_umask(tmp, directory=True)  # mkdtemp makes it 0700: teammates could not read the result
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                honour_umask(f)  # safetensors writes 0600 files
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file so that readers see either the old or the new content, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        honour_umask(tmp)  # mkstemp makes it 0600
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: Any, out_dir: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Write a model directory (trainable weights + manifest) atomically."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.trainable_state_dict().items()}
    manifest = {
        "format": "vpgtrans-model",
        "format_version": FORMAT_VERSION,
        "spec": asdict(model.spec),
        "projector": {"in_features": model.projector.in_features, "out_features": model.projector.out_features},
        "weights": sorted(state),
        "versions": library_versions(),
        **(extra or {}),
    }
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if getattr(model.spec, "lora", None):
            from .lora import LORA_DIR, save_adapter

            # Also in peft's own format, for use outside vpgtrans (load_model reads model.safetensors).
            save_adapter(model, tmp / LORA_DIR)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return Path(out_dir)


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """Read and check a model directory's manifest."""
    path = Path(model_dir) / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{model_dir} is not a vpgtrans model directory (no {MANIFEST})",
                              "pass a directory written by `vpgtrans train`/`transfer`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}",
                              "the directory is damaged; re-export the model") from None
    if manifest.get("format") != "vpgtrans-model":
        raise CheckpointError(f"{path} is not a vpgtrans model manifest", "pass a vpgtrans model directory")
    return manifest


def load_weights(model: Any, model_dir: str | Path, *, strict: bool = True) -> None:
    """Load trainable weights from a model directory into an assembled model, checking they fit."""
    from safetensors.torch import load_file

    path = Path(model_dir) / WEIGHTS
    if not path.exists():
        raise CheckpointError(f"{path} is missing", "the model directory is incomplete; save it again")
    state = load_file(str(path))
    expected = model.trainable_state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if strict and (missing or unexpected or wrong):
        detail = (f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                  f"(e.g. {unexpected[:2]}), {len(wrong)} of another shape (e.g. {wrong[:2]})")
        raise CheckpointError(f"checkpoint {model_dir} was made for another model: {detail}",
                              "load it with the components it was trained with (see its manifest.json)")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for key, value in state.items():
            if key in wrong:
                continue
            target = params.get(key, buffers.get(key))
            if target is None:  # e.g. a non-persistent alias; fall back to module state loading
                continue
            target.copy_(value.to(target.dtype))


def load_model(model_dir: str | Path, *, device: str | torch.device | None = None,
               overrides: dict[str, dict[str, Any]] | None = None) -> Any:
    """Rebuild the components named in the manifest and load the trained weights."""
    from .model import ModelSpec, build_model

    manifest = read_manifest(model_dir)
    spec_dict = manifest["spec"]
    for kind, values in (overrides or {}).items():
        spec_dict[kind] = {**spec_dict.get(kind, {}), **values}
    spec = ModelSpec(**spec_dict)
    # The VPG config in the manifest is fully resolved; don't re-read a BERT checkpoint for weights we overwrite.
    if spec.vpg.get("init_from"):
        spec.vpg = {**spec.vpg, "tokenizer": spec.vpg.get("tokenizer") or spec.vpg["init_from"], "init_from": None}
    model = build_model(spec)
    load_weights(model, model_dir)
    model.eval()  # a loaded model is for inference until a trainer says otherwise
    if device is not None:
        model.to(device)
    return model
