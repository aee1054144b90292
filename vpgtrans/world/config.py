"""Knobs of the synthetic world: scene difficulty, data sizes and the pretraining budgets."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import help_field
from ..errors import ConfigError


@dataclass
class WorldConfig:
    """Everything that decides the content of a built world (the seed is passed separately)."""

    # Scene difficulty (issue 7: a VPG trained from scratch should need ~2,000 steps to plateau).
    min_objects: int = help_field(1, help="fewest objects in an image")
    max_objects: int = help_field(3, help="most objects in an image (1-3)")
    object_weights: list = help_field([0.25, 0.45, 0.30], help="probability of 1, 2, 3 objects (first max_objects used)")
    relation_share: float = help_field(0.7, help="share of multi-object captions that state a spatial relation")
    num_colors: int = help_field(8, help="how many colours are used (2-16; past 8 they come closer to each other)")
    num_shapes: int = help_field(8, help="how many shapes are used (2-16)")
    concept_tail: float = help_field(0.0, help="Zipf exponent of how often each colour and shape occurs (0 = "
                                               "uniform; 1 = the k-th is k times rarer than the first)")
    num_sizes: int = help_field(3, help="how many sizes are used (1-3)")
    image_size: int = help_field(48, help="rendered image side in pixels; a multiple of 6 * vit_patch puts every "
                                          "grid-cell centre on a patch corner (the ViT learns shapes far faster)")
    jitter: float = help_field(0.05, help="random shift of an object from its cell centre, as a fraction of a cell")
    captions_per_image: int = help_field(5, help="reference captions per image (different templates)")
    # Data sizes.
    n_train: int = help_field(6000, help="training images")
    n_val: int = help_field(500, help="validation images")
    n_test: int = help_field(500, help="test images")
    n_text_scenes: int = help_field(24000, help="text-only scenes for LM pretraining (no image rendered)")
    # Vision encoder (Blip2VisionModel) and its pretraining.
    vit_hidden: int = help_field(128, help="ViT hidden size")
    vit_layers: int = help_field(3, help="ViT layers")
    vit_patch: int = help_field(8, help="ViT patch size")
    vit_steps: int = help_field(800, help="ViT pretraining steps")
    vit_batch: int = help_field(48, help="ViT pretraining batch size")
    vit_lr: float = help_field(3e-3, help="peak AdamW learning rate for ViT pretraining")
    # Language models.
    lm_scale: str = help_field("full", help="'full' or 'tiny' model widths/depths")
    lm_steps: int = help_field(1200, help="pretraining steps per LM (scaled per model by its step_share)")
    lm_batch: int = help_field(32, help="LM pretraining batch size")
    lm_lr: float = help_field(3e-3, help="peak AdamW learning rate for LM pretraining")
    eval_samples: int = help_field(256, help="held-out samples for the context-vs-shuffled LM check")
    # The stage-1 Q-Former (recipes/blip2_stage1_world.yaml holds the rest of its recipe).
    stage1_steps: int = help_field(600, help="BLIP-2 stage-1 steps of the Q-Former every arm starts from")
    stage1_batch: int = help_field(64, help="stage-1 batch size (ITC's negatives are the batch's other images)")

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= 3:
            raise ConfigError(f"world: objects range {self.min_objects}..{self.max_objects} is invalid",
                              "use 1 <= min_objects <= max_objects <= 3")
        if len(self.object_weights) < self.max_objects:
            raise ConfigError("world: object_weights is shorter than max_objects",
                              "give one weight per object count 1..max_objects")
        for name, lo, hi in (("num_colors", 2, 16), ("num_shapes", 2, 16), ("num_sizes", 1, 3)):
            if not lo <= getattr(self, name) <= hi:
                raise ConfigError(f"world: {name}={getattr(self, name)} is out of range", f"use {lo}..{hi}")
        if not 0.0 <= self.concept_tail <= 4.0:
            raise ConfigError(f"world: concept_tail={self.concept_tail} is out of range", "use 0 (uniform) .. 4")
        if not 0.0 <= self.relation_share <= 1.0:
            raise ConfigError("world: relation_share must be within [0, 1]", "e.g. relation_share=0.7")
        if self.image_size % self.vit_patch:
            raise ConfigError("world: image_size must be a multiple of vit_patch", "e.g. 64 and 8")
        if self.lm_scale not in ("full", "tiny"):
            raise ConfigError(f"world: lm_scale '{self.lm_scale}' is unknown", "use 'full' or 'tiny'")
        if min(self.n_train, self.n_val, self.n_test) < 1:
            raise ConfigError("world: every split needs at least one image", "raise n_train/n_val/n_test")

    @classmethod
    def preset(cls, size: str) -> "WorldConfig":
        """'full' (the default world) or 'tiny' (seconds; for tests)."""
        if size == "full":
            return cls()
        if size == "tiny":
            return replace(cls(), n_train=48, n_val=12, n_test=12, n_text_scenes=400, vit_hidden=32, vit_layers=1,
                           vit_steps=4, vit_batch=16, lm_scale="tiny", lm_steps=8, lm_batch=16, eval_samples=16,
                           captions_per_image=2, stage1_steps=4, stage1_batch=16)
        raise ConfigError(f"world size '{size}' is unknown", "use 'full' or 'tiny'")
