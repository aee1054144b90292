"""One multimodal model: image → vision encoder → VPG → projector → LLM → text."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .config import help_field, to_dict
from .errors import ConfigError
from .interfaces import VPG, GenerationConfig, LLMBackend, TextSample, VisionEncoder
from .lora import apply_lora
from .names import LLM_ALIASES, load_pretrained, resolve
from .registry import get as get_component

IMAGE_SLOT = "<ImageHere>"


@dataclass
class Template:
    """Where the soft prompts go in the text: `text` holds one `<ImageHere>` and may hold `{instruction}`.

    BLIP-2: ``"<ImageHere>{instruction}"`` (prompts first). MiniGPT-4:
    ``"###Human: <Img><ImageHere></Img> {instruction} ###Assistant: "`` with ``end="###"``.
    """

    text: str = help_field(IMAGE_SLOT + "{instruction}", help="the prompt: one <ImageHere> where the soft prompts go, "
                                                          "{instruction} where the instruction or question goes")
    end: str = help_field("", help="appended to every training target and cut from generated text (MiniGPT-4: ###)")

    def sample(self, instruction: str = "", target: str = "") -> TextSample:
        """Split the template around the image slot for one example."""
        if self.text.count(IMAGE_SLOT) != 1:
            raise ConfigError(f"template must contain {IMAGE_SLOT} exactly once: {self.text!r}",
                              f"put a single {IMAGE_SLOT} where the image goes")
        before, after = self.text.split(IMAGE_SLOT)
        fill = {"instruction": instruction}
        return TextSample(before=before.format(**fill), after=after.format(**fill),
                          target=(target + self.end) if target else "")


@dataclass
class ModelSpec:
    """Component names and configs: everything needed to rebuild a model (the manifest's core)."""

    vision: dict[str, Any] = field(default_factory=lambda: {"name": "blip2-vit", "path": "eva-vit-g"})
    vpg: dict[str, Any] = field(default_factory=lambda: {"name": "qformer"})
    llm: dict[str, Any] = field(default_factory=lambda: {"name": "opt", "path": "opt-2.7b"})
    template: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] | None = None

    def part(self, kind: str) -> tuple[str, dict[str, Any]]:
        """(component name, config without the name) for one of vision/vpg/llm."""
        entry = dict(getattr(self, kind))
        name = entry.pop("name", None)
        if not name:
            raise ConfigError(f"model spec: {kind} has no 'name'", f"set {kind}.name (see `vpgtrans components`)")
        return name, entry


