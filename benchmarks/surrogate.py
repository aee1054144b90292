"""Surrogate training on real weights: train the VPG on a surrogate of SmolLM2, graft it onto SmolLM2, fine-tune.

    python benchmarks/surrogate.py [--quick] [--depths 6,10,15] [--seeds 0] [--out benchmarks/results]

EfficientNet-Lite0 → Q-Former (MiniLM init) → projector → SmolLM2-135M (recipe `easyvqa_smollm2`, easy-vqa),
as in benchmarks/real_weights.py. Per seed: direct training on SmolLM2 (the baseline). Per depth K:
1. `make_surrogate` (SmolLM2's embeddings + first K of 30 layers + a translator (layer K) + the last layer
   (`--last-layers 1`, the default; 0: first K only) + final norm + LM head), healed 200 steps;
2. the cost of one training step on the surrogate vs on SmolLM2: CPU seconds (median of repeats, same
   process) and FLOPs counted with torch.utils.flop_counter on the same forward + backward;
3. the recipe trained on the surrogate (its own validation accuracy);
4. the zero-shot graft: the surrogate's VPG + projector on SmolLM2 with the identity converter (and, at the
   first depth, with a fitted `linear-cosine` converter: the identity-vs-fitted measurement), no training;
5. `transfer()` from the surrogate-trained model to SmolLM2 (converter 'auto' → identity, warm-up at 1× LR —
   transfer()'s default for a surrogate source, `--warmup-lr-scale` to change it — then fine-tuning). The
   route's cost = surrogate healing + surrogate training + transfer; it is compared to direct training's steps
   and wall time to reach direct training's best validation accuracy.
Answers are read up to the first newline (the recipe's `eval.stop`), and every accuracy has a blind baseline
beside it: each question answered with the commonest training answer of its kind (three quarters of easy-vqa
is yes/no, so saying "yes" to everything scores ~0.4).
Seeds can run side by side (each with its own --work) and be merged with --summarize A.json B.json.
Results: `<out>/surrogate.json` and `<out>/surrogate.png`. Wall times on a shared CPU are noisy; the CPU-time
and FLOP ratios of step 2 are the steadier cost figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402
from real_weights import export_data, model_on_test, prior_answers, read_jsonl, score, test_features  # noqa: E402

RECIPE = "easyvqa_smollm2"
METRIC = "vqa_accuracy"
SIZES: dict[str, dict[str, Any]] = {
    # The recipe's own batch (16) and length (150 steps) for direct training and for training on a surrogate;
    # ~30 min per seed on one idle core. (The first version, 60 steps of batch 8 with 48 validation questions,
    # stopped direct training near chance: easy-vqa is half yes/no questions.)
    "default": dict(train_questions=4800, test_questions=296, val_questions=96, batch=16, direct_steps=150,
                    eval_every=15, sur_steps=150, sur_eval_every=25, warmup_steps=5, transfer_steps=45,
                    transfer_eval_every=5, cost_repeats=3, depths=(6, 10, 15), heal_steps=200, heal_lr=2e-3),
    "quick": dict(train_questions=320, test_questions=32, val_questions=16, batch=4, direct_steps=4, eval_every=2,
                  sur_steps=4, sur_eval_every=2, warmup_steps=1, transfer_steps=2, transfer_eval_every=1,
                  cost_repeats=1, depths=(4,), heal_steps=4, heal_lr=1e-3),
}


def step_cost(spec: dict[str, Any], records: list[dict[str, Any]], batch: int, repeats: int,
              max_text_len: int = 8) -> dict[str, Any]:
    """CPU seconds (median) and counted FLOPs of one forward + backward of the training loss."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vpgtrans.images import open_image
    from vpgtrans.model import build_model

    torch.manual_seed(0)
    model = build_model(spec)
    model.set_trainable(vpg=True, projector=True)
    model.train()
    rows = records[:batch]
    with torch.no_grad():
        feats = model.encode_images(model.vision.preprocess([open_image(r["image"]) for r in rows]))
    samples = [model.template.sample(r["prompt"], target=r["answer"]) for r in rows]

    def once() -> None:
        model.zero_grad(set_to_none=True)
        model(feats, samples, max_text_len=max_text_len).backward()

    once()  # warm-up: allocator, kernels
    with FlopCounterMode(display=False) as counter:
        once()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        once()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    llm_params = sum(p.numel() for p in model.llm.parameters())
    return {"cpu_s": round(statistics.median(cpu), 4), "wall_s": round(statistics.median(wall), 4),
            "gflop": round(counter.get_total_flops() / 1e9, 3), "batch": batch, "repeats": repeats,
            "llm_params": llm_params}


