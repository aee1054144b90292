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
from .errors import CheckpointError, as_os_errors

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
    with as_os_errors(), atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if getattr(model.spec, "lora", None):
            from .lora import LORA_DIR, save_adapter

            # Also in peft's own format, for use outside vpgtrans (load_model reads model.safetensors).
            save_adapter(model, tmp / LORA_DIR)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return Path(out_dir)


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """Read a model directory's manifest and check it against the schema (one line naming the bad field)."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{model_dir} is not a vpgtrans model directory (no {MANIFEST})",
                              "pass a directory written by `vpgtrans train`/`transfer`")
    damaged = "the directory is damaged; re-export the model"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}", damaged) from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text", damaged) from None
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deeply to be a manifest", damaged) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path} ({exc.strerror or exc})", "check the path and permissions") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "vpgtrans-model":
        raise CheckpointError(f"{path} is not a vpgtrans model manifest", "pass a vpgtrans model directory")
    validate_manifest(manifest, str(path))
    return manifest


# field → (allowed types, required); `spec.*` parts are checked separately.
_MANIFEST_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "format_version": ((int,), False), "spec": ((dict,), True), "projector": ((dict,), False),
    "weights": ((list,), False), "versions": ((dict,), False), "training": ((dict,), False),
}
_SPEC_PARTS = ("vision", "vpg", "llm", "template", "lora")


def _bad_field(where: str, field: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{where}: field '{field}' {problem}",
                           "the manifest is damaged or hand-edited; re-export the model or fix that field")


def validate_manifest(manifest: dict[str, Any], where: str = MANIFEST) -> None:
    """Check types and required fields of a parsed manifest; raise a CheckpointError naming the first bad one."""
    for name, (types, required) in _MANIFEST_FIELDS.items():
        value = manifest.get(name)
        if value is None:
            if required:
                raise _bad_field(where, name, "is missing")
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            raise _bad_field(where, name, f"should be {types[0].__name__}, got {type(value).__name__}")
    version = manifest.get("format_version")
    version = FORMAT_VERSION if version is None else version
    if version > FORMAT_VERSION or version < 1:
        raise CheckpointError(f"{where}: format_version {version} is not one this vpgtrans reads "
                              f"(1..{FORMAT_VERSION})", "upgrade vpgtrans (pip install -U vpgtrans)")
    spec = manifest["spec"]
    unknown = sorted(set(spec) - set(_SPEC_PARTS))
    if unknown:
        raise _bad_field(where, f"spec.{unknown[0]}", f"is unknown (expected {', '.join(_SPEC_PARTS)})")
    for part in ("vision", "vpg", "llm"):
        if part not in spec:  # a part left out takes ModelSpec's default (transfer sources carry no vision)
            continue
        entry = spec[part]
        if not isinstance(entry, dict):
            raise _bad_field(where, f"spec.{part}", f"should be an object, got {type(entry).__name__}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            if part != "llm" or not isinstance(entry.get("path"), str):
                raise _bad_field(where, f"spec.{part}.name", "is missing or not a string")
        if "path" in entry and not isinstance(entry["path"], (str, type(None))):
            raise _bad_field(where, f"spec.{part}.path", f"should be a string, got {type(entry['path']).__name__}")
    for part in ("template", "lora"):
        if spec.get(part) is not None and not isinstance(spec[part], dict):
            raise _bad_field(where, f"spec.{part}", f"should be an object, got {type(spec[part]).__name__}")
    for key in ("in_features", "out_features"):
        value = (manifest.get("projector") or {}).get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise _bad_field(where, f"projector.{key}", f"should be a positive integer, got {value!r}")
    if any(not isinstance(w, str) for w in manifest.get("weights") or []):
        raise _bad_field(where, "weights", "should list tensor names (strings)")


def load_weights(model: Any, model_dir: str | Path, *, strict: bool = True) -> None:
    """Load trainable weights from a model directory into an assembled model, checking they fit."""
    path = Path(model_dir) / WEIGHTS
    if not path.exists():
        raise CheckpointError(f"{path} is missing", "the model directory is incomplete; save it again")
    state = read_safetensors(path, "model weights")
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


def read_safetensors(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file; a truncated or damaged file is one CheckpointError line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{what} {path} are truncated or damaged ({_first_line(exc)})",
                              "re-create or re-download the file (a checkpoint: resume from an earlier one)") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def manifest_spec(manifest: dict[str, Any]) -> Any:
    """The ModelSpec of a validated manifest, each component's config checked (cheap: nothing is loaded)."""
    from .model import ModelSpec
    from .registry import check_components

    spec = ModelSpec(**manifest["spec"])
    check_components(spec)
    return spec


def load_model(model_dir: str | Path, *, device: str | torch.device | None = None,
               overrides: dict[str, dict[str, Any]] | None = None) -> Any:
    """Rebuild the components named in the manifest and load the trained weights (device "auto": CUDA if any)."""
    from .model import build_model

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    manifest = read_manifest(model_dir)
    spec_dict = manifest["spec"]
    for kind, values in (overrides or {}).items():
        spec_dict[kind] = {**spec_dict.get(kind, {}), **values}
    spec = manifest_spec({**manifest, "spec": spec_dict})
    # The VPG config in the manifest is fully resolved; don't re-read a BERT checkpoint for weights we overwrite.
    if spec.vpg.get("init_from"):
        spec.vpg = {**spec.vpg, "tokenizer": spec.vpg.get("tokenizer") or spec.vpg["init_from"], "init_from": None}
    model = build_model(spec)
    load_weights(model, model_dir)
    model.eval()  # a loaded model is for inference until a trainer says otherwise
    if device is not None:
        model.to(device)
    return model
