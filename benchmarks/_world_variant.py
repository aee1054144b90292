"""Train one extra world LM beside a built world, for the regime experiments (docs/results/world-regime.md).

    python benchmarks/_world_variant.py --world W --out V --name opt-s7 --like opt-s --init-seed 7 [--steps-mult 3]
    python benchmarks/_world_variant.py --world W --out V --name opt-l --like opt-m --init-seed 2 --hidden 256 \
        --layers 4 --heads 8 --ffn 1024 --embed-proj 256 --lr-share 0.5          # a much larger OPT

(--embed-proj 256 = the hidden size: no project_in, as the real OPT-1.3B / 2.7B; --like opt-m alone would copy
OPT-350m's project_in. docs/results/world-regime.md, experiment 15, measures both.)

V gets links to W's data/ and vit/ and a new LM directory NAME: the architecture of W's `--like` LM (or the sizes
given), W's tokenizer, the same pretraining text as the build, another init and batch-order seed, `--steps-mult` x
the build's steps. It trains through the build's own `_train_lm`, so a twin differs from the original only by what
is asked.
Run it again with another --name to add more LMs to V; `benchmarks/_regime_probe.py --world V` then reads them all.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Train the LM and write V/NAME plus V/NAME.json (its context check and settings)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, required=True, help="a built world (its data, ViT and tokenizers)")
    ap.add_argument("--out", type=Path, required=True, help="the variant world directory (created or extended)")
    ap.add_argument("--name", required=True, help="directory name of the new LM in --out")
    ap.add_argument("--like", default="opt-s", help="which world LM's architecture to copy (opt-s, opt-m, llama, "
                                                    "flant5)")
    ap.add_argument("--init-seed", type=int, required=True, help="init and batch-order seed (the build: "
                                                                  "seed x 1000 + the LM's index)")
    ap.add_argument("--steps-mult", type=float, default=1.0, help="x the build's pretraining steps for this LM")
    for key in ("hidden", "layers", "heads", "ffn", "embed_proj"):
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"{key} instead of --like's (a larger LM)")
    ap.add_argument("--lr-share", type=float, help="x the world's LM learning rate instead of --like's")
    a = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from vpgtrans.world.build import _train_lm
    from vpgtrans.world.config import WorldConfig
    from vpgtrans.world.lms import lm_specs

    manifest = json.loads((a.world / "world.json").read_text())
    cfg = WorldConfig(**manifest["config"]) if isinstance(manifest.get("config"), dict) else WorldConfig()
    seed = int(manifest.get("seed", 0))
    specs = {s.name: s for s in lm_specs(cfg)}
    if a.like not in specs:
        print(f"error: --like {a.like} is not a world LM — use one of {', '.join(specs)}", file=sys.stderr)
        return 2
    changes = {k: getattr(a, k) for k in ("hidden", "layers", "heads", "ffn", "embed_proj", "lr_share")
               if getattr(a, k) is not None}
    spec = replace(specs[a.like], name=a.name, **changes)
    a.out.mkdir(parents=True, exist_ok=True)
    for d in ("data", "vit", "qformer-stage1"):  # the stage-1 Q-Former every arm starts from, when built
        if (a.world / d).exists() and not (a.out / d).exists():
            (a.out / d).symlink_to((a.world / d).resolve())
    AutoTokenizer.from_pretrained(a.world / a.like).save_pretrained(a.out / a.name)
    # The build's own LM training (same text, schedule and checks), with this spec, seed and step multiple.
    res = _train_lm(str(a.out), cfg, seed, list(specs).index(a.like), lambda line: print(line, flush=True),
                    spec=spec, init_seed=a.init_seed, steps_mult=a.steps_mult)
    check = res["check"]
    info = {"like": a.like, "spec": asdict(spec), "init_seed": a.init_seed, "steps_mult": a.steps_mult,
            "check": check, "seconds": res["seconds"]}
    (a.out / f"{a.name}.json").write_text(json.dumps(info, indent=1) + "\n")
    if not (a.out / "world.json").exists():  # the probe keys its feature cache on this file
        (a.out / "world.json").write_text(json.dumps({"variant_of": str(a.world.resolve())}) + "\n")
    print(f"{a.name}: caption loss with true / shuffled / no context {check['true_context']:.3f} / "
          f"{check['shuffled_context']:.3f} / {check['no_context']:.3f} ({info['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
