"""How much of the world's Table-3 speed-up is the inherited VPG, and how much VPGTrans's recipe?

The control arm runs VPGTrans's recipe exactly — converter-merged projector, one warm-up epoch of the projector
alone at the recipe's LR multiplier, then fine-tuning with the transfer recipe's schedule — from a "source" whose
VPG is the world's stage-1 Q-Former itself (it never met an LLM; its projector is fresh). TFS, VPGTrans and the
control are scored the way `transfer_efficiency.py --protocol paper` scores them (same cache: pass the same
--work and the same settings to reuse its TFS and VPGTrans runs). Where the control gives the same speed-up as
VPGTrans, the ratio measures the recipe (a projector trained first at a high LR against TFS's LR warm-up), not
the transfer.

    python benchmarks/recipe_control.py --quick --pairs 'opt-s>opt-m' --seed-list 0,1,2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _diagnose as dg  # noqa: E402


def table3(tfs_curve: list[dict[str, Any]], curve: list[dict[str, Any]]) -> dict[str, Any]:
    """Table 3's speed-ups on captions and val_loss, and the warm-up epoch's share of TFS's best CIDEr."""
    from vpgtrans.transfer.epochs import table3_speedups

    sp = table3_speedups(tfs_curve, curve, ["cider", "val_loss"])
    return {"cider": sp["cider"]["speedup_epochs"], "val_loss": sp["val_loss"]["speedup_epochs"],
            "warmup_share": round(curve[0]["cider"] / sp["cider"]["tfs_best"], 3),
            "best_cider": round(max(p["cider"] for p in curve), 3)}


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"  # "-": never reached (Table 3's dash)


def run(s: dg.DiagSettings, pairs: list[tuple[str, str]], seeds: list[int], work: Path) -> dict[str, Any]:
    """TFS, VPGTrans and the control for every pair and seed (cached runs reused)."""
    from dataclasses import replace

    started = time.perf_counter()
    stage1 = dg.stage1_qformer(s, work)["path"]
    rows = []
    dg._register_vqa(s)
    first = replace(s, seed=seeds[0])
    for src, dst in pairs:
        # One source per LLM, trained with the first seed, as --protocol paper does; the control's likewise.
        source = dg.tfs(first, src, stage1, work)["model"]
        control_source = dg.stage1_source(first, src, stage1, work)
        for seed in seeds:
            ss = replace(s, seed=seed)
            tfs = dg.tfs(ss, dst, stage1, work)
            ours = dg.vpgtrans(ss, src, dst, source, 1.0, work, "vpgtrans")
            ctrl = dg.vpgtrans(ss, src, dst, control_source, 1.0, work, dg.CONTROL_ARM)
            v, c = table3(tfs["curve"], ours["curve"]), table3(tfs["curve"], ctrl["curve"])
            row = {"pair": f"{src}>{dst}", "seed": seed, "tfs_best_cider": round(max(p["cider"] for p in tfs["curve"]), 3),
                   "vpgtrans": v, "control": c, "control_curve": ctrl["curve"]}
            rows.append(row)
            print(f"{row['pair']} seed {seed}: TFS best CIDEr {row['tfs_best_cider']} | VPGTrans captions "
                  f"{_ratio(v['cider'])} val_loss {_ratio(v['val_loss'])} warm-up {v['warmup_share']:.0%} | control "
                  f"captions {_ratio(c['cider'])} val_loss {_ratio(c['val_loss'])} warm-up {c['warmup_share']:.0%}",
                  flush=True)
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "settings": vars(s) | {"llms": list(s.llms)},
            "stage1": stage1, "rows": rows, "total_s": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    """Command line: the pairs and seeds to run, the world, where runs are cached and the JSON goes."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", default=None, help="world dir (default: the built world)")
    ap.add_argument("--quick", action="store_true", help="quarter-data epochs, as transfer_efficiency.py --quick")
    ap.add_argument("--pairs", default="opt-s>opt-m", help="comma-separated SRC>DST world LLM names")
    ap.add_argument("--seed-list", default="0,1,2", help="seeds")
    ap.add_argument("--work", default=None, help="run cache (share transfer_efficiency.py's to reuse its runs)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting of transfer_efficiency.py --diagnose (e.g. eval_images=64)")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "recipe_control.json"))
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # as the benchmark's workers: its cached runs were measured with one thread
    from vpgtrans.paths import home, world_dir

    world = a.world or str(world_dir())
    if not (Path(world) / "world.json").exists():
        print(f"error: no built world at {world} — run `vpgtrans world build` or pass --world DIR", file=sys.stderr)
        return 2
    try:
        s = dg.settings_from(world, a.quick, **dg.parse_sets(a.set))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    work = Path(a.work or home() / "bench" / "transfer_efficiency")
    pairs = [tuple(p.split(">")) for p in a.pairs.split(",")]
    result = run(s, pairs, [int(x) for x in a.seed_list.split(",")], work)
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(json.dumps(result, indent=1, default=str))
    print(f"recipe control: {result['total_s']}s → {a.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
