"""Transfer efficiency of VPGTrans on the synthetic world: the paper's speed-up table and ablations, in miniature.

    python benchmarks/transfer_efficiency.py            # default size (≤ ~45 min on a 2-core CPU)
    python benchmarks/transfer_efficiency.py --quick    # one pair, three rows, ≤ ~5 min
    python benchmarks/transfer_efficiency.py --full     # every pair × every row × 3 seeds (≥ 2.5 h on 2 cores)
    python benchmarks/transfer_efficiency.py --plateau 2000   # one long scratch run: when does scratch plateau?
    python benchmarks/transfer_efficiency.py --protocol paper         # the paper's protocol, in epochs (issue 29)
    python benchmarks/transfer_efficiency.py --protocol paper --quick # the same on one pair, 25% of the images
    python benchmarks/transfer_efficiency.py --protocol steps         # the step-level race to scratch's plateau
    python benchmarks/transfer_efficiency.py --diagnose [--quick]     # is the world in the paper's regime? (issue 29)

Speed-up (paper's definition): steps for the scratch run to reach its best val_loss ÷ steps for the row to
first match it, warm-up steps counted against the row; likewise in samples and in wall time (training time
only; the converter fit counts against the transfer). Each row is compared with the scratch run of the same
seed. Writes benchmarks/results/transfer_efficiency.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _diagnose  # noqa: E402
import _paper_protocol as paper  # noqa: E402
from _transfer_rows import (METRIC, PAIRS, ROWS, Settings, compare, run_row, source_architecture,  # noqa: E402
                            train_source)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# Published figures (arXiv 2305.01278, as summarised in the project's design notes, §2).
PAPER = {
    "opt-2.7b>opt-6.7b": {"speedup": 10.7, "note": "631.5 vs 59.0 A100 GPU-hours, with 10.7% of the data"},
    "flant5-xl>flant5-xxl": {"speedup": 21.1, "note": "FlanT5-XL → FlanT5-XXL"},
    "warmup": "5x warm-up LR reaches the best score fastest; 10x is no faster but still stable",
    "converter_only": "converter-initialised projector without warm-up scores about random",
    "source_size": "smaller source LLMs transfer better (e.g. OPT-125M/350M → OPT-2.7B beat OPT-1.3B → OPT-2.7B)",
    "converter_table": "the paper fits a linear converter with a cosine loss (our linear-cosine)",
    "tables_2_3": "the per-pair TaS/TaT ratios (Table 3) and converter Table 2 are not in the design notes and "
                  "could not be fetched offline: only the qualitative findings above are compared",
}

PROFILES: dict[str, dict[str, Any]] = {
    "quick": {"pairs": ["opt-s>llama"], "rows": ["scratch", "inherit", "vpgtrans"], "seeds": 2, "budget_min": 5,
              "settings": {"steps": 80, "eval_every": 16, "warmup_steps": 16, "val_samples": 64,
                           "source_steps": 100}},
    "default": {"pairs": ["opt-s>llama", "opt-s>opt-m", "opt-s>flant5", "llama>opt-s", "opt-m>llama"],
                "rows": {"opt-s>llama": [r for r in ROWS if r != "inherit+warmup"]},
                "other_rows": ["scratch", "vpgtrans"], "seeds": 3,
                "budget_min": 45, "settings": {}},
    # ~50,000 training steps: about 2.5 h at 6 steps/s on one free core, much longer on a loaded box.
    "full": {"pairs": list(PAIRS), "rows": {p: list(ROWS) for p in PAIRS}, "seeds": 3, "budget_min": None,
             "settings": {"steps": 480}},
}


def machine() -> dict[str, Any]:
    """Where the numbers were measured (the box may be shared: the load average says how busy it was)."""
    from _common import machine_info

    return machine_info()


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": round(statistics.fmean(values), 3), "std": round(statistics.stdev(values), 3)
            if len(values) > 1 else 0.0, "min": round(min(values), 3), "max": round(max(values), 3),
            "n": len(values)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per pair and row: speed-up mean ± std (min..max) over the seeds that matched scratch's best (and which did not)."""
    out: dict[str, dict[str, Any]] = {}
    for r in runs:
        cell = out.setdefault(r["pair"], {}).setdefault(r["row"], {"runs": []})
        cell["runs"].append(r)
    for pair, rows in out.items():
        for name, cell in rows.items():
            rs = cell.pop("runs")
            vs = [r.get("vs_scratch") or {} for r in rs]
            reached = [v for v in vs if v.get("speedup")]
            cell.update(seeds=[r["seed"] for r in rs], reached=f"{len(reached)}/{len(rs)}",
                        speedup_steps=_stats([v["speedup"] for v in reached]),
                        speedup_samples=_stats([v["speedup_samples"] for v in reached]),
                        speedup_wall=_stats([v["speedup_wall_time"] for v in reached if v.get("speedup_wall_time")]),
                        steps_to_match=_stats([v["vpgtrans"]["step"] for v in reached]),
                        best_val_loss=_stats([r["best"] for r in rs if r.get("best") is not None]))
            if name == "scratch":
                cell["steps_to_best"] = _stats([r["vs_scratch"]["scratch"]["step"] for r in rs])
                cell["plateau_steps"] = paper.plateau_stats(rs)
            else:  # seeds that never matched are not in the means above: say which, and their budget
                cell["never_matched"] = [{"seed": r["seed"], "budget": r.get("budget"), "best": r.get("best")}
                                         for r, v in zip(rs, vs) if not v.get("speedup")]
            fits = [r["converter_fit"]["heldout_cosine"] for r in rs
                    if r.get("converter_fit") and r["converter_fit"].get("heldout_cosine") is not None]
            if fits:
                cell["converter_heldout_cosine"] = round(statistics.fmean(fits), 4)
    return out


