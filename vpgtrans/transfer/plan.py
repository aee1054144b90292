"""The plan of a transfer: everything decided from the options before any weight is touched, frozen.

The source and the two LLMs' specs, the recipe chosen for the models, the stages' recipes (stages.py), where each
stage writes, and what is missing (dry runs print the plan anyway). `plan_lines` is the `--dry-run` text.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..data import load_records
from ..errors import ConfigError, DataError, WeightsNotFoundError
from ..model import detect_llm_component
from ..names import missing_error, missing_weights
from ..recipes import Recipe, _read_yaml, build_recipe, find_recipe
from ..registry import get as get_component
from ..train.config import count_steps, parse_until
from . import stages as st
from .choose import Choice, choose_recipe, data_problem, guess_component, wanted_weights
from .converter import AUTO, IDENTITY, choose_converter
from .options import TransferOptions
from .pairing import TokenPairs
from .sources import SourceVPG, load_source, reconcile_ln_vision


@dataclass(frozen=True)
class TransferPlan:
    """Everything decided before any weight is touched: source, recipes of each stage, output folders."""

    options: TransferOptions
    source: SourceVPG | None  # None only in a dry run whose source weights are missing
    src_llm: dict[str, Any]  # component spec of the LLM the source VPG was trained with
    spec: dict[str, Any]  # model spec of the destination model
    warmup: Recipe | None  # None: no warm-up (an ablation row)
    finetune: Recipe | None  # None: the warm-up spends the whole step budget
    scratch: Recipe | None  # with compare_scratch
    out: Path
    folders: dict[str, str]  # stage → folder under `out` (stages.stage_folders)
    warmup_lr_scale: float
    warmup_steps: int | None  # known when the options pin or budget the steps
    choice: Choice
    notes: tuple[str, ...] = ()
    missing: tuple[tuple[str, str, str, str], ...] = ()  # (role, name, target, why) of absent weights (dry runs)
    data_problem: tuple[str, str] | None = None  # (what, fix) when real models have no data (dry runs only)

    def stage_dir(self, stage: str) -> Path:
        """Where `stage` (warmup, finetune, scratch) trains."""
        return self.out / self.folders[stage]

    def stage_recipe(self, stage: str) -> Recipe:
        """The recipe `stage` trains with."""
        recipe = {st.WARMUP: self.warmup, st.FINETUNE: self.finetune, st.SCRATCH: self.scratch}[stage]
        if recipe is None:
            raise ConfigError(f"this transfer has no {st.LABELS[stage]} stage", "enable it in the options")
        return recipe

    @property
    def base(self) -> Recipe:
        """The recipe whose data, eval and schedule every stage shares (the fine-tune's, else the warm-up's)."""
        recipe = self.finetune or self.warmup
        assert recipe is not None, "a plan has a warm-up or a fine-tune stage"
        return recipe

    def with_target(self, until: str) -> TransferPlan:
        """The plan whose warm-up and fine-tuning both stop at `until` (the scratch run's best)."""
        return dataclasses.replace(
            self, warmup=self.warmup and st.with_train(self.warmup, until=until),
            finetune=self.finetune and st.with_train(self.finetune, until=until))


def _source_parts(source: Any, base: Any, src_llm: str | None) -> tuple[dict, dict, dict]:
    """(vision spec, template, source LLM spec): from the source's manifest when it is a vpgtrans dir."""
    from ..checkpoint import read_manifest

    spec = read_manifest(source.path).get("spec", {}) if source.format == "vpgtrans" else {}
    vision = spec.get("vision") or dict(base.model.vision)
    template = spec.get("template") or dict(base.model.template)
    if src_llm:
        llm = {"name": detect_llm_component(src_llm), "path": src_llm}
    elif spec.get("llm"):
        llm = {k: v for k, v in spec["llm"].items() if k != "lora"}
    elif source.source_llm:
        llm = {"name": detect_llm_component(source.source_llm), "path": source.source_llm}
    else:
        raise ConfigError(f"cannot tell which LLM the source {source.path} was trained with",
                          "pass --src-llm NAME_OR_PATH")
    return vision, template, llm


def _check_options(o: TransferOptions) -> None:
    if o.warmup_lr_scale is not None and o.warmup_lr_scale <= 0:
        raise ConfigError(f"--warmup-lr-scale must be positive, got {o.warmup_lr_scale}", "e.g. --warmup-lr-scale 5")
    if o.warmup_batch_size is not None and o.warmup_batch_size < 1:
        raise ConfigError(f"--warmup-batch-size must be at least 1, got {o.warmup_batch_size}",
                          "e.g. --warmup-batch-size 8")
    if o.warmup_epochs <= 0:
        raise ConfigError(f"--warmup-epochs must be positive, got {o.warmup_epochs}", "e.g. --warmup-epochs 1")
    for name in ("warmup_steps", "budget_steps"):
        value = getattr(o, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}", f"e.g. {name}=20")
    if o.until:
        parse_until(o.until)
    if o.converter not in (AUTO, IDENTITY):  # resolved once both LLMs are loaded
        get_component("converter", o.converter)  # unknown names fail before anything is loaded


def plan_transfer(options: TransferOptions) -> TransferPlan:
    """Load the source and build the recipes of the stages (and of the scratch baseline).

    Missing data or weights raise one error naming all of them; in a dry run they are recorded in the plan
    instead, and the source's place is taken by the recipe's model section.
    """
    o = options
    _check_options(o)
    allow_missing = o.dry_run
    src, dst, data, src_llm = o.src, o.dst, o.data, o.src_llm
    choice = choose_recipe(src, dst, src_llm) if o.recipe is None else Choice(o.recipe, "given", "given by --recipe")
    path = find_recipe(choice.recipe)
    # --data replaces the recipe's dataset: its layout is detected and image paths are relative to it,
    # unless overrides say otherwise.
    given = ["data.format=auto", "data.image_root=null"] if data else []
    extra = given + list(o.recipe_overrides()) + ([f"data.train={data}"] if data else [])
    base = build_recipe(_read_yaml(path), extra, name=path.stem, source=str(path))
    no_data = data_problem(path.stem, base.data.train, base.data.val)
    wanted = wanted_weights(src, dst, src_llm, (base.model.vision or {}).get("path"))
    missing = missing_weights(wanted, dry_run=allow_missing)
    # Paths that do not exist and mistyped names are bad input (one line at once), not weights to download.
    typos = [m for m in missing if m[3].startswith(("no such file", "unknown model name"))]
    if any(m[0] == "source" for m in typos):
        load_source(src, trust_pickle=o.trust_pickle)  # its own one-line error (formats, aliases)
    if typos or (not allow_missing and (missing or no_data)):
        # One refusal names everything missing at once: the data and every weight (issue 32).
        parts = [no_data] if no_data and not typos else []
        if typos or missing:
            err = missing_error(typos or missing)
            parts.append((err.what, err.fix))
        raise (WeightsNotFoundError if typos or missing else DataError)("; ".join(w for w, _ in parts),
                                                                         "; ".join(f for _, f in parts if f))
    if any(role == "source" for role, *_ in missing):
        source = None
        guess = next((name for role, name, _ in wanted if role == "source LLM"), src_llm or "?")
        llm_src = {"name": guess_component(guess), "path": guess}
        vision, template = dict(base.model.vision), dict(base.model.template)
    else:
        source = load_source(src, trust_pickle=o.trust_pickle)
        vision, template, llm_src = _source_parts(source, base, src_llm)
    vision, ln_note = reconcile_ln_vision(source, vision) if source else (vision, None)
    dst_missing = any(role == "destination LLM" for role, *_ in missing)
    # The recipe's LLM settings other than which LLM (dtype: the paper's 7B LLMs run in float16) hold for both.
    llm_extra = {k: v for k, v in (base.model.llm or {}).items() if k not in ("name", "path", "lora")}
    llm_src = {**llm_extra, **llm_src}
    spec = {"vision": vision, "vpg": dict(source.vpg_spec if source else base.model.vpg or {"name": "qformer"}),
            "template": template,
            "llm": {**llm_extra, "name": guess_component(dst) if dst_missing else detect_llm_component(dst),
                    "path": dst}}
    if o.lora:
        spec["lora"] = dict(base.model.lora or {"r": 8})
    raw = copy.deepcopy(base.raw)
    raw["model"] = spec
    scale, scale_note = (o.warmup_lr_scale, None) if o.warmup_lr_scale is not None else \
        st.default_warmup_scale(llm_src, dst, base.transfer.warmup_lr_scale)
    out = Path(o.out).expanduser()
    folders = st.stage_folders(out)
    warmup_batch = o.warmup_batch_size or base.transfer.warmup_batch_size or base.train.batch_size
    warmup = st.warmup_recipe(raw, base, folders[st.WARMUP], lr_scale=scale, epochs=o.warmup_epochs,
                              batch_size=warmup_batch)
    finetune = st.finetune_recipe(raw, base, folders[st.FINETUNE], until=o.until)
    if o.until_in_warmup:
        warmup = st.with_train(warmup, until=finetune.train.until)
    n_train = None
    own_batch = warmup.train.batch_size != base.train.batch_size
    if o.compare_scratch or o.warmup_steps is not None or o.budget_steps is not None or own_batch:
        n_train = 0 if no_data else len(load_records(base.data, "train"))
    if own_batch and o.warmup_steps is None and n_train:
        # A warm-up epoch at its own batch sees the samples of a training epoch (floored to whole training batches),
        # so its evaluation lands where the next stage's epochs do: epoch 1 of the transfer, not 1.016.
        warmup = st.pin_warmup_steps(warmup, st.same_samples_steps(o.warmup_epochs, n_train, base, warmup), n_train)
    scratch = None
    if o.compare_scratch:
        # As many steps as warm-up and fine-tuning on VPGTrans's share of the data (scratch then sees all of it).
        total = st.in_batches(count_steps(warmup.train, n_train)[0], warmup, finetune) + \
            count_steps(finetune.train, n_train)[0]
        scratch = st.scratch_recipe(raw, base, total)
    warm_steps = None
    if o.warmup and n_train is not None and (o.warmup_steps is not None or o.budget_steps is not None):
        if o.warmup_steps is not None:
            warmup = st.pin_warmup_steps(warmup, o.warmup_steps, n_train)
            warm_steps = o.warmup_steps
        else:
            warm_steps = st.warmup_length(warmup, n_train)
    if o.budget_steps is not None:
        # The budget is in fine-tuning steps: a warm-up with another batch size spends its samples' worth of them.
        spent = st.in_batches(warm_steps, warmup, finetune) if o.warmup else 0
        # Fine-tuning has the recipe's schedule over what is left of the budget (at least one step).
        finetune = st.with_train(finetune, max_steps=max(1, o.budget_steps - (spent or 0)))
        if o.warmup and (spent or 0) >= o.budget_steps:
            finetune = None
    notes = (list(source.notes) if source else []) + [n for n in (ln_note, scale_note) if n]
    if source and source.vision_post_layernorm:
        notes.append("the source's vision post-layernorm is not carried over (the vision encoder is loaded as is)")
    return TransferPlan(options=o, source=source, src_llm=llm_src, spec=spec, warmup=warmup if o.warmup else None,
                        finetune=finetune, scratch=scratch, out=out, folders=folders, warmup_lr_scale=scale,
                        warmup_steps=warm_steps if o.warmup else 0,
                        choice=choice, notes=tuple(notes), missing=tuple(missing), data_problem=no_data)


def _params(model: Any, parts: Sequence[str]) -> int:
    return sum(p.numel() for part in parts for p in getattr(model, part).parameters())


def plan_lines(plan: TransferPlan, model: Any, pairs: TokenPairs | None, n_train: int | None) -> list[str]:
    """The --dry-run plan: recipe and why, stages, what trains, parameter counts, LRs, data size, pair coverage.

    `model`, `pairs` and `n_train` are None when weights or data are missing: those lines say so.
    """
    def params(parts: Sequence[str]) -> str:
        return f"{_params(model, parts):,}" if model is not None else "?"

    choice = plan.choice
    d = plan.base.data
    fraction = f" (data.fraction {d.fraction:g}, seed {d.fraction_seed})" if d.fraction < 1 else ""
    lines = [f"recipe  {choice.recipe}: {choice.reason}" + ("" if choice.kind == "given" else " (--recipe overrides)"),
             plan.source.summary() if plan.source else
             f"source  {next((n for r, n, *_ in plan.missing if r == 'source'), '?')}: MISSING",
             *[f"note: {n}" for n in plan.notes],
             f"source LLM {plan.src_llm.get('path')} ({plan.src_llm.get('name')}) → destination LLM "
             f"{plan.spec['llm']['path']} ({plan.spec['llm']['name']})",
             f"pairs   {pairs.summary()}" if pairs is not None else "pairs   ? (needs both LLMs' tokenizers)",
             f"data    {d.train}: " + (f"{n_train} examples{fraction}" if n_train is not None else "MISSING"),
             f"params  vpg {params(['vpg'])}, projector {params(['projector'])}, LLM {params(['llm'])} (frozen), "
             f"vision {params(['vision'])} (frozen)",
             f"stage 0 converter {_converter_named(plan, model, pairs)} on the token pairs, merged into the "
             "projector (W_c·W_src)"]
    for i, (name, r) in enumerate(((st.LABELS[st.WARMUP], plan.warmup), (st.LABELS[st.FINETUNE], plan.finetune)), 1):
        if r is None:
            lines.append(f"stage {i} ({name}): none")
            continue
        t = r.train
        steps = count_steps(t, n_train)[0] if n_train is not None else (t.max_steps or "?")
        lr = f"constant {t.lr:g}" if t.schedule == "constant" else f"cosine {t.lr:g} → {t.min_lr:g}"
        warm = f", warm-up {t.warmup_steps}" if t.warmup_steps else ", no LR warm-up"
        lines.append(f"stage {i} ({name}): train {' + '.join(t.trainable)} ({params(t.trainable)} params), "
                     f"{steps} steps, batch {t.batch_size} × {t.grad_accum}, {lr}{warm}"
                     + (f", until {t.until}" if t.until else ""))
    if plan.scratch is not None:
        lines.append(f"scratch fresh VPG + projector, {plan.scratch.train.max_steps} steps, same schedule as "
                     "the fine-tuning")
    if choice.followup:
        lines.append(f"then    {followup_command(plan)}")
    lines.append(f"out     {plan.out}")
    for role, name, target, why in plan.missing:
        lines.append(f"MISSING {role} {name}" + (f" ({target})" if target != name else "") + f": {why}")
    if plan.data_problem:
        lines.append(f"MISSING data: {plan.data_problem[0]}")
    return lines


def _converter_named(plan: TransferPlan, model: Any, pairs: TokenPairs | None) -> str:
    """The converter the run will fit: 'auto' resolved when the tokenizers and weights are there to decide it."""
    converter = plan.options.converter
    if converter != AUTO or model is None or pairs is None or plan.source is None:
        return converter
    # The source projector writes into the source LLM's embedding space: its output width is that LLM's.
    chosen = choose_converter(AUTO, pairs, plan.source.projector().out_features, model.llm.embed_dim)
    return f"{chosen} (auto: {'identical vocabularies and widths' if chosen == IDENTITY else 'different LLMs'})"


def followup_command(plan: TransferPlan) -> str:
    """The command that trains the recipe following this transfer (VL-Vicuna's MiniGPT-4-style stage)."""
    return (f"vpgtrans train --recipe {plan.choice.followup} train.init_from={plan.out / 'model'} "
            f"model.llm.path={plan.spec['llm']['path']} --out {plan.out / plan.choice.followup} "
            "[data.train=<cc_sbu_align dir>]")