class VisionLanguageModel(nn.Module):
    """The four parts in a row; only the VPG and projector train by default."""

    def __init__(self, vision: VisionEncoder, vpg: VPG, llm: LLMBackend, spec: ModelSpec,
                 projector: nn.Linear | None = None):
        super().__init__()
        self.vision = vision
        self.vpg = vpg
        self.projector = projector if projector is not None else nn.Linear(vpg.output_dim, llm.embed_dim)
        self.llm = llm
        self.spec = spec
        self.template = Template(**spec.template)
        self.vision.requires_grad_(False)
        self.llm.requires_grad_(False)
        self._check_widths()

    def _check_widths(self) -> None:
        if self.projector.in_features != self.vpg.output_dim:
            raise ConfigError(f"projector input width {self.projector.in_features} != VPG output width "
                              f"{self.vpg.output_dim}", "rebuild the projector for this VPG")
        if self.projector.out_features != self.llm.embed_dim:
            raise ConfigError(f"projector output width {self.projector.out_features} != LLM embedding width "
                              f"{self.llm.embed_dim}", "use `vpgtrans transfer` to move a VPG to another LLM")

    # --- the data path -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen vision features (cacheable: they never change during training)."""
        return self.vision(pixel_values)

    def prompts(self, features: torch.Tensor, instructions: Sequence[str] | None = None) -> torch.Tensor:
        """Soft prompts in the LLM's input-embedding space: projector(VPG(features))."""
        features = features.to(self.projector.weight.device)
        return self.projector(self.vpg(features, instructions))

    def forward(self, features: torch.Tensor, samples: Sequence[TextSample],
                instructions: Sequence[str] | None = None, max_text_len: int = 128) -> torch.Tensor:
        """Training forward: mean LM loss of the targets given image features."""
        return self.llm.loss(self.prompts(features, instructions), samples, max_text_len)

    def logits(self, features: torch.Tensor, samples: Sequence[TextSample],
               instructions: Sequence[str] | None = None, max_text_len: int = 128) -> torch.Tensor:
        """Teacher-forced logits of the same forward (for equivalence checks)."""
        return self.llm.logits(self.prompts(features, instructions), samples, max_text_len)

    @torch.no_grad()
    def generate(self, images: Sequence[Any] | None = None, prompt: str | Sequence[str] = "", *,
                 features: torch.Tensor | None = None, config: GenerationConfig | None = None) -> list[str]:
        """Text for each image (PIL images or precomputed features), with an optional instruction."""
        if features is None:
            if not images:
                raise ConfigError("generate needs images or features", "pass images=[PIL.Image, ...]")
            dev = self.projector.weight.device
            features = self.encode_images(self.vision.preprocess(images).to(dev))
        n = features.shape[0]
        prompts_text = [prompt] * n if isinstance(prompt, str) else list(prompt)
        samples = [self.template.sample(p) for p in prompts_text]
        instructions = prompts_text if self.vpg.uses_instruction else None
        config = config or GenerationConfig()
        was_training = self.training
        self.eval()  # decoding is deterministic: no dropout in the VPG, whatever mode training left us in
        try:
            texts = self.llm.generate(self.prompts(features, instructions), samples, config)
        finally:
            self.train(was_training)
        for stop in [s for s in (self.template.end, *config.stop) if s]:
            texts = [t.split(stop)[0].strip() for t in texts]
        return texts

    # --- what trains ---------------------------------------------------------------------------
    def set_trainable(self, vpg: bool = True, projector: bool = True) -> None:
        """Choose which of VPG / projector train; vision and LLM base weights stay frozen."""
        self.vpg.requires_grad_(vpg)
        self.projector.requires_grad_(projector)

    def set_gradient_checkpointing(self, on: bool) -> None:
        """Activation checkpointing through the frozen LLM (gradients still reach the soft prompts)."""
        switch = getattr(self.llm, "set_gradient_checkpointing", None)
        if switch is None:
            if on:
                raise ConfigError(f"LLM backend {self.spec.llm.get('name')} does not support gradient checkpointing",
                                  "set train.gradient_checkpointing=false")
            return
        switch(on)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights a checkpoint must hold: VPG, projector and any LoRA adapter (never frozen bases)."""
        state = {f"vpg.{k}": v for k, v in self.vpg.state_dict().items()}
        state.update({f"projector.{k}": v for k, v in self.projector.state_dict().items()})
        for name, param in self.llm.named_parameters():
            if "lora_" in name:
                state[f"llm.{name}"] = param.detach()
        return state

    def parameter_report(self) -> dict[str, dict[str, int]]:
        """Parameter counts per part, split into trainable and frozen."""
        report = {}
        for part in ("vision", "vpg", "projector", "llm"):
            params = list(getattr(self, part).parameters())
            report[part] = {"trainable": sum(p.numel() for p in params if p.requires_grad),
                            "frozen": sum(p.numel() for p in params if not p.requires_grad)}
        return report

    def describe_trainable(self) -> str:
        """Human-readable statement of what trains and what is frozen."""
        lines = [f"{'part':<10}{'component':<14}{'trainable':>14}{'frozen':>16}"]
        names = {"vision": self.spec.vision.get("name"), "vpg": self.spec.vpg.get("name"),
                 "projector": "linear", "llm": self.spec.llm.get("name")}
        total_t = total_f = 0
        for part, counts in self.parameter_report().items():
            total_t += counts["trainable"]
            total_f += counts["frozen"]
            lines.append(f"{part:<10}{str(names[part]):<14}{counts['trainable']:>14,}{counts['frozen']:>16,}")
        lines.append(f"{'total':<24}{total_t:>14,}{total_f:>16,}")
        return "\n".join(lines)


def checkpoint_layers(hf_model: nn.Module, on: bool) -> int:
    """Switch activation checkpointing of every transformers layer in `hf_model`; returns how many there are.

    transformers' own switch checkpoints only modules in training mode, and a frozen LLM stays in eval mode
    (no dropout). Non-reentrant checkpointing lets gradients reach the soft prompts although no LLM weight
    requires them, and replays dropout (LoRA) with the same RNG state. Only `forward` is wrapped, so module
    hooks (FSDP's) stay outside the recomputation.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in hf_model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.__dict__.pop("forward", None)
        if on:
            layer.forward = _checkpointed(layer.forward)
    return len(layers)


def _checkpointed(forward: Any) -> Any:
    import functools

    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def detect_llm_component(path: str) -> str:
    """Pick the built-in backend for a checkpoint from its config's model_type."""
    from transformers import AutoConfig

    target = resolve(path, LLM_ALIASES)
    if target.endswith(".gguf"):
        return "llama"
    cfg = load_pretrained(AutoConfig.from_pretrained, path, target, what="LLM config")
    if getattr(cfg, "is_encoder_decoder", False):
        return "flant5"
    return {"opt": "opt", "llama": "llama", "mistral": "llama"}.get(cfg.model_type, "causal-lm")


def build_model(spec: ModelSpec | dict[str, Any], *, device: str | torch.device | None = None) -> VisionLanguageModel:
    """Build every component named in `spec` and assemble them (projector freshly initialised)."""
    if isinstance(spec, dict):
        spec = ModelSpec(**spec)
    spec = copy.deepcopy(spec)
    if "name" not in spec.llm and "path" in spec.llm:
        spec.llm["name"] = detect_llm_component(spec.llm["path"])
    vname, vcfg = spec.part("vision")
    vision = get_component("vision", vname).component.build(vcfg)
    gname, gcfg = spec.part("vpg")
    if not gcfg.get("vision_width"):
        gcfg["vision_width"] = vision.hidden_size
    vpg_component = get_component("vpg", gname).component
    vpg_config = vpg_component.make_config(gcfg)
    vpg = vpg_component.build(vpg_config)
    # Record the resolved VPG config (e.g. widths read from a BERT checkpoint) so reloads rebuild it exactly.

    spec.vpg = {"name": gname, **(to_dict(vpg_config) if not isinstance(vpg_config, dict) else vpg_config)}
    lname, lcfg = spec.part("llm")
    llm = get_component("llm", lname).component.build(lcfg)
    model = VisionLanguageModel(vision, vpg, llm, spec)
    if spec.lora:
        apply_lora(model, spec.lora)
    if device is not None:
        model.to(device)
    return model
