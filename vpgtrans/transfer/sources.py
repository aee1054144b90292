"""Read a trained VPG (+ projector) from any of three formats into one layout, without loading an LLM.

Our layout: ``vpg.query_tokens`` [1, N, H]; ``vpg.qformer.*`` (transformers' ``Blip2QFormerModel``
state-dict keys); ``vpg.ln_vision.{weight,bias}`` (LAVIS only); ``projector.{weight,bias}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from vpgtrans.checkpoint import WEIGHTS, read_manifest
from vpgtrans.errors import CheckpointError, WeightsNotFoundError
from vpgtrans.hf_dirs import qformer_fields, qformer_vpg_spec, read_blip2_vpg, read_safetensors
from vpgtrans.names import BLIP2_ALIASES, VISION_ALIASES, download_hint, resolve, suggest

FORMATS = ("a vpgtrans model directory (manifest.json + model.safetensors)",
           "a Hugging Face BLIP-2 directory (config.json + safetensors)",
           "a LAVIS / MiniGPT-4 / VPGTrans .pth checkpoint (with --trust-pickle)")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# LAVIS projector names → the LLM family they were trained with.
LAVIS_PROJECTORS = {"opt_proj": "opt", "llama_proj": "llama", "t5_proj": "t5", "llm_proj": "llm"}


@dataclass
class SourceVPG:
    """A source VPG and projector in our key layout, with what is needed to rebuild the VPG."""

    state: dict[str, torch.Tensor]
    qformer_config: dict[str, Any]
    num_query_tokens: int
    projector_in: int
    projector_out: int
    format: str
    source_llm: str | None = None
    path: str = ""
    vpg_spec: dict[str, Any] = field(default_factory=dict)
    # transformers' BLIP-2 keeps LAVIS's trained ln_vision as the ViT's post_layernorm: kept here so the
    # vision encoder can be given the source model's copy.
    vision_post_layernorm: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def vpg_state(self) -> dict[str, torch.Tensor]:
        """VPG weights without the ``vpg.`` prefix, ready for `vpg.load_state_dict`."""
        return {k[4:]: v for k, v in self.state.items() if k.startswith("vpg.")}

    def projector(self) -> nn.Linear:
        """The source projector as a float32 nn.Linear."""
        layer = nn.Linear(self.projector_in, self.projector_out, bias="projector.bias" in self.state)
        layer.load_state_dict({k[len("projector."):]: v.float() for k, v in self.state.items()
                               if k.startswith("projector.")})
        return layer

    def summary(self) -> str:
        """One line for logs and `--dry-run`."""
        n = sum(v.numel() for k, v in self.state.items() if k.startswith("vpg."))
        return (f"{self.format} source {self.path}: VPG {n:,} parameters, {self.num_query_tokens} queries, "
                f"projector {self.projector_in}→{self.projector_out}, "
                f"trained with {self.source_llm or 'unknown LLM'}")


# ---------------------------------------------------------------------------------------------- shared
def _expected_qformer(qcfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key → shape of every tensor a Blip2QFormerModel with this config holds (built on meta: no memory)."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel  # why: importing transformers costs seconds

    with torch.device("meta"):
        model = Blip2QFormerModel(Blip2QFormerConfig.from_dict(dict(qcfg)))
    return {f"vpg.qformer.{k}": tuple(v.shape) for k, v in model.state_dict().items()}


def _check_qformer(state: dict[str, torch.Tensor], qcfg: dict[str, Any], where: Path) -> list[str]:
    """Fail on missing or mis-shaped Q-Former tensors; drop (and name) the ones the VPG does not use."""
    expected = _expected_qformer(qcfg)
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != expected[k])
    if missing or wrong:
        raise CheckpointError(
            f"{where}: Q-Former weights do not fit its config: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(wrong)} of another shape (e.g. {wrong[:2]})",
            "the checkpoint is incomplete or not a BLIP-2 Q-Former")
    extra = sorted(k for k in state if k.startswith("vpg.qformer.") and k not in expected)
    for k in extra:
        del state[k]
    return [f"dropped {len(extra)} Q-Former tensors the VPG does not use (e.g. the text-only feed-forward "
            f"layers)"] if extra else []


def _finish(state: dict[str, torch.Tensor], qcfg: dict[str, Any], fmt: str, path: Path, source_llm: str | None,
            vision_layernorm: bool, notes: list[str], spec: dict[str, Any] | None = None, **extra: Any) -> SourceVPG:
    if "projector.weight" not in state:
        raise CheckpointError(f"{path} holds no projector to an LLM (opt_proj / llama_proj / t5_proj / "
                              "language_projection)", "pass a model trained with an LLM (BLIP-2 stage 2), not a "
                                                      "stage-1 or projector-less checkpoint")
    if "vpg.query_tokens" not in state:
        raise CheckpointError(f"{path} holds no Q-Former query tokens",
                              "pass a checkpoint with the Q-Former in it (MiniGPT-4's own .pth holds only llama_proj)")
    notes = notes + _check_qformer(state, qcfg, path)
    n_query = int(state["vpg.query_tokens"].shape[1])
    out_dim, in_dim = state["projector.weight"].shape
    return SourceVPG(state=state, qformer_config=qcfg, num_query_tokens=n_query, projector_in=int(in_dim),
                     projector_out=int(out_dim), format=fmt, source_llm=source_llm, path=str(path),
                     vpg_spec=spec or qformer_vpg_spec(qcfg, n_query, vision_layernorm), notes=notes, **extra)


# ---------------------------------------------------------------------------------------------- Hugging Face
def _load_hf(path: Path) -> SourceVPG:
    read = read_blip2_vpg(path)
    text = read.config.get("text_config") or {}
    llm = text.get("_name_or_path") or text.get("model_type")
    return _finish(read.state, read.qformer_config, "hf-blip2", path, llm, False, [],
                   vision_post_layernorm=read.vision_post_layernorm)


# ---------------------------------------------------------------------------------------------- LAVIS .pth
_LAYER = re.compile(r"Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)")


def _lavis_key(key: str) -> str | None:
    """LAVIS (BERT-named) key → our key; None for what a VPG does not hold (LLM, ViT, text heads)."""
    if key == "query_tokens":
        return "vpg.query_tokens"
    if key.startswith("ln_vision."):
        return "vpg." + key
    head, _, leaf = key.partition(".")
    if head in LAVIS_PROJECTORS and leaf in ("weight", "bias"):
        return "projector." + leaf
    if key.startswith("Qformer.bert.embeddings.LayerNorm."):
        return "vpg.qformer.layernorm." + key.rsplit(".", 1)[1]
    match = _LAYER.fullmatch(key)
    if match is None:
        return None
    rest = re.sub(r"^(attention|crossattention)\.self\.", r"\1.attention.", match.group(2))
    return f"vpg.qformer.encoder.layer.{match.group(1)}.{rest}"


def _infer_qformer(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, Any], list[str]]:
    """Blip2QFormerConfig fields from tensor shapes (the head count is not in them: BERT's 64-wide heads)."""
    p = "vpg.qformer.encoder.layer."
    layers = sorted({int(k[len(p):].split(".")[0]) for k in state if k.startswith(p)})
    if not layers or "vpg.query_tokens" not in state:
        raise CheckpointError(f"{path} holds no Q-Former (no Qformer.bert.* / query_tokens)",
                              "pass a BLIP-2-style checkpoint (MiniGPT-4's own .pth holds only llama_proj)")
    cross = sorted({int(k[len(p):].split(".")[0]) for k in state if k.startswith(p) and ".crossattention." in k})
    n_layers = layers[-1] + 1
    freq = cross[1] - cross[0] if len(cross) > 1 else n_layers
    if not cross or [i for i in range(n_layers) if i % freq == 0] != cross:
        raise CheckpointError(f"{path}: cross-attention in layers {cross} is not every N-th layer from 0",
                              "only BLIP-2-style Q-Formers can be imported")
    for key in (f"{p}0.intermediate_query.dense.weight", f"{p}{cross[0]}.crossattention.attention.key.weight"):
        if key not in state:
            raise CheckpointError(f"{path}: Q-Former tensor {key} is missing", "the checkpoint is incomplete")
    hidden = int(state["vpg.query_tokens"].shape[-1])
    heads = hidden // 64 if hidden % 64 == 0 else 1
    qcfg = {"hidden_size": hidden, "num_hidden_layers": n_layers, "num_attention_heads": heads,
            "intermediate_size": int(state[f"{p}0.intermediate_query.dense.weight"].shape[0]),
            "cross_attention_frequency": freq,
            "encoder_hidden_size": int(state[f"{p}{cross[0]}.crossattention.attention.key.weight"].shape[1])}
    note = f"attention heads not stored in the weights: assumed {heads} (head width {hidden // heads})"
    return qformer_fields(qcfg), [note]


def _load_lavis(path: Path, trust_pickle: bool) -> SourceVPG:
    if not trust_pickle:
        raise CheckpointError(f"{path} is a pickle file, and loading pickle can run arbitrary code",
                              "pass --trust-pickle only if the file comes from a trusted source")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} cannot be read as a weights-only checkpoint ({first[:200]})",
                              "re-save it as a plain dict of tensors (torch.save(model.state_dict(), ...))") from None
    raw = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a state dict", "pass a LAVIS checkpoint")
    state: dict[str, torch.Tensor] = {}
    family = vocab = None
    for key, value in raw.items():
        key = key.removeprefix("module.")  # saved from DistributedDataParallel
        ours = _lavis_key(key) if isinstance(value, torch.Tensor) else None
        if ours is not None:
            state[ours] = value
            family = LAVIS_PROJECTORS.get(key.split(".")[0], family)
        elif key == "Qformer.bert.embeddings.word_embeddings.weight":
            vocab = int(value.shape[0])  # unused by the VPG, but keeps the config what it was
    qcfg, notes = _infer_qformer(state, path)
    if vocab is not None:
        qcfg["vocab_size"] = vocab
    model_cfg = (ckpt.get("config") or {}).get("model") if isinstance(ckpt.get("config"), dict) else None
    llm = next((model_cfg[k] for k in ("opt_model", "llama_model", "t5_model", "llm_model")
                if isinstance(model_cfg, dict) and model_cfg.get(k)), family)
    return _finish(state, qcfg, "lavis-pth", path, llm, "vpg.ln_vision.weight" in state, notes)


