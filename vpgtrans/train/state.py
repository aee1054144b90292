"""Training checkpoints: weights, optimizer, schedule, RNG and trainer state — safetensors + JSON, no pickle.

Layout of `<out>/checkpoints/step-000100/` (written through `atomic_dir`, so it exists only complete)::

    model.safetensors       trainable weights
    optimizer.safetensors   optimizer tensors (exp_avg, exp_avg_sq, step, ...) keyed "<param index>.<name>"
    optimizer.json          param groups and non-tensor state
    rng.safetensors         torch CPU (and CUDA) generator states, per process
    state.json              step, data position, samples, wall time, python/numpy RNG, schedule, scaler

`<out>/checkpoints/latest` names the last complete checkpoint and is replaced atomically after it.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import atomic_dir, atomic_write_text
from ..errors import CheckpointError, TrainingError, as_os_errors

LATEST = "latest"
STATE = "state.json"


def step_dir_name(step: int) -> str:
    """`step-000042`."""
    return f"step-{step:06d}"


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Weights a training checkpoint holds: `trainable_state_dict()` when the module has one, else trainable params."""
    if hasattr(module, "trainable_state_dict"):
        return dict(module.trainable_state_dict())
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy saved tensors into the module's parameters/buffers by name, refusing any mismatch."""
    expected = trainable_state(module)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise CheckpointError(f"checkpoint {where} was made for another model ({len(missing)} weights missing, "
                              f"e.g. {missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]})",
                              "resume with the recipe that produced it, or start a new --out")
    targets = dict(module.named_parameters())
    targets.update(dict(module.named_buffers()))
    with torch.no_grad():
        for name, value in state.items():
            target = targets.get(name, expected[name])
            if tuple(target.shape) != tuple(value.shape):
                raise CheckpointError(f"checkpoint {where}: '{name}' has shape {tuple(value.shape)}, the model "
                                      f"{tuple(target.shape)}", "resume with the recipe that produced it")
            target.copy_(value.to(target.dtype))


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().to("cpu").clone().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, entry in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch generator states."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out: dict[str, Any] = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, step: int, module: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], rng_states: list[dict[str, Any]], keep: int = 2) -> Path:
    """Write one complete checkpoint, then point `latest` at it, then prune old ones."""
    from safetensors.torch import save_file

    ckpt_root = out_dir / "checkpoints"
    final = ckpt_root / step_dir_name(step)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in trainable_state(module).items()}
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a poisoned checkpoint would be offered as "the last good one": never write it
        raise TrainingError(f"trainable weights are not finite after step {step} ({len(bad)} tensor(s), e.g. "
                            f"{bad[0]}); no checkpoint written",
                            "lower train.lr or set train.grad_clip; the last good checkpoint is kept "
                            "(--resume latest)")
    opt_tensors, opt_meta = _optimizer_to_files(optimizer)
    rng_tensors: dict[str, torch.Tensor] = {}
    rng_meta = []
    for rank, st in enumerate(rng_states):
        rng_tensors[f"{rank}.torch"] = st["torch"]
        for i, cuda_state in enumerate(st.get("cuda", [])):
            rng_tensors[f"{rank}.cuda{i}"] = cuda_state
        rng_meta.append({"python": st["python"], "numpy": st["numpy"], "cuda_devices": len(st.get("cuda", []))})
    with as_os_errors(), atomic_dir(final) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"), metadata={"format": "pt"})
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        (tmp / STATE).write_text(json.dumps({**trainer_state, "rng": rng_meta}, indent=1))
    with as_os_errors():
        atomic_write_text(ckpt_root / LATEST, final.name + "\n")
    _prune(ckpt_root, keep, final.name)
    return final


def _prune(ckpt_root: Path, keep: int, latest: str) -> None:
    steps = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else steps:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def clean_partial(out_dir: Path) -> None:
    """Remove temp files and dirs that a killed run left mid-write (never a complete checkpoint or model)."""
    patterns = [(out_dir / "checkpoints", ".step-*"), (out_dir / "checkpoints", f".{LATEST}.*"),
                (out_dir, ".model.tmp-*"), (out_dir, ".model.old-*"), (out_dir, ".stage1.tmp-*"),
                (out_dir, ".stage1.old-*"), (out_dir, ".run.json.*"),
                (out_dir, ".log.jsonl.*")]
    for folder, pattern in patterns:
        for tmp in folder.glob(pattern):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def find_checkpoint(out_dir: Path, resume: str) -> Path:
    """Resolve `--resume latest|PATH` to a complete checkpoint directory."""
    if resume != LATEST:
        path = Path(resume).expanduser()
        if (path / STATE).is_file():
            return path
        if (path / "checkpoints").is_dir():
            return find_checkpoint(path, LATEST)
        raise CheckpointError(f"{resume} is not a training checkpoint (no {STATE})",
                              "pass --resume latest or a <out>/checkpoints/step-NNNNNN directory")
    root = out_dir / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / STATE).is_file():
            return path
    # `latest` is written just after the directory: a kill in between leaves a complete but unnamed one.
    complete = sorted(p for p in root.glob("step-*") if (p / STATE).is_file())
    if not complete:
        raise CheckpointError(f"no checkpoint to resume in {root}", "start without --resume (or check --out)")
    return complete[-1]


def load_checkpoint(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load weights and optimizer in place; return the trainer state with per-process RNG states."""
    from safetensors.torch import load_file

    from safetensors import SafetensorError

    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        _check_state(state)
        load_trainable_state(module, load_file(str(path / "model.safetensors")), str(path))
        meta = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
        optimizer.load_state_dict(_optimizer_from_files(load_file(str(path / "optimizer.safetensors")), meta))
        rng_tensors = load_file(str(path / "rng.safetensors"))
        rngs = []
        for rank, meta_r in enumerate(state.pop("rng")):
            st = {"python": meta_r["python"], "numpy": meta_r["numpy"], "torch": rng_tensors[f"{rank}.torch"]}
            if meta_r.get("cuda_devices"):
                st["cuda"] = [rng_tensors[f"{rank}.cuda{i}"] for i in range(meta_r["cuda_devices"])]
            rngs.append(st)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError, RuntimeError,
            SafetensorError) as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {detail})",
                              "resume from an earlier checkpoint: --resume <out>/checkpoints/step-NNNNNN") from None
    state["rng"] = rngs
    return state


def _check_state(state: Any) -> None:
    """Types of the fields of state.json the trainer relies on (a hand-edited or damaged file fails here)."""
    if not isinstance(state, dict):
        raise ValueError(f"{STATE} is a {type(state).__name__}, not an object")
    for key, types in (("step", int), ("position", int), ("samples", int), ("wall_time", (int, float)),
                       ("rng", list)):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, types) or (key != "rng" and value < 0):
            raise ValueError(f"{STATE} field '{key}' is {value!r}")
