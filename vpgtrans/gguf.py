"""GGUF LLMs: dequantise once through transformers, then load a cached dense `save_pretrained` copy.

Dequantising SmolLM2-135M (Q4_1) and converting its GGUF tokenizer takes about 30 s on two CPU
cores; the dense copy under ``home()/models`` loads in seconds. The copy is written atomically and its
name carries the source file's identity (path, size, mtime), so a changed file gets a fresh copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from .checkpoint import atomic_dir
from .errors import CheckpointError, WeightsNotFoundError
from .names import load_pretrained
from .paths import home

SOURCE_FILE = "gguf_source.json"


def split_gguf(target: str, gguf_file: str | None) -> tuple[str, str]:
    """(directory or hub id, file name) for `path/to/x.gguf` or for a `path` + `gguf_file` pair."""
    if gguf_file:
        return target, gguf_file
    path = Path(target).expanduser()
    return str(path.parent), path.name


def _identity(where: str, file: str) -> dict[str, Any]:
    local = Path(where).expanduser() / file
    if local.is_file():
        st = local.stat()
        return {"file": str(local.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if os.path.isdir(os.path.expanduser(where)) or Path(file).suffix != ".gguf":
        raise WeightsNotFoundError(f"GGUF file not found: {local}", "check the path (it must end in .gguf)")
    return {"repo": where, "file": file}  # a hub repository: from_pretrained fetches or finds it in the cache


def cache_dir_for(where: str, file: str) -> Path:
    """Where the dense copy of one GGUF file lives (under `vpgtrans.paths.home()/models`)."""
    ident = _identity(where, file)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(file).stem).lower()
    return home() / "models" / f"{stem}-{digest}"


def check_gguf(path: Path) -> None:
    """Refuse, in one line naming the file, a .gguf that is not one or is cut short (before any work starts)."""
    import gguf

    size = path.stat().st_size
    try:
        # The reader maps the file and slices every tensor out of it: a file cut anywhere (header, metadata,
        # tensor data) fails here, with numpy/struct messages that name neither the file nor the cause.
        reader = gguf.GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # noqa: BLE001 - any failure to parse is a damaged file, reported as one line
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(f"GGUF file {path} is truncated or damaged: {size:,} bytes that do not parse as "
                              f"GGUF ({reason})", "re-download or re-save the .gguf file") from None
    if not reader.tensors or end > size:
        what = "holds no tensors" if not reader.tensors else f"is {size:,} bytes but its tensors end at byte {end:,}"
        raise CheckpointError(f"GGUF file {path} is truncated or damaged: it {what}",
                              "re-download or re-save the .gguf file")


def dense_checkpoint(name: str, target: str, gguf_file: str | None = None, model_cls: Any = None) -> Path:
    """A local dense checkpoint dir for a GGUF model, dequantising and caching it on first use."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, file = split_gguf(target, gguf_file)
    final = cache_dir_for(where, file)
    if (final / "config.json").is_file():
        return final
    if importlib.util.find_spec("gguf") is None:
        raise WeightsNotFoundError(f"reading {file} needs the gguf package, which is not installed",
                                   "run `pip install gguf` (or `pip install -e .[real]`)")
    local = Path(where).expanduser() / file
    if local.is_file():
        check_gguf(local)
    print(f"vpgtrans: dequantising {file} once (about 30 s on two CPU cores); cached at {final}",
          file=sys.stderr)
    model_cls = model_cls or AutoModelForCausalLM
    kwargs: dict[str, Any] = {"gguf_file": file}
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, name, where, what="GGUF tokenizer", **kwargs)
    try:
        from transformers import GgufConfig

        # Dense weights: frozen LLMs here must pass gradients to the soft prompts, packed GGUF layers do not.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantise
        pass
    model = load_pretrained(model_cls.from_pretrained, name, where, what="GGUF LLM", dtype=torch.float32, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # The weights are plain tensors now; dropping the GGUF marker lets save_pretrained write them.
        quantizer.remove_quantization_config(model)
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(_identity(where, file), indent=2) + "\n")
    return final
