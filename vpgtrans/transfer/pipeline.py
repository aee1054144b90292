"""VPGTrans end to end: inherit the VPG, convert + merge the projector, 5x warm-up, fine-tune, compare to scratch.

Output directory: ``converter/`` (fitted converter), ``stage1/`` and ``stage2/`` (run dirs of
`vpgtrans train`'s runner), ``scratch/`` (with --compare-scratch), ``model/`` (the final model),
``report.json``. A stage whose ``model/`` exists is skipped on --resume; a stage with checkpoints resumes.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import atomic_dir, load_model, read_manifest, save_model
from ..data import load_records
from ..errors import ConfigError, DataError, WeightsNotFoundError
from ..memory import print_memory_plan
from ..model import build_model, detect_llm_component
from ..names import missing_error, missing_weights
from ..plot import plot_runs
from ..recipes import _read_yaml, build_recipe, find_recipe
from ..registry import get as get_component
from ..surrogate import read_surrogate, zero_shot_metrics
from ..train.config import count_steps, parse_until
from ..train.runner import run_recipe
from ..train.state import find_checkpoint
from . import report as rep
from .choose import Choice, choose_recipe, data_problem, guess_component, wanted_weights
from .merge import AUTO, IDENTITY, choose_converter, fit_converter, merge_projector
from .pairing import pair_tokens, restrict_to_texts
from .sources import load_source, reconcile_ln_vision

DEFAULT_RECIPE = None  # chosen from the two models: see choose.py
STAGES = ("stage1", "stage2")


@dataclass
class TransferPlan:
    """Everything decided before any weight is touched: source, recipes of each stage, output paths."""
    source: Any
    src_llm: dict[str, Any]
    spec: dict[str, Any]
    stage1: Any
    stage2: Any
    scratch: Any | None
    out: Path
    converter: str
    warmup_lr_scale: float
    notes: list[str] = field(default_factory=list)
    choice: Any = None  # choose.Choice: which recipe and why
    missing: list = field(default_factory=list)  # (role, name, target, why) of absent weights (dry runs only)
    data_problem: tuple[str, str] | None = None  # (what, fix) when real models have no data (dry runs only)


@dataclass
class Prepared:
    """The destination model with inherited VPG and merged projector, and how it got there."""
    model: Any
    pairs: Any
    fit: Any | None
    source_projector: nn.Linear


def _source_parts(source: Any, base: Any, src_llm: str | None) -> tuple[dict, dict, dict]:
    """(vision spec, template, source LLM spec): from the source's manifest when it is a vpgtrans dir."""
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


def default_warmup_scale(src_llm: dict[str, Any], dst: str) -> tuple[float, str | None]:
    """The warm-up LR multiplier when none is given: the paper's 5, or 1 (with the reason) for a surrogate of dst."""
    path = src_llm.get("path")
    origin = ((read_surrogate(path) if path else None) or {}).get("surrogate-of") or {}
    source = origin.get("source")
    if dst == origin.get("llm") or (source and Path(dst).expanduser().resolve() == Path(source).resolve()):
        # Measured (benchmarks/surrogate.py, K = 20, seed 0): 5x LR on the projector undid the graft (best val
        # 0.458, test 0.370 after 5 + 45 steps); 1x kept it (0.635, 0.565). With the identity converter the
        # projector already writes the destination's embedding space: there is nothing to re-align fast.
        return 1.0, "warm-up LR 1x the recipe's: the source LLM is a surrogate of the destination (same embeddings)"
    return 5.0, None


def _stage_raw(raw: dict[str, Any], name: str, **train: Any) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    out["name"] = f"{raw.get('name', 'transfer')}-{name}"
    out.setdefault("train", {}).update(train)
    return out