def _mean(summary: dict, pair: str, row: str) -> float | None:
    """Mean speed-up in steps; 0.0 when the row ran but never matched scratch, None when it did not run."""
    cell = (summary.get(pair) or {}).get(row)
    if not cell:
        return None
    mean = cell["speedup_steps"]["mean"]
    return 0.0 if mean is None else mean


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else "never matched" if x == 0.0 else f"{x:.2f}x"


def _spread(summary: dict, cells: list[tuple[str, str]]) -> float:
    """The largest seed std among the compared cells: mean differences below it are not telling."""
    return max((((summary.get(p) or {}).get(r) or {}).get("speedup_steps", {}).get("std") or 0.0)
               for p, r in cells)


def verdicts(summary: dict[str, Any]) -> list[dict[str, str]]:
    """Where the miniature agrees with the paper and where it does not, stated from the measured means."""
    out = []

    def add(claim: str, paper: str, ours: str, agrees: bool | None,
            compared: list[tuple[str, str]] | None = None) -> None:
        verdict = "n/a (not measured in this run)" if agrees is None else ("agrees" if agrees else "disagrees")
        if agrees is not None and compared:
            means = [_mean(summary, p, r) or 0.0 for p, r in compared]
            spread = _spread(summary, compared)
            if max(means) - min(means) <= spread:
                verdict = f"inconclusive: means differ by {max(means) - min(means):.2f}x, within the seed std " \
                          f"{spread:.2f}x (leans '{verdict}')"
        out.append({"claim": claim, "paper": paper, "ours": ours, "verdict": verdict})

    def headline(claim: str, paper: str, figure: float, ours: float | None) -> None:
        add(claim, paper, _fmt(ours), None if ours is None else ours >= figure / 2)
        if ours is not None and 1.0 < ours < figure / 2:
            out[-1]["verdict"] = f"same direction (faster than scratch) but far smaller than {figure}x"

    headline("size transfer speed-up (OPT small → larger)", "OPT-2.7B→6.7B 10.7x", 10.7,
             _mean(summary, "opt-s>opt-m", "vpgtrans"))
    headline("FlanT5 speed-up (paper: XL→XXL, a size transfer; ours: OPT-s→FlanT5, a type transfer)",
             "FlanT5-XL→XXL 21.1x", 21.1, _mean(summary, "opt-s>flant5", "vpgtrans"))
    types = {p: _mean(summary, p, "vpgtrans") for p in PAIRS if _mean(summary, p, "vpgtrans") is not None}
    measured = list(types.values())
    add("VPGTrans speeds up every transfer (> 1x)", "a speed-up on every size (TaS) and type (TaT) pair",
        ", ".join(f"{p} {_fmt(v)}" for p, v in types.items()), None if not measured else min(measured) > 1.0)
    w = {k: _mean(summary, "opt-s>llama", k) for k in ("warmup-1x", "vpgtrans", "warmup-10x")}
    if all(v is not None for v in w.values()):
        add("5x warm-up fastest; 10x no faster", PAPER["warmup"], f"1x {_fmt(w['warmup-1x'])}, "
            f"5x {_fmt(w['vpgtrans'])}, 10x {_fmt(w['warmup-10x'])}",
            w["vpgtrans"] >= w["warmup-1x"] and w["warmup-10x"] <= w["vpgtrans"] * 1.05,
            [("opt-s>llama", k) for k in w])
    else:
        add("5x warm-up fastest; 10x no faster", PAPER["warmup"], "rows not run", None)
    conv, full = _mean(summary, "opt-s>llama", "inherit+conv"), _mean(summary, "opt-s>llama", "vpgtrans")
    add("converter init without warm-up gives no head start", PAPER["converter_only"],
        f"inherit+conv {_fmt(conv)} vs full VPGTrans {_fmt(full)}",
        None if conv is None or full is None else conv < full, [("opt-s>llama", "inherit+conv"),
                                                                 ("opt-s>llama", "vpgtrans")])
    fresh = _mean(summary, "opt-s>llama", "inherit+warmup")
    add("the converter-merged projector helps (vs a fresh projector, both warmed up 5x)",
        "converter initialisation + warm-up is the fastest start", f"with converter {_fmt(full)} vs fresh "
        f"projector {_fmt(fresh)}", None if fresh is None or full is None else full >= fresh,
        [("opt-s>llama", "vpgtrans"), ("opt-s>llama", "inherit+warmup")])
    small, large = _mean(summary, "opt-s>llama", "vpgtrans"), _mean(summary, "opt-m>llama", "vpgtrans")
    add("smaller source transfers better", PAPER["source_size"], f"OPT-s→LLaMA {_fmt(small)} vs OPT-m→LLaMA "
        f"{_fmt(large)}", None if small is None or large is None else small >= large,
        [("opt-s>llama", "vpgtrans"), ("opt-m>llama", "vpgtrans")])
    return out


