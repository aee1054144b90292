"""What one VPGTrans transfer is asked to do: written once, built by the CLI, the Python API and the benchmarks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import help_field


@dataclass(frozen=True)
class TransferOptions:
    """A transfer of the VPG of `src` to the LLM `dst` (VPGTrans), with its baseline race when asked."""

    src: str = help_field(help="source model: vpgtrans model dir, HF BLIP-2 dir, LAVIS .pth or alias")
    dst: str = help_field(help="destination LLM: alias, path or world name (world-llama, ...)")
    data: str | None = help_field(None, help="training annotations (sets data.train); real models need it "
                                              "unless the recipe's data exists")
    out: str = help_field("runs/transfer", help="output directory")
    recipe: str | None = help_field(None, help="recipe name or YAML path; default: chosen from the two models "
                                               "(the plan says which and why)")
    overrides: tuple[str, ...] = help_field((), help="recipe key=value overrides (e.g. train.max_steps=500)")
    data_fraction: float | None = help_field(None, help="train on this seeded random fraction of the training "
                                                        "set (data.fraction; the paper: 0.107)")
    converter: str = help_field("auto", help="embedding converter (a registered converter); auto: identity for "
                                             "identical vocabularies of equal width, else linear-cosine")
    converter_seed: int = help_field(0, help="seed of the converter's held-out split and fit")
    min_coverage: float = help_field(0.05, help="refuse token pairings covering less of the destination "
                                                "vocabulary")
    inherit_vpg: bool = help_field(True, help="start from the source's VPG (False: a fresh one, an ablation)")
    fit_converter: bool = help_field(True, help="merge the fitted converter into the source projector "
                                                "(False: a fresh projector, an ablation)")
    warmup: bool = help_field(True, help="run the projector warm-up before fine-tuning")
    warmup_lr_scale: float | None = help_field(None, help="warm-up LR = this x the recipe's LR; default the "
                                                          "recipe's transfer.warmup_lr_scale, else 5 (the paper's), "
                                                          "1 for a source trained on a surrogate of dst")
    warmup_batch_size: int | None = help_field(None, help="warm-up batch size; default the recipe's "
                                                          "transfer.warmup_batch_size, else its train.batch_size")
    warmup_epochs: float = help_field(1.0, help="length of the warm-up in epochs of the (fraction of the) data")
    warmup_steps: int | None = help_field(None, help="pin the warm-up to this many steps instead of warmup_epochs")
    budget_steps: int | None = help_field(None, help="cap on warm-up + fine-tuning steps together (fine-tuning "
                                                     "gets what the warm-up leaves, at least one step)")
    lora: bool = help_field(False, help="also train a LoRA adapter on the LLM during fine-tuning")
    until: str | None = help_field(None, help="METRIC>=VALUE: stop fine-tuning once a metric reaches a target")
    until_in_warmup: bool = help_field(False, help="the warm-up also stops at `until` (a row may match while "
                                                   "warming up)")
    compare_scratch: bool = help_field(False, help="also train from scratch on all the data first and report the "
                                                   "speed-up to its best")
    dry_run: bool = help_field(False, help="print the plan and exit without training")
    resume: bool = help_field(False, help="continue a transfer in `out` (finished stages are skipped)")
    force: bool = help_field(False, help="delete a previous run in `out` first")
    trust_pickle: bool = help_field(False, help="allow a .pth source (loaded with weights_only=True)")
    src_llm: str | None = help_field(None, help="LLM the source was trained with, when the source does not say")
    progress: bool = help_field(False, help="progress bars while training")

    def __post_init__(self) -> None:
        # Lists given by Python callers become tuples: the options stay hashable and cannot change later.
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "out", str(self.out))

    def recipe_overrides(self) -> tuple[str, ...]:
        """The recipe overrides with --data-fraction folded in (it is data.fraction)."""
        if self.data_fraction is None:
            return self.overrides
        return (*self.overrides, f"data.fraction={self.data_fraction}")

    def replace(self, **changes: Any) -> TransferOptions:
        """A copy with `changes` applied."""
        return dataclasses.replace(self, **changes)