def plan_transfer(src: str, dst: str, *, data: str | None = None, out: str | Path = "runs/transfer",
                  recipe: str | None = DEFAULT_RECIPE, overrides: Sequence[str] = (), converter: str = "auto",
                  warmup_lr_scale: float | None = None, warmup_epochs: float = 1.0, lora: bool = False,
                  until: str | None = None, compare_scratch: bool = False, trust_pickle: bool = False,
                  src_llm: str | None = None, allow_missing: bool = False) -> TransferPlan:
    """Load the source and build the recipes of both stages (and of the scratch baseline).

    Missing data or weights raise one error naming all of them; with `allow_missing` (dry runs) they are
    recorded in the plan instead, and the source's place is taken by the recipe's model section.
    """
    if warmup_lr_scale is not None and warmup_lr_scale <= 0:
        raise ConfigError(f"--warmup-lr-scale must be positive, got {warmup_lr_scale}", "e.g. --warmup-lr-scale 5")
    if warmup_epochs <= 0:
        raise ConfigError(f"--warmup-epochs must be positive, got {warmup_epochs}", "e.g. --warmup-epochs 1")
    if until:
        parse_until(until)
    if converter not in ("auto", "identity"):  # not registry components: resolved in prepare()
        get_component("converter", converter)  # unknown names fail before anything is loaded
    choice = choose_recipe(src, dst, src_llm) if recipe is None else Choice(recipe, "given", "given by --recipe")
    path = find_recipe(choice.recipe)
    # --data replaces the recipe's dataset: its layout is detected and image paths are relative to it,
    # unless overrides say otherwise.
    given = ["data.format=auto", "data.image_root=null"] if data else []
    extra = given + list(overrides) + ([f"data.train={data}"] if data else [])
    base = build_recipe(_read_yaml(path), extra, name=path.stem, source=str(path))
    no_data = data_problem(path.stem, base.data.train, base.data.val)
    if no_data and not allow_missing:
        raise DataError(*no_data)
    wanted = wanted_weights(src, dst, src_llm, (base.model.vision or {}).get("path"))
    missing = missing_weights(wanted)
    # Paths that do not exist and mistyped names are bad input (one line at once), not weights to download.
    typos = [m for m in missing if m[3].startswith(("no such file", "unknown model name"))]
    if any(m[0] == "source" for m in typos):
        load_source(src, trust_pickle=trust_pickle)  # its own one-line error (formats, aliases)
    if typos or (missing and not allow_missing):
        raise missing_error(typos or missing)
    if any(role == "source" for role, *_ in missing):
        source = None
        guess = next((name for role, name, _ in wanted if role == "source LLM"), src_llm or "?")
        llm_src = {"name": guess_component(guess), "path": guess}
        vision, template = dict(base.model.vision), dict(base.model.template)
    else:
        source = load_source(src, trust_pickle=trust_pickle)
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
    if lora:
        spec["lora"] = dict(base.model.lora or {"r": 8})
    raw = copy.deepcopy(base.raw)
    raw["model"] = spec
    t = base.train
    scale_note = None
    if warmup_lr_scale is None:
        warmup_lr_scale, scale_note = default_warmup_scale(llm_src, dst)
    stage1 = build_recipe(_stage_raw(raw, "stage1", lr=t.lr * warmup_lr_scale, schedule="constant",
                                     warmup_steps=0, trainable=["projector"], epochs=warmup_epochs,
                                     max_steps=None, until=None), name="stage1", source=str(path))
    stage2 = build_recipe(_stage_raw(raw, "stage2", trainable=["vpg", "projector"], until=until),
                          name="stage2", source=str(path))
    scratch = None
    if compare_scratch:
        n = 0 if no_data else len(load_records(base.data, "train"))
        total = count_steps(stage1.train, n)[0] + count_steps(stage2.train, n)[0]
        scratch_raw = _stage_raw(raw, "scratch", trainable=["vpg", "projector"], max_steps=total, until=None)
        scratch_raw.setdefault("data", {})["fraction"] = 1.0  # the paper's baseline sees all the training data
        scratch = build_recipe(scratch_raw, name="scratch", source=str(path))
    notes = (list(source.notes) if source else []) + [n for n in (ln_note, scale_note) if n]
    if source and source.vision_post_layernorm:
        notes.append("the source's vision post-layernorm is not carried over (the vision encoder is loaded as is)")
    return TransferPlan(source=source, src_llm=llm_src, spec=spec, stage1=stage1, stage2=stage2, scratch=scratch,
                        out=Path(out).expanduser(), converter=converter, warmup_lr_scale=warmup_lr_scale, notes=notes,
                        choice=choice, missing=missing, data_problem=no_data)