def write_outputs(result: dict[str, Any], stem: str, results: Path = RESULTS,
                  png: bool = True) -> tuple[Path, Path | None]:
    """<results>/<stem>.json (atomically) and, with `png`, the bar chart + curves PNG."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{stem}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(path)
    if not png:
        return path, None
    try:
        return path, plot(result, results / f"{stem}.png")
    except ImportError:  # matplotlib is an optional extra; the numbers are in the JSON
        return path, None


def plot(result: dict[str, Any], out: Path) -> Path:
    """Left: speed-up in steps per pair and row (mean, std error bars). Right: val_loss curves of one pair."""
    from matplotlib.figure import Figure

    summary = result["summary"]
    fig = Figure(figsize=(13, 4.8), dpi=100, layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    pairs = list(summary)
    rows = [r for r in ROWS if r != "scratch" and any(r in summary[p] for p in pairs)]
    width = 0.8 / max(len(pairs), 1)
    for i, pair in enumerate(pairs):
        xs, ys, es = [], [], []
        for j, row in enumerate(rows):
            s = (summary[pair].get(row) or {}).get("speedup_steps") or {}
            if s.get("mean") is not None:
                xs.append(j + i * width)
                ys.append(s["mean"])
                es.append(s["std"] or 0.0)
            elif row in summary[pair]:  # ran, but never matched scratch's best within the budget
                ax.text(j + i * width, 0.02, "never", rotation=90, fontsize=6, ha="center", va="bottom")
        ax.bar(xs, ys, width, yerr=es, label=pair, capsize=2)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], rows, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("speed-up in steps (scratch best ÷ row)")
    ax.set_title("speed-up to scratch's best val_loss (mean ± std over seeds)", fontsize=10)
    ax.legend(fontsize=7)
    ax2 = fig.add_subplot(1, 2, 2)
    main = pairs[0] if pairs else None
    seed = min((r["seed"] for r in result["runs"] if r["pair"] == main), default=None)
    for r in result["runs"]:
        if r["pair"] == main and r["seed"] == seed:
            ax2.plot([p["step"] for p in r["curve"]], [p["value"] for p in r["curve"]], label=r["row"],
                     lw=2.0 if r["row"] in ("scratch", "vpgtrans") else 1.0)
    ax2.set_xlabel("training steps (warm-up included)")
    ax2.set_ylabel(METRIC)
    target = next((r["vs_scratch"]["scratch_best"] for r in result["runs"]
                   if r["pair"] == main and r["seed"] == seed and r["row"] == "scratch"), None)
    if target is not None:
        ax2.axhline(target, color="black", lw=0.8, ls="--", label="scratch best")
    ax2.set_title(f"{main}, seed {seed}: runs stop once they match scratch's best", fontsize=10)
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=7)
    fig.savefig(str(out), format="png")
    return out


def print_table(result: dict[str, Any], echo: Callable[[str], None] = print) -> None:
    """The measured table, then the paper's figures beside ours."""
    s = result["settings"]
    echo(f"\nspeed-up to the same seed's scratch best {METRIC} (scratch budget {s['steps']} steps, batch "
         f"{s['batch_size']}; mean ± std over seeds that matched it)")
    echo(f"{'pair':<14}{'row':<17}{'reached':>8}{'steps':>16}{'samples':>16}{'wall':>16}  best val_loss")

    def cell(st: dict) -> str:
        return "-" if st.get("mean") is None else f"{st['mean']:.2f}±{st['std']:.2f}x"

    for pair, rows in result["summary"].items():
        for name, c in rows.items():
            extra = ""
            if name == "scratch":
                extra = f"  (scratch reaches its best at step {c['steps_to_best']['mean']:.0f} on average)"
            best = c["best_val_loss"]["mean"]
            echo(f"{pair:<14}{name:<17}{c['reached']:>8}{cell(c['speedup_steps']):>16}"
                 f"{cell(c['speedup_samples']):>16}{cell(c['speedup_wall']):>16}  "
                 f"{'-' if best is None else f'{best:.4f}'}{extra}")
    for p in result.get("scratch_plateau") or []:
        echo(f"scratch plateau ({p['pair']}, lr {p['lr']:g}, {p['steps']} steps): best {METRIC} {p['best']:.4f} at "
             f"step {p['best_step']}, within 1% of it from step {p['within_1pct_step']}")
    echo("\npaper vs miniature")
    for v in result["paper_comparison"]:
        echo(f"- {v['claim']}: paper {v['paper']}; ours {v['ours']} → {v['verdict']}")
    echo(f"- {PAPER['tables_2_3']}")


