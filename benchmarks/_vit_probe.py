"""Does a world's frozen ViT carry what a VPG must read? The build's own ViT pretraining and held-out probe, alone.

    python benchmarks/_vit_probe.py --set num_shapes=16 --set num_colors=16 --set concept_tail=1 --set vit_steps=1600

Draws the world's train and val images (into a temporary directory), pretrains the ViT exactly as
`vpgtrans world build` does (one thread) and prints one JSON line: the held-out accuracy of the pretraining heads
(per patch and per object: colour, shape, size; per image: colour set, shape set, count) and the seconds it took.
Used to choose a world's ViT budget by what the ViT sees, never by a transfer figure (docs/results/world-regime.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Pretrain and probe one ViT; print its JSON line (and write it to --out when given)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a world knob, as for `vpgtrans world build --set` (repeatable)")
    ap.add_argument("--seed", type=int, default=0, help="world seed (the build's default 0)")
    ap.add_argument("--out", type=Path, help="also write the JSON line here")
    a = ap.parse_args(argv)

    import torch

    from vpgtrans.cli.world import _config
    from vpgtrans.world.build import _build_vit, _write_data

    torch.set_num_threads(1)  # as in the build: one thread per part
    cfg = _config("full", tuple(a.overrides))
    with tempfile.TemporaryDirectory() as tmp:
        arrays = _write_data(Path(tmp) / "data", cfg, a.seed, lambda _: None)
        t = time.time()
        probe = _build_vit(Path(tmp) / "vit", cfg, a.seed, arrays, lambda _: None)
    line = json.dumps({"overrides": a.overrides, "seed": a.seed, "vit_steps": cfg.vit_steps, "probe": probe,
                       "seconds": round(time.time() - t, 1)})
    print(line)
    if a.out:
        a.out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