# ---------------------------------------------------------------------------------------------- vpgtrans dir
def _load_vpgtrans(path: Path) -> SourceVPG:

    manifest = read_manifest(path)
    spec = manifest.get("spec") or {}
    vpg = dict(spec.get("vpg") or {})
    if vpg.get("init_from"):  # as checkpoint.load_model: the weights come from here, not from BERT
        vpg.update(tokenizer=vpg.get("tokenizer") or vpg["init_from"], init_from=None)
    weights = path / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{weights} is missing", "the model directory is incomplete; save it again")
    state = {k: v for k, v in load_file(str(weights)).items() if k.startswith(("vpg.", "projector."))}
    llm = (spec.get("llm") or {}).get("path")
    if "projector.weight" not in state:
        raise CheckpointError(f"{weights} holds no projector weights",
                              "the model directory is incomplete; save it again")
    if vpg.get("name") != "qformer":  # any other VPG: rebuilt from its own spec, no Q-Former bookkeeping
        out_dim, in_dim = state["projector.weight"].shape
        queries = state.get("vpg.query_tokens")
        return SourceVPG(state=state, qformer_config={}, num_query_tokens=int(queries.shape[1]) if queries is not None
                         else int(vpg.get("num_query_tokens", 0)), projector_in=int(in_dim),
                         projector_out=int(out_dim), format="vpgtrans", source_llm=llm, path=str(path), vpg_spec=vpg)
    qcfg, _ = _infer_qformer(state, path)
    qcfg = qformer_fields({**qcfg, **{k: vpg[k] for k in ("num_attention_heads", "vocab_size") if k in vpg},
                          "hidden_dropout_prob": vpg.get("dropout", qcfg["hidden_dropout_prob"]),
                          "attention_probs_dropout_prob": vpg.get("dropout", qcfg["attention_probs_dropout_prob"]),
                          "use_qformer_text_input": bool(vpg.get("text_input", False))})
    return _finish(state, qcfg, "vpgtrans", path, llm, bool(vpg.get("vision_layernorm")), [], spec=vpg)