def _build_llm(spec: dict[str, Any]) -> Any:
    cfg = dict(spec)
    return get_component("llm", cfg.pop("name")).component.build(cfg)


def _set_lora(model: Any, on: bool) -> None:
    for name, p in model.llm.named_parameters():
        if "lora_" in name:
            p.requires_grad_(on)


def pair_for(plan: TransferPlan, src_llm: Any, model: Any, min_coverage: float = 0.05) -> Any:
    """Token pairs between the two tokenizers, kept to those in the training text when they determine the fit."""
    pairs = pair_tokens(src_llm.tokenizer, model.llm.tokenizer, min_coverage=min_coverage)
    # The official code fits its converter on caption tokens; tokens that never occur in text keep an
    # untrained embedding, and on the world they pulled the fit off the caption tokens (DESIGN.md §7).
    # But a linear map has embed_dim + 1 unknowns per output: fewer text pairs than that (38 of a real
    # LLM pair's 46,017 on easy-vqa, against width 640) are fitted exactly and carry nothing. Then every
    # string pair is kept: in a real LLM every row is trained, so the reason to restrict is gone. The world
    # falls back too (49-58 caption pairs against OPT-s's 64), untrained rows included: OPT-m and FlanT5 fit
    # better for it, LLaMA worse (README, Transfer efficiency).
    records = load_records(plan.stage1.data, "train")[:20000]
    texts = [r[k] for r in records for k in ("caption", "question", "answer") if isinstance(r.get(k), str)]
    return restrict_to_texts(pairs, src_llm.tokenizer, model.llm.tokenizer, texts,
                             min_pairs=max(16, int(src_llm.embed_dim) + 2))


def prepare(plan: TransferPlan, *, fit: bool = True, seed: int = 0, min_coverage: float = 0.05,
            echo: Callable[[str], None] = print) -> Prepared:
    """Destination model with the inherited VPG; with `fit`, the converter fitted and merged into the projector."""
    from accelerate.utils import set_seed  # why: accelerate costs ~1 s to import; planning (--dry-run) never needs it

    set_seed(plan.stage1.train.seed)
    model = build_model(plan.spec)
    model.vpg.load_state_dict(plan.source.vpg_state())
    src_proj = plan.source.projector()
    src_llm = _build_llm(plan.src_llm)
    pairs = pair_for(plan, src_llm, model, min_coverage)
    echo(pairs.summary())
    result = None
    if fit:
        src_emb, dst_emb = src_llm.input_embedding_matrix(), model.llm.input_embedding_matrix()
        plan.converter = choose_converter(plan.converter, pairs, src_emb.shape[-1], dst_emb.shape[-1])
        result = fit_converter(plan.converter, src_emb, dst_emb, pairs, seed=seed)
        echo(result.summary())
        merged = merge_projector(src_proj, result.linear)
        model.projector = merged.to(model.projector.weight.dtype)
    del src_llm
    return Prepared(model=model, pairs=pairs, fit=result, source_projector=src_proj)


def save_converter(prepared: Prepared, plan: TransferPlan) -> Path:
    """out/converter/: converter.safetensors (weight, bias) + converter.json (name, pairs, cosines)."""
    lin = prepared.fit.linear
    info = {"converter": plan.converter, "in_features": lin.in_features, "out_features": lin.out_features,
            "pairs": prepared.pairs.summary(), "n_pairs": prepared.pairs.n_pairs,
            "src_coverage": prepared.pairs.src_coverage, "dst_coverage": prepared.pairs.dst_coverage,
            "train_cosine": prepared.fit.train_cosine, "heldout_cosine": prepared.fit.heldout_cosine,
            "seconds": round(prepared.fit.seconds, 3)}
    target = plan.out / "converter"
    with atomic_dir(target) as tmp:
        state = {"weight": lin.weight.detach().float().contiguous()}
        if lin.bias is not None:
            state["bias"] = lin.bias.detach().float().contiguous()
        save_file(state, str(tmp / "converter.safetensors"))
        (tmp / "converter.json").write_text(json.dumps(info, indent=2))
    return target