def curve_of(run_dirs: list[Path], offset: dict[str, float] | None = None) -> list[dict[str, float]]:
    """Validation-accuracy curve of consecutive run dirs (joined), shifted by `offset`."""
    from vpgtrans.transfer import report as rep

    return rep.eval_curve(rep.joined_rows(run_dirs), METRIC, offset)


def graft(src_model: str, dst: str, train: Path, common: list[str], converter: str,
          log: Callable[[str], None]) -> Any:
    """The surrogate-trained VPG + projector on the full LLM through `converter`, before any training."""
    from vpgtrans.transfer.options import TransferOptions
    from vpgtrans.transfer.plan import plan_transfer
    from vpgtrans.transfer.race import prepare

    plan = plan_transfer(TransferOptions(src=src_model, dst=dst, data=str(train), recipe=RECIPE,
                                         overrides=tuple(common), converter=converter, out="/nonexistent-unused",
                                         min_coverage=0.0))
    prepared = prepare(plan, echo=log)
    return prepared.model, {"converter": prepared.converter, "pairs": prepared.pairs.summary(),
                            "heldout_cosine": prepared.fit.heldout_cosine if prepared.fit else None}


def heal_text(records: list[dict[str, Any]], path: Path) -> Path:
    """Healing text: the distinct 'Question: … Answer: …' lines of the training questions (no images)."""
    lines = list(dict.fromkeys(f"{r['prompt']} {r['answer']}" for r in records))
    path.write_text("\n".join(lines) + "\n")
    return path


def tag(k: int, args: argparse.Namespace) -> str:
    """Directory tag of a surrogate shape: k6, or k6-t1 (translator + last layer)."""
    return f"k{k}-t{args.last_layers}" if args.last_layers else f"k{k}"