# ---------------------------------------------------------------------------------------------- LAVIS ln_vision
def _tower_final_norm(vision: dict[str, Any]) -> tuple[dict[str, torch.Tensor], int] | None:
    """(the tower's post_layernorm weights, its layer count) when its output ends in that LayerNorm, else None."""
    if vision.get("name") != "blip2-vit" or int(vision.get("layer", -1)) != -1:
        return None
    target = Path(resolve(str(vision.get("path", "eva-vit-g")), VISION_ALIASES))
    if not target.is_dir():
        try:
            from huggingface_hub import snapshot_download  # why: only for hub ids, not local paths

            target = Path(snapshot_download(str(target), local_files_only=True))
        except Exception:  # not cached: the transfer itself will say where to get it
            return None
    if not (target / "config.json").exists():
        return None
    config = json.loads((target / "config.json").read_text())
    layers = int((config.get("vision_config") or config).get("num_hidden_layers", 0))
    names = [f"{p}post_layernorm.{leaf}" for p in ("", "vision_model.") for leaf in ("weight", "bias")]
    try:
        raw = read_safetensors(target, names)
    except CheckpointError:
        return None
    norm = {k.rsplit(".", 1)[1]: v for k, v in raw.items()}
    return (norm, layers) if len(norm) == 2 and layers else None