def run_benchmark(profile: str, settings: Settings, pairs: list[str], rows_for: Callable[[str], list[str]],
                  seeds: list[int], work: Path, *, budget_s: float | None = None, stem: str = "transfer_efficiency",
                  results: Path = RESULTS, echo: Callable[[str], None] = print,
                  judge: Callable[[dict], list] | None = None) -> dict[str, Any]:
    """Train the sources, then per seed and pair: scratch, then every row until it matches scratch's best."""
    started = time.perf_counter()
    judge = judge or verdicts
    result: dict[str, Any] = {"format": "vpgtrans-bench-transfer-efficiency", "profile": profile,
                              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
                              "settings": asdict(settings), "pairs": {p: asdict(PAIRS[p]) for p in pairs},
                              "rows": {r: asdict(ROWS[r]) for p in pairs for r in rows_for(p)}, "seeds": seeds,
                              "definition": "speed-up = steps for scratch to reach its best val_loss ÷ steps for "
                                            "the row to first match it (warm-up counted); samples and training "
                                            "wall time likewise; each seed against its own scratch run",
                              "paper": PAPER, "runs": [], "skipped": []}
    sources: dict[str, Path] = {}
    result["sources_s"] = 0.0
    # Row-major, seeds inner: under a time budget the first rows (scratch, full VPGTrans) get every seed.
    todo = [(seed, p, r) for p in pairs for r in rows_for(p) for seed in seeds]
    scratch: dict[tuple[int, str], dict[str, Any]] = {}
    for i, (seed, pair_name, row_name) in enumerate(todo, 1):
        elapsed = time.perf_counter() - started
        if budget_s and elapsed > budget_s:
            result["skipped"].append({"seed": seed, "pair": pair_name, "row": row_name, "why": "time budget"})
            continue
        pair, row = PAIRS[pair_name], ROWS[row_name]
        base = scratch.get((seed, pair_name))
        if row_name != "scratch" and base is None:
            result["skipped"].append({"seed": seed, "pair": pair_name, "row": row_name, "why": "no scratch run"})
            continue
        target = None if base is None else base["vs_scratch"]["scratch_best"]
        if pair.src not in sources and row_name != "scratch":  # trained (or found in the cache) when first needed
            t0 = time.perf_counter()
            sources[pair.src] = train_source(settings, pair.src, work / "sources", echo)
            result["sources_s"] = round(result["sources_s"] + time.perf_counter() - t0, 1)
        run_dir = work / "runs" / pair_name.replace(">", "-to-") / f"{row_name}-s{seed}"
        # Under the paper's protocol a row gets what scratch spent up to its plateau; otherwise the fixed budget.
        budget = base["steps"] if base is not None and settings.plateau else settings.steps
        # Scratch only needs the source's architecture: it can start while another process trains the source.
        src = sources.get(pair.src) or source_architecture(settings, pair.src, work / "sources")
        run = run_row(settings, pair, row, seed, src, run_dir, target=target, budget=budget)
        run["vs_scratch"] = compare(run, base or run)
        if row_name == "scratch":
            scratch[(seed, pair_name)] = run
        result["runs"].append(run)
        v = run["vs_scratch"]
        echo(f"[{i}/{len(todo)} {time.perf_counter() - started:6.0f}s] {pair_name} {row_name:<15} seed {seed}: "
             f"{run['steps']} steps, best {run['best']:.4f}, "
             + (f"scratch best at step {v['scratch']['step']}"
                + (f", plateau at step {run['plateau_step']}" if run.get("plateau_step") else
                   ", no plateau within the cap" if settings.plateau else "") if row_name == "scratch" else
                f"speed-up {_fmt(v['speedup'])} steps / {_fmt(v['speedup_wall_time'])} wall")
             + f" ({run['total_s']:.0f}s)")
        result["summary"] = summarise(result["runs"])
        write_outputs({**result, "paper_comparison": judge(result["summary"])}, stem, results, png=False)  # partial
    result["summary"] = summarise(result["runs"])
    result["paper_comparison"] = judge(result["summary"])
    result["scratch_plateau"] = plateau_figures(results)
    result["total_s"] = round(time.perf_counter() - started, 1)
    try:
        result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]  # machine["loadavg"]: at the start
    except OSError:
        pass
    return result