def surrogate_for(k: int, args: argparse.Namespace, size: dict[str, Any], ctx: dict[str, Any],
                  log: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """The (healed) surrogate of depth k under the work dir, made once: its directory and manifest."""
    from vpgtrans.surrogate import make_surrogate, read_surrogate

    sur_dir = ctx["work"] / f"surrogate-{tag(k, args)}"
    manifest = read_surrogate(sur_dir)
    if manifest is None or (manifest.get("heal") or {}).get("steps", 0) != size["heal_steps"]:
        manifest = make_surrogate(args.dst, k, sur_dir, last_layers=args.last_layers, heal_steps=size["heal_steps"],
                                  heal_data=ctx["paths"].get("heal") if size["heal_steps"] else None,
                                  heal_lr=size["heal_lr"], force=True, echo=log)
    return sur_dir, manifest


def first_reaching(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """First point of `curve` at or above `target` (accuracy: higher is better)."""
    from vpgtrans.transfer.report import first_reaching as reaching

    return reaching(curve, target, lower=False)


def run_depth(k: int, seed: int, args: argparse.Namespace, size: dict[str, Any], ctx: dict[str, Any],
              log: Callable[[str], None]) -> dict[str, Any]:
    """Surrogate of depth k: its VPG, zero-shot graft, transfer; the route's cost against direct training."""
    import torch

    from vpgtrans.checkpoint import load_model
    from vpgtrans.recipes import load_recipe
    from vpgtrans.train.runner import run_recipe
    from vpgtrans.transfer.options import TransferOptions
    from vpgtrans.transfer.race import transfer

    work, common, paths = ctx["work"], ctx["common"](seed), ctx["paths"]
    sur_dir, manifest = surrogate_for(k, args, size, ctx, log)
    out: dict[str, Any] = {"layers": k, "last_layers": args.last_layers, "seed": seed, "surrogate_dir": str(sur_dir),
                           "heal": manifest.get("heal")}
    log(f"[K={k} seed={seed}] training the recipe on the surrogate ({size['sur_steps']} steps)")
    recipe = load_recipe(RECIPE, [*common, f"data.train={paths['train']}", f"model.llm.path={sur_dir}",
                                  f"train.max_steps={size['sur_steps']}", f"train.eval_every={size['sur_eval_every']}"])
    run_dir = work / f"s{seed}" / f"surrogate-{tag(k, args)}"
    sur_run = run_recipe(recipe, run_dir, force=True, progress=False, echo=log)
    sur_res = sur_run["results"]
    sur_curve = curve_of([run_dir])
    out["surrogate_training"] = {"steps": sur_res["steps"], "samples": sur_res["samples"],
                                 "wall_time": sur_res["wall_time"], "val_curve": sur_curve,
                                 "val_best": max((p["value"] for p in sur_curve), default=None)}
    sur_model = load_model(sur_run["model_dir"])
    out["surrogate_vpg_test"] = model_on_test(sur_model, ctx["test"], ctx["feats"])
    del sur_model
    log(f"  surrogate VPG on the surrogate: test {out['surrogate_vpg_test'][METRIC]}")

    converters = ["identity", "linear-cosine"] if k == args.depths[0] else ["identity"]
    out["zero_shot"] = {}
    for conv in converters:
        model, info = graft(sur_run["model_dir"], args.dst, paths["train"], common, conv, log)
        val, test = model_on_test(model, ctx["val"], ctx["feats"]), model_on_test(model, ctx["test"], ctx["feats"])
        out["zero_shot"][conv] = {**info, "val": val[METRIC], "test": test[METRIC],
                                  "test_open": test["open_accuracy"], "test_examples": test["examples"]}
        log(f"  zero-shot graft ({conv}): val {val[METRIC]}, test {test[METRIC]}")
        del model
    torch.manual_seed(seed)
    log(f"[K={k} seed={seed}] transfer to {args.dst}: warm-up {size['warmup_steps']} + {size['transfer_steps']} steps")
    n_train = len(ctx["train"])
    tdir = work / f"s{seed}" / f"transfer-{tag(k, args)}"
    report = transfer(TransferOptions(
        src=sur_run["model_dir"], dst=args.dst, data=str(paths["train"]), out=tdir, recipe=RECIPE,
        overrides=(*common, f"train.max_steps={size['transfer_steps']}",
                   f"train.eval_every={size['transfer_eval_every']}"),
        warmup_epochs=size["warmup_steps"] * size["batch"] / n_train, force=True, min_coverage=0.0,
        warmup_lr_scale=args.warmup_lr_scale), echo=log).to_json()
    # The route pays for making the surrogate too: its healing (distillation) time counts, as the converter fit does.
    sur_wall = sur_res["wall_time"] + float((manifest.get("heal") or {}).get("seconds") or 0.0)
    zero = {"step": 0, "samples": 0, "wall_time": 0.0, "value": out["zero_shot"]["identity"]["val"]}
    route = [{**zero, "wall_time": sur_wall}] + curve_of([tdir / "warmup", tdir / "finetune"],
                                                       {"step": 0, "samples": 0, "wall_time": sur_wall})
    out["transfer"] = {"converter": report["converter"].get("converter"), "stages": report["stages"],
                       "seconds": report["seconds"], "route_curve": route}
    final = model_on_test(load_model(tdir / "model"), ctx["test"], ctx["feats"])
    out["final_test"], out["final_test_open"] = final[METRIC], final["open_accuracy"]
    out.update(match_direct(out, ctx["direct"][seed], ctx["cost"][k]["cpu_s"] / ctx["cost"]["full"]["cpu_s"]))
    log(f"  match direct best {ctx['direct'][seed]['best']}: {out['match']}")
    return out


def match_direct(row: dict[str, Any], direct: dict[str, Any], cpu_ratio: float) -> dict[str, Any]:
    """When the route (surrogate training + transfer) first matched direct training's best and its final value."""
    route, sur_steps = row["transfer"]["route_curve"], row["surrogate_training"]["steps"]
    out = {}
    for key, target in (("match", direct["best"]), ("match_final", direct["val_curve"][-1]["value"])):
        hit, ref = first_reaching(route, target), first_reaching(direct["val_curve"], target)
        out[key] = {"target": target, "reached": hit is not None, "direct_step": ref["step"],
                    "direct_wall_time": ref["wall_time"], "dst_steps": hit["step"] if hit else None,
                    "surrogate_steps": sur_steps,
                    # surrogate steps priced at their measured CPU cost in full-LLM steps
                    "equivalent_dst_steps": round(hit["step"] + sur_steps * cpu_ratio, 1) if hit else None,
                    "wall_time": hit["wall_time"] if hit else None,
                    "wall_ratio_vs_direct": round(hit["wall_time"] / ref["wall_time"], 3) if hit else None,
                    "route_best_val": max(p["value"] for p in route)}
    return out


def direct_run(seed: int, args: argparse.Namespace, size: dict[str, Any], ctx: dict[str, Any],
               log: Callable[[str], None]) -> dict[str, Any]:
    """The recipe trained directly on the full LLM: its curve, best, when it first got there, test accuracy."""
    from vpgtrans.checkpoint import load_model
    from vpgtrans.recipes import load_recipe
    from vpgtrans.train.runner import run_recipe

    import json

    d = ctx["work"] / f"s{seed}" / "direct"
    recipe = load_recipe(RECIPE, [*ctx["common"](seed), f"data.train={ctx['paths']['train']}",
                                  f"train.max_steps={size['direct_steps']}"])
    done = json.loads((d / "run.json").read_text()) if (d / "run.json").is_file() else {}
    if args.reuse_direct and done.get("status") == "finished" and done.get("fingerprint") == recipe.fingerprint():
        log(f"[seed={seed}] direct training: reusing the finished run in {d} (same recipe fingerprint)")
        res = {**done, "model_dir": str(d / "model")}
    else:
        log(f"[seed={seed}] direct training on {args.dst} ({size['direct_steps']} steps)")
        res = run_recipe(recipe, d, force=True, progress=False, echo=log)
    curve = curve_of([d])
    best = max(p["value"] for p in curve)
    final = model_on_test(load_model(res["model_dir"]), ctx["test"], ctx["feats"])
    out = {"steps": res["results"]["steps"], "wall_time": res["results"]["wall_time"], "val_curve": curve,
           "best": best, "reached": first_reaching(curve, best),
           "final_test": final[METRIC], "final_test_open": final["open_accuracy"]}
    log(f"  direct: best val {best} at {out['reached']}, final test {out['final_test']}")
    return out


def summary_rows(result: dict[str, Any]) -> list[str]:
    """The printed table: one row per depth and seed; 'best'/'final' = matching direct's best / final val accuracy."""
    head = (f"{'K':>3} {'seed':>4} {'cpu':>5} {'flop':>5} {'surVPG':>7} {'graft':>6} {'target':>6} "
            f"{'route steps':>12} {'equiv':>6} {'route s':>8} {'direct steps':>12} {'direct s':>8} {'wall x':>7} "
            f"{'final test':>11}")
    lines = [head]
    for row in result["runs"]:
        k, seed = row["layers"], row["seed"]
        c = result["cost"][str(k)]
        direct = result["direct"][str(seed)]
        for key, name in (("match", "best"), ("match_final", "final")):
            m = row[key]
            hit = m["reached"]
            steps = f"{m['surrogate_steps']}s+{m['dst_steps']}" if hit else "never"
            wall = f"{m['wall_time']:.0f}" if hit else "-"
            lines.append(f"{k:>3} {seed:>4} {c['cpu_ratio']:>5.2f} {c['flop_ratio']:>5.2f} "
                         f"{row['surrogate_vpg_test'][METRIC]:>7.3f} {row['zero_shot']['identity']['test']:>6.3f} "
                         f"{name:>6} {steps:>12} {m['equivalent_dst_steps'] if hit else '-':>6} "
                         f"{wall:>8} {m['direct_step']:>12} {m['direct_wall_time']:>8.0f} "
                         f"{m['wall_ratio_vs_direct'] if hit else '-':>7} "
                         f"{row['final_test']:.3f}/{direct['final_test']:.3f}")
    lines += aggregate_lines(result)
    return lines


def aggregate_lines(result: dict[str, Any]) -> list[str]:
    """Per depth over seeds: how many seeds matched direct's best, mean wall ratio of those (said so), accuracies."""
    def stat(values: list[float]) -> str:
        if not values:
            return "-"
        return (f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1
                else f"{values[0]:.3f}")

    lines = ["per depth over seeds (wall ratio = route ÷ direct wall time to direct's best; mean over the seeds "
             "that matched it, their count given):"]
    direct_final = [d["final_test"] for d in result["direct"].values()]
    if result.get("blind"):
        b = result["blind"]
        lines.append(f"  blind baseline (commonest training answer per question kind, image unseen): val "
                     f"{b['val'][METRIC]:.3f}, test {b['test'][METRIC]:.3f} "
                     f"(open questions {b['test']['open_accuracy']:.3f})")
    for k in sorted({r["layers"] for r in result["runs"]}):
        rows = [r for r in result["runs"] if r["layers"] == k]
        hit = [r["match"]["wall_ratio_vs_direct"] for r in rows if r["match"]["reached"]]
        lines.append(f"  K={k}: matched {len(hit)}/{len(rows)} seeds, wall ratio {stat(hit)}; zero-shot graft "
                     f"test {stat([r['zero_shot']['identity']['test'] for r in rows])}; final test "
                     f"{stat([r['final_test'] for r in rows])} vs direct {stat(direct_final)}")
        opens = [r["final_test_open"] for r in rows if "final_test_open" in r]
        if opens:
            direct_open = [d["final_test_open"] for d in result["direct"].values() if "final_test_open" in d]
            lines.append(f"        open (colour/shape) questions: final test {stat(opens)} "
                         f"vs direct {stat(direct_open)}")
    return lines


def finish(result: dict[str, Any], out: Path, log: Callable[[str], None]) -> None:
    """Matches, table, JSON and plot from the recorded curves (also for --summarize of an earlier JSON)."""
    for row in result["runs"]:
        cost = result["cost"][str(row["layers"])]
        row.update(match_direct(row, result["direct"][str(row["seed"])], cost["cpu_ratio"]))
    result["table"] = summary_rows(result)
    write_json(out / "surrogate.json", result)
    try:
        plot(result, out / "surrogate.png")
    except Exception as exc:  # matplotlib is optional; the numbers are in the JSON
        log(f"note: no plot ({exc})")
    for line in result["table"]:
        print(line)
    log(f"wrote {out / 'surrogate.json'}")


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs of different seeds (direct runs and depth rows joined; step costs of the first)."""
    result = dict(parts[0])
    result["direct"], result["runs"], result["seeds"] = dict(result["direct"]), list(result["runs"]), []
    for part in parts:
        seeds = [s for s in part["seeds"] if s not in result["seeds"]]
        if len(seeds) != len(part["seeds"]):
            raise SystemExit(f"error: seed(s) {sorted(set(part['seeds']) - set(seeds))} appear in two results")
        result["seeds"] += seeds
        if part is not parts[0]:
            result["direct"].update(part["direct"])
            result["runs"] += part["runs"]
            result["total_seconds"] = max(result.get("total_seconds", 0), part.get("total_seconds", 0))
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """Validation accuracy vs cumulative wall time: direct training and each surrogate route (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    seed = str(result["seeds"][0])
    d = result["direct"][seed]["val_curve"]
    ax.plot([p["wall_time"] for p in d], [p["value"] for p in d], "k-o", label="direct on SmolLM2")
    for row in (r for r in result["runs"] if str(r["seed"]) == seed):
        c = row["transfer"]["route_curve"]
        ax.plot([p["wall_time"] for p in c], [p["value"] for p in c], "-o", label=f"surrogate K={row['layers']} → graft → transfer")
    ax.axhline(result["direct"][seed]["best"], color="grey", ls=":", lw=1)
    ax.set_xlabel("cumulative wall time, s (surrogate training counted)")
    ax.set_ylabel("easy-vqa val accuracy")
    ax.legend(fontsize=8)
    ks = sorted(int(k) for k in result["cost"] if k != "full")
    x = range(len(ks))
    bx.bar([i - 0.2 for i in x], [result["cost"][str(k)]["cpu_ratio"] for k in ks], 0.4, label="CPU time")
    bx.bar([i + 0.2 for i in x], [result["cost"][str(k)]["flop_ratio"] for k in ks], 0.4, label="FLOPs")
    bx.set_xticks(list(x), [f"K={k}" for k in ks])
    bx.set_ylabel("training-step cost, surrogate / SmolLM2")
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the result dict (also written to <out>/surrogate.json)."""
    from vpgtrans.model import build_model
    from vpgtrans.recipes import load_recipe
    from vpgtrans.surrogate import make_surrogate

    size = dict(SIZES["quick" if args.quick else "default"])
    if args.heal_steps is not None:
        size["heal_steps"] = args.heal_steps
    args.depths = [int(k) for k in args.depths.split(",")] if args.depths else list(size["depths"])
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = (lambda m: print(f"[{time.perf_counter() - t0:7.1f}s] {m}", flush=True))
    paths = export_data(work, size)
    val, test = read_jsonl(paths["val"]), read_jsonl(paths["test"])
    test = test[len(val):]  # export_data's val is the head of its test subset: score on the rest only
    train = read_jsonl(paths["train"])
    paths["heal"] = heal_text(train, work / "data" / "heal.txt")

    def common(seed: int) -> list[str]:
        return [f"data.val={paths['val']}", f"data.max_val_samples={size['val_questions']}",
                f"eval.max_samples={size['val_questions']}", f"train.batch_size={size['batch']}",
                f"train.eval_every={size['eval_every']}", "train.save_every=0", f"model.llm.path={args.dst}",
                f"train.seed={seed}", *([f'model.template.text="{args.template}"'] if args.template else [])]

    ctx: dict[str, Any] = {"work": work, "paths": paths, "train": train, "val": val, "test": test, "common": common}
    # What a model that never sees the image scores (easy-vqa is three quarters yes/no): a graft must beat it.
    blind = {name: score(prior_answers(train, recs), recs, 0.0) for name, recs in (("val", val), ("test", test))}
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "mode": "quick" if args.quick else "default",
        "machine": machine_info(), "note": args.note, "recipe": RECIPE, "dst_llm": args.dst, "sizes": size,
        "depths": args.depths, "seeds": seeds, "metric": METRIC, "last_layers": args.last_layers,
        "template": args.template or load_recipe(RECIPE, []).model.template.get("text"),
        "data": {"train_questions": len(train), "val_questions": len(val), "test_questions": len(test)},
        "blind": {name: {k: m[k] for k in (METRIC, "open_accuracy")} for name, m in blind.items()}}
    spec = dict(load_recipe(RECIPE, common(0)).model.__dict__)
    log("step cost: SmolLM2 vs each surrogate (CPU time, counted FLOPs)")
    full = step_cost(spec, train, size["batch"], size["cost_repeats"])
    cost: dict[Any, Any] = {"full": full}
    for k in args.depths:
        sur_dir = work / f"cost-{tag(k, args)}"  # healing changes weights, not cost: an unhealed copy is measured
        if not (sur_dir / "config.json").is_file():
            make_surrogate(args.dst, k, sur_dir, last_layers=args.last_layers, force=True, echo=log)
        c = step_cost({**spec, "llm": {**spec["llm"], "path": str(sur_dir)}}, train, size["batch"],
                      size["cost_repeats"])
        c.update(cpu_ratio=round(c["cpu_s"] / full["cpu_s"], 3), flop_ratio=round(c["gflop"] / full["gflop"], 3))
        cost[k] = c
        log(f"  K={k}: {c}")
    log(f"  full: {full}")
    ctx["cost"] = cost
    result["cost"] = {str(k): v for k, v in cost.items()}
    vision = build_model(spec).vision
    ctx["feats"] = test_features(vision, val + test)
    del vision
    ctx["direct"], result["direct"], result["runs"] = {}, {}, []
    out = Path(args.out).expanduser()
    for seed in seeds:
        ctx["direct"][seed] = direct_run(seed, args, size, ctx, log)
        result["direct"][str(seed)] = ctx["direct"][seed]
        for k in args.depths:
            result["runs"].append(run_depth(k, seed, args, size, ctx, log))
            result["total_seconds"] = round(time.perf_counter() - t0, 1)
            write_json(out / "surrogate.json", result)  # partial results survive an interrupted run
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    finish(result, out, log)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line entry."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few minutes: tiny sizes, for smoke runs")
    p.add_argument("--depths", default=None, help="comma-separated surrogate depths K (default 6,10,15)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--out", default="benchmarks/results", help="where surrogate.json (+ .png) go")
    p.add_argument("--work", default="runs/surrogate", help="data, surrogates and run dirs")
    p.add_argument("--dst", default="smollm2-135m", help="the full LLM (alias or dir)")
    p.add_argument("--reuse-direct", action="store_true",
                   help="reuse a finished direct run of the same recipe in --work (it is the costliest part)")
    p.add_argument("--heal-steps", type=int, default=None, help="surrogate healing steps (0: unhealed)")
    p.add_argument("--last-layers", type=int, default=1,
                   help="surrogate with a translator + SmolLM2's last L layers (0: the first K layers only)")
    p.add_argument("--template", default=None,
                   help="the prompt template for every arm (default: the recipe's)")
    p.add_argument("--warmup-lr-scale", type=float, default=None,
                   help="the transfer's warm-up LR ÷ the recipe's (default: transfer()'s own default)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'shared, loaded machine')")
    p.add_argument("--summarize", default=None, metavar="JSON", nargs="+",
                   help="recompute the matches, table and plot of earlier surrogate.json files into --out; several "
                        "(e.g. one per seed, run side by side with their own --work) are merged, step costs from "
                        "the first")
    args = p.parse_args(argv)
    if args.summarize:
        import json

        parts = [json.loads(Path(f).read_text()) for f in args.summarize]
        result = merge(parts)
        finish(result, Path(args.out).expanduser(), print)
        return result
    import torch

    torch.set_num_threads(args.threads)
    return run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