def reconcile_ln_vision(source: SourceVPG, vision: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Apply LAVIS's ln_vision once: (vision spec to use, a line for the transfer plan).

    LAVIS's EVA ViT has no final norm and the BLIP-2 model applies `ln_vision`; transformers' Blip2VisionModel
    ends with it (`post_layernorm`). A LAVIS source on such a tower would normalise twice. When the tower's
    norm is the source's own, the VPG drops its copy (the layout `hf-blip2` exports); otherwise the tower is
    read one step earlier (its last layer, before the norm) and the VPG keeps the source's ln_vision.
    """
    if not source.vpg_spec.get("vision_layernorm") or "vpg.ln_vision.weight" not in source.state:
        return vision, None
    found = _tower_final_norm(vision)
    if found is None:
        return vision, None
    norm, layers = found
    ours = {leaf: source.state[f"vpg.ln_vision.{leaf}"] for leaf in ("weight", "bias")}
    if all(norm[k].shape == v.shape and torch.allclose(norm[k].float(), v.float(), atol=1e-6) for k, v in ours.items()):
        for leaf in ours:
            del source.state[f"vpg.ln_vision.{leaf}"]
        source.vpg_spec = {**source.vpg_spec, "vision_layernorm": False}
        return vision, ("the vision tower already ends with the source's ln_vision (its post_layernorm): the VPG "
                        "does not apply it a second time")
    return {**vision, "layer": layers}, (f"the vision tower ends with another LayerNorm than the source's ln_vision: "
                                         f"features are read before it (layer {layers}) and the VPG applies the "
                                         "source's ln_vision, as LAVIS does (hf-blip2 cannot export this layout)")


# ---------------------------------------------------------------------------------------------- entry point
def _resolve(path_or_alias: str | Path) -> Path:
    """A local path, a published BLIP-2 alias (opt-2.7b …) or hub id found in the local HF cache."""
    path = Path(path_or_alias).expanduser()
    if path.exists():
        return path
    target = resolve(str(path_or_alias), BLIP2_ALIASES)
    if Path(target).exists():
        return Path(target)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", target):
        from huggingface_hub import snapshot_download  # why: only for hub ids, not local paths

        try:
            return Path(snapshot_download(target, local_files_only=True))
        except Exception:  # not cached: every hub error means the same thing here
            from huggingface_hub.constants import HF_HUB_CACHE  # why: only on this error path

            raise WeightsNotFoundError(
                f"source model '{path_or_alias}' ({target}) is not in the Hugging Face cache ({HF_HUB_CACHE})",
                download_hint([target])) from None

    raise CheckpointError(f"source '{path_or_alias}' is neither a file, a directory nor a known alias"
                          f"{suggest(str(path_or_alias), sorted(BLIP2_ALIASES))}",
                          f"pass {'; '.join(FORMATS)}; aliases: {', '.join(sorted(BLIP2_ALIASES))}")


def load_source(path_or_alias: str | Path, *, trust_pickle: bool = False) -> SourceVPG:
    """Load the VPG and projector of a trained model, whatever its format, into our key layout."""
    path = _resolve(path_or_alias)
    if path.is_dir() and (path / "manifest.json").exists():
        return _load_vpgtrans(path)
    if path.is_dir() and (path / "config.json").exists():
        return _load_hf(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        return _load_lavis(path, trust_pickle)
    raise CheckpointError(f"cannot tell what format '{path_or_alias}' is in", f"pass {'; '.join(FORMATS)}")