def run_stage(plan: TransferPlan, name: str, model: Any, *, progress: bool = False,
              echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train one stage (stage1 / stage2 / scratch) of `model` in place, resuming from its checkpoints."""
    recipe = {"stage1": plan.stage1, "stage2": plan.stage2, "scratch": plan.scratch}[name]
    out = plan.out / name
    resume = None
    if (out / "checkpoints").exists():
        try:
            find_checkpoint(out, "latest")
            resume = "latest"
        except Exception:  # no complete checkpoint: start the stage over
            resume = None
    if name == "stage1" or name == "stage2":
        _set_lora(model, name == "stage2")
    echo(f"== {name}: training {' + '.join(recipe.train.trainable)}"
         + (" + LoRA" if plan.spec.get("lora") and name != "stage1" else "") + (" (resuming)" if resume else ""))
    return run_recipe(recipe, out, resume=resume, force=resume is None, progress=progress, echo=echo, model=model)


def _params(model: Any, parts: Sequence[str]) -> int:
    return sum(p.numel() for part in parts for p in getattr(model, part).parameters())


def plan_lines(plan: TransferPlan, model: Any, pairs: Any, n_train: int | None) -> list[str]:
    """The --dry-run plan: recipe and why, stages, what trains, parameter counts, LRs, data size, pair coverage.

    `model`, `pairs` and `n_train` are None when weights or data are missing: those lines say so.
    """
    def params(parts: Sequence[str]) -> str:
        return f"{_params(model, parts):,}" if model is not None else "?"

    choice = plan.choice
    d = plan.stage1.data
    fraction = f" (data.fraction {d.fraction:g}, seed {d.fraction_seed})" if d.fraction < 1 else ""
    lines = [f"recipe  {choice.recipe}: {choice.reason}" + ("" if choice.kind == "given" else " (--recipe overrides)")
             if choice else f"recipe  {plan.stage2.name}",
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
    for i, (name, r) in enumerate((("warm-up", plan.stage1), ("fine-tune", plan.stage2)), 1):
        t = r.train
        steps = count_steps(t, n_train)[0] if n_train is not None else (t.max_steps or "?")
        lr = f"constant {t.lr:g}" if t.schedule == "constant" else f"cosine {t.lr:g} → {t.min_lr:g}"
        warm = f", warm-up {t.warmup_steps}" if t.warmup_steps else ", no LR warm-up"
        lines.append(f"stage {i} ({name}): train {' + '.join(t.trainable)} ({params(t.trainable)} params), "
                     f"{steps} steps, batch {t.batch_size} × {t.grad_accum}, {lr}{warm}"
                     + (f", until {t.until}" if t.until else ""))
    if plan.scratch is not None:
        lines.append(f"scratch fresh VPG + projector, {plan.scratch.train.max_steps} steps, same schedule as stage 2")
    if choice and choice.followup:
        lines.append(f"then    {followup_command(plan)}")
    lines.extend(_extra_plan_sections(plan, model))
    lines.append(f"out     {plan.out}")
    for role, name, target, why in plan.missing:
        lines.append(f"MISSING {role} {name}" + (f" ({target})" if target != name else "") + f": {why}")
    if plan.data_problem:
        lines.append(f"MISSING data: {plan.data_problem[0]}")
    return lines


def _converter_named(plan: TransferPlan, model: Any, pairs: Any) -> str:
    """The converter the run will fit: 'auto' resolved when the tokenizers and weights are there to decide it."""
    if plan.converter != AUTO or model is None or pairs is None or plan.source is None:
        return plan.converter
    # The source projector writes into the source LLM's embedding space: its output width is that LLM's.
    chosen = choose_converter(AUTO, pairs, plan.source.projector().out_features, model.llm.embed_dim)
    return f"{chosen} (auto: {'identical vocabularies and widths' if chosen == IDENTITY else 'different LLMs'})"


def _extra_plan_sections(plan: TransferPlan, model: Any) -> list[str]:
    """Hook for further plan sections (e.g. the memory plan of #17): lines printed before `out`."""
    return []


def followup_command(plan: TransferPlan) -> str:
    """The command that trains the recipe following this transfer (VL-Vicuna's MiniGPT-4-style stage)."""
    return (f"vpgtrans train --recipe {plan.choice.followup} train.init_from={plan.out / 'model'} "
            f"model.llm.path={plan.spec['llm']['path']} --out {plan.out / plan.choice.followup} "
            "[data.train=<cc_sbu_align dir>]")


def _check_out(out: Path, resume: bool, force: bool) -> Any:
    """Claim `out` and refuse what it holds (see _check_out_here); returns the claim, None on ranks but 0."""
    # Rank 0 alone refuses and cleans (as the train runner does), then every rank waits for its decision:
    # otherwise one rank finds what another has just written and refuses a run that is its own.
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        from accelerate import PartialState  # why: as in prepare(); only launched runs need it

        # cpu=True on a machine without CUDA, as make_accelerator does: only then does accelerate form the
        # gloo group; a plain PartialState() here would leave every process training on its own.
        state = PartialState(cpu=not torch.cuda.is_available())
        claim = _check_out_here(out, resume, force) if state.is_main_process else None
        state.wait_for_everyone()
        return claim
    return _check_out_here(out, resume, force)


# What a transfer run writes into --out (warmup/finetune: the stages' names to come, issue 31).
_TRANSFER_FILES = ("report.json", "converter", "stage1", "stage2", "warmup", "finetune", "scratch", "model",
                   "zero_shot.json", "curves")


def _check_out_here(out: Path, resume: bool, force: bool) -> Any:
    """Claim `out` before anything else; refuse a previous transfer (unless --resume/--force) and foreign files."""
    from ..claim import claim_dir

    # Held until the process ends (the kernel drops it if the process dies): a second transfer into `out`, however
    # close behind, is refused naming this one's pid.
    claim = claim_dir(out)
    try:
        if out.is_dir() and any(out.iterdir()):
            if not any((out / name).exists() for name in _TRANSFER_FILES) and not force:
                raise ConfigError(f"{out} is not empty and holds no transfer run",
                                  "choose another --out, or pass --force to delete its contents")
            if force:
                shutil.rmtree(out)
            elif not resume:
                raise ConfigError(f"{out} already holds a transfer run",
                                  "pass --resume to continue it, --force to start over, or choose another --out")
    except BaseException:
        claim.release()
        raise
    return claim


def transfer(src: str, dst: str, data: str | None = None, out: str | Path = "runs/transfer", *,
             converter: str = "auto", warmup_lr_scale: float | None = None, warmup_epochs: float = 1.0,
             lora: bool = False, until: str | None = None, compare_scratch: bool = False, dry_run: bool = False,
             resume: bool = False, force: bool = False, recipe: str | None = DEFAULT_RECIPE,
             overrides: Sequence[str] = (),
             trust_pickle: bool = False, src_llm: str | None = None, min_coverage: float = 0.05,
             progress: bool = False, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Move a trained VPG to another LLM (VPGTrans); returns the report (also `<out>/report.json`)."""
    plan = plan_transfer(src, dst, data=data, out=out, recipe=recipe, overrides=overrides, converter=converter,
                         warmup_lr_scale=warmup_lr_scale, warmup_epochs=warmup_epochs, lora=lora, until=until,
                         compare_scratch=compare_scratch, trust_pickle=trust_pickle, src_llm=src_llm,
                         allow_missing=dry_run)
    n_train = None if plan.data_problem else len(load_records(plan.stage1.data, "train"))
    if dry_run:
        return _dry_run(plan, n_train, min_coverage, echo)
    _check_out(plan.out, resume, force)
    plan.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    echo(f"recipe {plan.choice.recipe}: {plan.choice.reason}")
    echo(plan.source.summary())
    for note in plan.notes:
        echo(f"note: {note}")
    results: dict[str, Any] = {}
    # The paper's order: scratch first, to its plateau; VPGTrans then stops once it reaches scratch's best.
    scratch = _scratch_first(plan, until, progress, echo) if compare_scratch else None
    model = None
    if not (plan.out / "stage1" / "model").exists():
        prepared = prepare(plan, min_coverage=min_coverage, echo=echo)
        save_converter(prepared, plan)
        model = prepared.model
        if compare_scratch:  # the zero-shot graft: the destination model before any transfer training
            zero = zero_shot_metrics(plan.stage2, model)
            rep.write_json(plan.out / "zero_shot.json", zero)
            echo("zero-shot graft (before training): " + ", ".join(f"{k} {v:.4g}" for k, v in zero.items()))
        results["stage1"] = run_stage(plan, "stage1", model, progress=progress, echo=echo)
    else:
        echo("stage1: done earlier, skipped")
    if _reached(plan.out / "stage1"):
        echo("stage2: not needed, the warm-up already reached scratch's best")
    elif not (plan.out / "stage2" / "model").exists():
        if model is None:
            model = load_model(plan.out / "stage1" / "model")
        results["stage2"] = run_stage(plan, "stage2", model, progress=progress, echo=echo)
    else:
        echo("stage2: done earlier, skipped")
    if model is None:
        model = load_model(plan.out / ("stage2" if (plan.out / "stage2" / "model").exists() else "stage1") / "model")
    save_model(model, plan.out / "model", extra={"transfer": {"source": plan.source.path, "dst": dst,
                                                              "converter": plan.converter,
                                                              "warmup_lr_scale": plan.warmup_lr_scale}})
    vpgtrans_time = time.perf_counter() - started
    report: dict[str, Any] = {"format": "vpgtrans-transfer-report", "source": plan.source.path,
                              "source_llm": plan.src_llm, "destination_llm": plan.spec["llm"],
                              "converter": json.loads((plan.out / "converter" / "converter.json").read_text()),
                              "stages": {n: _stage_summary(plan.out / n) for n in STAGES},
                              "model_dir": str(plan.out / "model"), "seconds": round(vpgtrans_time, 1)}
    if (plan.out / "zero_shot.json").exists():
        report["zero_shot"] = json.loads((plan.out / "zero_shot.json").read_text())
    if scratch is not None:
        report["scratch"] = scratch["summary"]
        metric = scratch["metric"]
        stage_dirs = [plan.out / n for n in STAGES]
        curve_dir = plan.out / "curves" / "vpgtrans"
        curve_dir.mkdir(parents=True, exist_ok=True)
        (curve_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rep.joined_rows(stage_dirs)))
        # The converter's fitting time and the warm-up steps count against VPGTrans.
        ours = rep.transfer_curve(stage_dirs, metric, report["converter"].get("seconds", 0.0))
        report["speedup"] = rep.speedup(ours, scratch["curve"], metric)
        report["catch_up"] = rep.catch_up(ours, scratch["curve"], metric)
        report["plot"] = _plot(plan, echo, report["speedup"])
        if "error" not in report["speedup"]:
            for line in rep.table(report["speedup"]) + rep.catch_up_lines(report["catch_up"], metric):
                echo(line)
    rep.write_json(plan.out / "report.json", report)
    echo(f"transferred model saved to {plan.out / 'model'}; report {plan.out / 'report.json'}")
    if plan.choice.followup:
        echo(f"next ({plan.choice.kind}): {followup_command(plan)}")
    return report


def _dry_run(plan: TransferPlan, n_train: int | None, min_coverage: float,
             echo: Callable[[str], None]) -> dict[str, Any]:
    """Print the whole plan; when data or weights are missing, print it anyway and then fail naming all of them."""
    ready = not plan.missing
    prepared = prepare(plan, fit=False, min_coverage=min_coverage, echo=lambda _: None) if ready else None
    for line in plan_lines(plan, prepared and prepared.model, prepared and prepared.pairs, n_train):
        echo(line)

    print_memory_plan(plan.stage2, n_train or 0, echo)  # stage 2 trains the most: the run's peak
    if plan.missing or plan.data_problem:
        parts = [plan.data_problem] if plan.data_problem else []
        if plan.missing:
            err = missing_error(plan.missing)
            parts.append((err.what, err.fix))
        raise (WeightsNotFoundError if plan.missing else DataError)("; ".join(w for w, _ in parts),
                                                                    "; ".join(f for _, f in parts))
    return {"dry_run": True, "train_examples": n_train, "recipe": plan.choice.recipe}


def _stage_summary(run_dir: Path) -> dict[str, Any]:
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    res = run.get("results") or {}
    t = (run.get("recipe") or {}).get("train", {})
    return {"dir": str(run_dir), "steps": res.get("steps"), "samples": res.get("samples"),
            "wall_time": res.get("wall_time"), "metrics": res.get("metrics"), "lr": t.get("lr"),
            "schedule": t.get("schedule"), "trainable": t.get("trainable")}


def _reached(run_dir: Path) -> bool:
    """True when the stage's run stopped because it reached its `until` target."""
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    return bool(((run.get("results") or {}).get("until") or {}).get("reached"))


def _scratch_first(plan: TransferPlan, until: str | None, progress: bool,
                   echo: Callable[[str], None]) -> dict[str, Any]:
    """Train scratch (100% of the data) to its plateau; make its best the target both VPGTrans stages stop at."""
    from accelerate.utils import set_seed  # why: as in prepare()

    if not (plan.out / "scratch" / "model").exists():
        set_seed(plan.scratch.train.seed)
        model = build_model(plan.spec)
        _set_lora(model, True)
        run_stage(plan, "scratch", model, progress=progress, echo=echo)
        del model
    else:
        echo("scratch: done earlier, skipped")
    metric = plan.stage2.eval.metrics[0] if plan.stage2.eval.metrics else "val_loss"
    # Training is causal: cutting the curve at the plateau rule is what an early-stopped run would have logged.
    curve, stop = rep.until_plateau(rep.transfer_curve([plan.out / "scratch"], metric), metric)
    summary = {**_stage_summary(plan.out / "scratch"), "plateau_step": stop["step"] if stop else None,
               "plateau_rule": "best improved < 1% over the last quarter of the steps so far (>= 4 evaluations in it)"}
    if curve:
        best = (min if rep.lower_is_better(metric) else max)(p["value"] for p in curve)
        summary["best"] = best
        echo(f"scratch: best {metric} {best:.4g}, " + (f"plateau at step {stop['step']}" if stop else
                                                       f"no plateau within {plan.scratch.train.max_steps} steps"))
        if not until:
            target = f"{metric}{'<=' if rep.lower_is_better(metric) else '>='}{best!r}"
            plan.stage1.train.until = plan.stage2.train.until = target
    return {"summary": summary, "curve": curve, "metric": metric}


def _plot(plan: TransferPlan, echo: Callable[[str], None], speedup: dict[str, Any]) -> str | None:
    try:
        line = {"metric": speedup["metric"], "value": speedup["scratch_best"]} if "scratch_best" in speedup else None
        path = plot_runs([plan.out / "curves" / "vpgtrans", plan.out / "scratch"], plan.out / "curves.png",
                         labels=["VPGTrans", "scratch"], title="VPGTrans vs training from scratch", threshold=line)
    except Exception as exc:  # the plot is optional (matplotlib is an extra); the numbers are in report.json
        echo(f"note: no plot ({exc})")
        return None
    return str(path)


def merged_equals(prepared: Prepared, atol: float = 1e-5) -> bool:
    """True when the model's projector is W_c·W_src, W_c·b_src + b_c (a check for tests and --debug)."""
    conv = prepared.fit.linear
    with torch.no_grad():
        w = conv.weight.double() @ prepared.source_projector.weight.double()
        b = conv.weight.double() @ prepared.source_projector.bias.double() + conv.bias.double()
        p = prepared.model.projector
        return bool(torch.allclose(p.weight.double(), w, atol=atol) and torch.allclose(p.bias.double(), b, atol=atol))