def plateau_figures(results: Path) -> list[dict[str, Any]]:
    """Long scratch runs measured earlier with --plateau (their curves stay in their own files)."""
    keep = ("pair", "steps", "best", "best_step", "within_1pct_step", "date", "note")
    out = []
    for path in sorted(results.glob("transfer_plateau_lr*.json")):
        data = json.loads(path.read_text())
        out.append({"file": path.name, "lr": data["settings"]["lr"], **{k: data.get(k) for k in keep}})
    return out


def plateau(settings: Settings, pair: str, steps: int, work: Path, echo: Callable[[str], None] = print) -> dict:
    """One long scratch run on the pair's destination: the step where val_loss stops improving (within 1%)."""
    s = Settings(**{**asdict(settings), "steps": steps})
    run = run_row(s, PAIRS[pair], ROWS["scratch"], 0, source_architecture(s, PAIRS[pair].src, work / "sources"),
                  work / "plateau" / pair.replace(">", "-to-"))
    best = min(run["curve"], key=lambda p: p["value"])
    near = next(p for p in run["curve"] if p["value"] <= best["value"] + 0.01 * abs(best["value"]))
    return {"pair": pair, "steps": steps, "best": best["value"], "best_step": best["step"],
            "within_1pct_step": near["step"], "curve": run["curve"], "settings": asdict(s)}


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Results of benchmark processes run side by side (same settings, different pairs) as one."""
    first = parts[0]
    if any(p["settings"] != first["settings"] for p in parts):
        raise SystemExit("error: the results to merge were measured with different settings — merge like with like")
    # A (pair, row, seed) run by two processes counts once (the first; seeded runs log the same steps).
    runs: dict[tuple, dict[str, Any]] = {}
    for r in (r for p in parts for r in p["runs"]):
        runs.setdefault((r["pair"], r["row"], r["seed"]), r)
    skipped = [s for p in parts for s in p["skipped"] if (s["pair"], s["row"], s["seed"]) not in runs]
    merged = {**first, "runs": list(runs.values()), "skipped": skipped,
              "pairs": {k: v for p in parts for k, v in p["pairs"].items()},
              "rows": {k: v for p in parts for k, v in p["rows"].items()},
              "total_s": max(p.get("total_s", 0.0) for p in parts),
              "merged_from": [{"date": p["date"], "pairs": list(p["pairs"]), "total_s": p.get("total_s"),
                               "machine": p["machine"]} for p in parts]}
    merged["sources_s"] = max(p.get("sources_s", 0.0) for p in parts)
    merged["seeds"] = sorted({seed for p in parts for seed in p["seeds"]})
    return merged


def _judge(protocol: str, ablation_pair: str | None) -> Callable[[dict], list]:
    return (lambda summary: paper.verdicts(summary, ablation_pair)) if protocol == "paper" else verdicts


def _print(result: dict[str, Any]) -> None:
    if result.get("protocol") == "paper":
        paper.echo_lines(paper.table_lines(result))
    else:
        print_table(result)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one pair, three rows, 2 seeds, 80 steps (≤ ~5 min)")
    size.add_argument("--full", action="store_true", help="every pair × every row, 3 seeds, 480 steps (≥ 2.5 h)")
    size.add_argument("--plateau", type=int, metavar="STEPS", help="only one long scratch run of STEPS steps")
    ap.add_argument("--protocol", choices=["short", "steps", "paper"], default="short",
                    help="short: fixed short horizon (the profiles above); paper: the paper's protocol in epochs "
                         "(every arm from a stage-1 Q-Former, TFS 10 epochs, Table 3's speed-up per metric); "
                         "steps: the step-level race (scratch to "
                         "its plateau, 10.7%% of the data, one warm-up epoch at 5x, stop at scratch's best)")
    ap.add_argument("--world", help="built world directory (default $VPGTRANS_HOME/world)")
    ap.add_argument("--work", help="run directory; trained sources are cached here (default $VPGTRANS_HOME/"
                                   "bench/transfer_efficiency)")
    ap.add_argument("--seeds", type=int, help="seeds per row: 0 .. N-1 (default 3; --quick 2)")
    ap.add_argument("--seed-list", help="these seeds instead, e.g. 1,2 (to split one benchmark over processes run "
                                        "side by side; merge their JSONs with --rescore A.json B.json)")
    ap.add_argument("--sources-only", action="store_true", help="only train (or find) the source VPGs of the pairs, "
                    "for benchmark processes started side by side to share")
    ap.add_argument("--pairs", help="comma-separated pairs: " + ", ".join(PAIRS))
    ap.add_argument("--rows", help="comma-separated rows for every pair: " + ", ".join(ROWS))
    ap.add_argument("--rescore", metavar="JSON", nargs="+", help="recompute summary, verdicts and plot of a results "
                    "JSON from its stored runs (no training); several JSONs (e.g. one per pair, run side by side) are "
                    "merged into --results/<first file's name>")
    ap.add_argument("--results", default=str(RESULTS), help="where the JSON and PNG go (default %(default)s)")
    ap.add_argument("--budget-min", type=float, help="start no new run after this many minutes (default: 45, "
                    "--quick 5, --full none; 0 = none); skipped runs are listed in the JSON")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting (" + ", ".join(f for f in Settings.__dataclass_fields__ if f != "world")
                    + "; with --diagnose or --protocol paper: " + ", ".join(_diagnose.SETTABLE) + ")")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of this process (default 1, as the "
                    "README's figures: processes run side by side, and two threads each on two cores ran 3x slower)")
    _diagnose.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.protocol == "steps":  # the step-level race was `--protocol paper` before the epoch protocol (issue 29)
        args.protocol = "paper"
    elif args.protocol == "paper":
        args.protocol = "paper-epochs"
    if args.diagnose and (args.full or args.plateau or args.rescore or args.protocol != "short"):
        print("error: --diagnose runs alone (with --quick at most) — drop --full/--plateau/--rescore/--protocol",
              file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    if args.rescore:
        path = Path(args.rescore[0])
        result = json.loads(path.read_text())
        if len(args.rescore) > 1:
            path = Path(args.results) / path.name
            result = merge_results([result] + [json.loads(Path(f).read_text()) for f in args.rescore[1:]])
        result.update(summary=summarise(result["runs"]))
        result.update(paper_comparison=_judge(result.get("protocol", "short"), result.get("ablation_pair"))(
            result["summary"]), scratch_plateau=plateau_figures(path.parent))
        write_outputs(result, path.stem, path.parent)
        _print(result)
        return 0
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.diagnose:
            return _diagnose.main(args, Path(args.results))
        if args.protocol == "paper-epochs":
            return _diagnose.main(args, Path(args.results), protocol=True)
        return _measure(args)
    finally:  # main() is also called in-process (the tests): leave the caller's thread count as it was
        torch.set_num_threads(before)


def _measure(args: argparse.Namespace) -> int:
    """Everything but --rescore: train and time the runs the arguments ask for."""
    from vpgtrans.paths import home, world_dir

    world = Path(args.world or world_dir()).expanduser()
    if not (world / "world.json").exists():
        print(f"error: no built world at {world} — run `vpgtrans world build` or pass --world DIR", file=sys.stderr)
        return 2
    if args.protocol == "paper":
        if args.full:
            print("error: --full is a short-protocol profile — use --protocol steps with --seeds/--pairs/--rows",
                  file=sys.stderr)
            return 2
        profile = "paper-quick" if args.quick else "paper"
        prof = {**paper.PROFILES[profile], "rows": {}}
    else:
        profile = "quick" if args.quick else "full" if args.full else "default"
        prof = PROFILES[profile]
    values: dict[str, Any] = dict(prof["settings"])
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in Settings.__dataclass_fields__ or key == "world":
            print(f"error: unknown setting '{key}' — see --help", file=sys.stderr)
            return 2
        default = getattr(Settings(world=""), key)
        values[key] = (value.lower() in ("1", "true", "yes") if isinstance(default, bool)
                       else type(default or "")(value))
    settings = Settings(world=str(world), **values)
    work = Path(args.work or home() / "bench" / "transfer_efficiency").expanduser()
    if args.plateau:
        pair = (args.pairs or "opt-s>llama").split(",")[0]
        out = plateau(settings, pair, args.plateau, work)
        out.update(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), machine=machine())
        path = Path(args.results) / f"transfer_plateau_lr{settings.lr:g}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
        print(f"scratch on {pair}: best {METRIC} {out['best']:.4f} at step {out['best_step']}; within 1% of it from "
              f"step {out['within_1pct_step']} (of {args.plateau}) → {path}")
        return 0
    pairs = args.pairs.split(",") if args.pairs else prof["pairs"]
    unknown = [p for p in pairs if p not in PAIRS] + [r for r in (args.rows or "").split(",") if r and r not in ROWS]
    if unknown:
        print(f"error: unknown pair/row {', '.join(unknown)} — see --help", file=sys.stderr)
        return 2

    def rows_for(pair: str) -> list[str]:
        if args.rows:
            chosen = args.rows.split(",")
        elif args.protocol == "paper":
            chosen = paper.rows_for(prof, pair, list(ROWS))
        elif isinstance(prof["rows"], dict):
            chosen = prof["rows"].get(pair, prof.get("other_rows", ["scratch", "vpgtrans"]))
        else:
            chosen = prof["rows"]
        return ["scratch"] + [r for r in chosen if r != "scratch"]

    try:
        seeds = ([int(x) for x in args.seed_list.split(",") if x.strip()] if args.seed_list
                 else list(range(args.seeds or prof["seeds"])))
    except ValueError:
        print(f"error: --seed-list {args.seed_list} is not a list of integers — e.g. --seed-list 1,2", file=sys.stderr)
        return 2
    if args.sources_only:
        for src in dict.fromkeys(PAIRS[p].src for p in pairs):
            train_source(settings, src, work / "sources")
        return 0
    budget = args.budget_min if args.budget_min is not None else prof["budget_min"]
    stem = {"quick": "transfer_efficiency_quick", "paper": "transfer_efficiency_paper",
            "paper-quick": "transfer_efficiency_paper_quick"}.get(profile, "transfer_efficiency")
    n = sum(len(rows_for(p)) for p in pairs) * len(seeds)
    print(f"transfer efficiency ({profile}): {len(pairs)} pairs, {n} runs, seeds {seeds}, world {world}, work {work}")
    ablation = prof.get("ablation_pair")
    result = run_benchmark(profile, settings, pairs, rows_for, seeds, work,
                           budget_s=budget * 60 if budget else None, stem=stem,
                           results=Path(args.results), judge=_judge(args.protocol, ablation))
    result.update(protocol=args.protocol, ablation_pair=ablation)
    json_path, png = write_outputs(result, stem, Path(args.results))
    _print(result)
    print(f"\n{len(result['runs'])} runs in {result['total_s']:.0f}s ({len(result['skipped'])} skipped) → {json_path}"
          + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
