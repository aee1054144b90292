"""The streamed data path at scale: loader throughput with the official train transform, memory as samples grow,
and how many loader workers keep a GPU fed.

    python benchmarks/data_path.py            # 1M synthetic images (100k and 1M sets, ~3 GB of shards)
    python benchmarks/data_path.py --quick    # 10k and 100k

What it does:

1. builds webdataset shards of tiny synthetic JPEGs (32×32, a random colour and rectangle, a caption) — one set
   per size, under --dir (kept between runs; rebuilt when absent);
2. opens each set as a stream (`load_records`: counts every shard from its tar headers) and reads one whole
   epoch of raw samples through the stream's shuffle buffer, in a fresh process, recording its peak RSS — the
   RSS must stay flat as the set grows 10×; for contrast, the indexed reader (`read_webdataset`, the path a
   run takes with the feature cache on) on the smaller set;
3. measures one loader worker's images/s with the train transform (decode, random resized crop to 224 bicubic,
   flip, the BLIP-2 ViT's normalisation: the real `HFVisionEncoder.preprocess`) on the tiny JPEGs and on
   384×384 photos-sized JPEGs (`--photo-size`), one torch thread, in this process;
4. sets that beside the samples/s `benchmarks/cuda_check.py` measured on an H200 at batch 96
   (`results/cuda_check_b96.json`: OPT-2.7B / LLaMA-7B shapes, features precomputed) and says how many workers
   it takes to feed each.

The machine's load average is recorded before and after: this project's CPU is shared, so throughput here is a
lower bound of an idle core's.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine_info, peak_rss_mb, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COLOURS = ("red", "green", "blue", "yellow", "white", "black", "purple", "orange")


def _jpeg(rng: random.Random, size: int) -> tuple[bytes, str]:
    from PIL import Image, ImageDraw

    colour, other = rng.sample(range(len(COLOURS)), 2)
    palette = [(220, 30, 30), (30, 200, 60), (40, 60, 220), (230, 220, 40), (250, 250, 250), (10, 10, 10),
               (140, 40, 160), (250, 140, 20)]
    image = Image.new("RGB", (size, size), palette[colour])
    a, b = sorted(rng.sample(range(size), 2)), sorted(rng.sample(range(size), 2))
    ImageDraw.Draw(image).rectangle((a[0], b[0], a[1], b[1]), fill=palette[other])
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return buf.getvalue(), f"a {COLOURS[other]} rectangle on a {COLOURS[colour]} background"


def build_shards(folder: Path, samples: int, shard_size: int, image_size: int, seed: int = 0) -> dict:
    """`samples` synthetic JPEG + caption pairs in shards of `shard_size`; reused when already complete."""
    done = folder / "complete.json"
    if done.exists():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    start = time.perf_counter()
    for s in range(math.ceil(samples / shard_size)):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for k in range(s * shard_size, min(samples, (s + 1) * shard_size)):
                image, caption = _jpeg(rng, image_size)
                for ext, data in (("jpg", image), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{k:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    info = {"samples": samples, "shards": math.ceil(samples / shard_size), "image_size": image_size,
            "bytes": sum(p.stat().st_size for p in folder.glob("*.tar")),
            "build_s": round(time.perf_counter() - start, 1)}
    done.write_text(json.dumps(info))
    return info


# --- a fresh process per memory measurement -------------------------------------------------------------------
def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM), so the peak measured is the work's, not the imports'."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _child_stream(folder: str, buffer: int) -> dict:
    """Open the set as a stream and read one epoch of raw samples (no decoding): peak RSS and timings."""
    from vpgtrans.data import DataConfig, load_records
    from vpgtrans.data.streaming import Layout, StreamDataset
    from vpgtrans.model import Template

    import webdataset  # noqa: F401 - imported before the baseline, as a training process has it

    import tempfile

    before, reset = _status_mb("VmRSS"), _reset_peak()
    start = time.perf_counter()
    config = DataConfig(train=folder, feature_cache=False, shuffle_buffer=buffer, cache_dir=tempfile.mkdtemp())
    spec = load_records(config)  # counts every shard from its headers (a fresh count cache)
    count_s = time.perf_counter() - start
    start = time.perf_counter()
    spec = load_records(config)  # the counts remembered: what every later run pays
    recount_s = time.perf_counter() - start
    dataset = StreamDataset(spec, Template(), config, vision=None)
    dataset.configure(Layout(batch_size=96))
    n = dataset.per_slot_epoch()
    start = time.perf_counter()
    seen = 0
    for _, _item in dataset._mixed(0, 0):
        seen += 1
        if seen == n:
            break
    return {"samples_in_set": len(spec), "epoch_samples_read": seen, "count_shards_s": round(count_s, 2),
            "counts_remembered_s": round(recount_s, 3),
            "read_epoch_s": round(time.perf_counter() - start, 1),
            "raw_samples_per_s": round(seen / (time.perf_counter() - start)),
            "rss_before_mb": before, "peak_rss_mb": _status_mb("VmHWM") if reset else peak_rss_mb(),
            "peak_is_of_the_work": reset}


def _child_indexed(folder: str) -> dict:
    """The indexed reader (every member of every shard listed into records): its peak RSS."""
    from vpgtrans.data import read_webdataset

    before, reset = _status_mb("VmRSS"), _reset_peak()
    start = time.perf_counter()
    records = read_webdataset(folder)
    return {"records": len(records), "index_s": round(time.perf_counter() - start, 1), "rss_before_mb": before,
            "peak_rss_mb": _status_mb("VmHWM") if reset else peak_rss_mb(), "peak_is_of_the_work": reset}


def _in_child(kind: str, folder: Path, buffer: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = (f"import json, sys; sys.path[:0] = {[str(Path(__file__).resolve().parent)]!r}; import data_path as d; "
            f"print(json.dumps(d._child_{kind}({str(folder)!r}{', ' + str(buffer) if kind == 'stream' else ''})))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=7200)
    if proc.returncode:
        raise SystemExit(f"error: the {kind} measurement failed: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- loader throughput -----------------------------------------------------------------------------------------
class _Preprocess:
    """The BLIP-2 ViT's preprocessing without its weights: `HFVisionEncoder.preprocess` on EVA ViT-g's settings."""

    input_hw, crop = (224, 224), None
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # BLIP-2's

    def __init__(self) -> None:
        import torch

        self.model = type("Model", (), {"dtype": torch.float32})()

    def preprocess(self, images):  # noqa: D102 - the adapter's own method
        from vpgtrans_adapters.vision import HFVisionEncoder

        return HFVisionEncoder.preprocess(self, images)


def loader_rate(folder: Path, samples: int, augment: bool = True) -> dict:
    """One worker's examples/s (decode + transform + preprocess + text) over `samples` streamed samples."""
    import torch

    from vpgtrans.data import DataConfig, build_dataset, load_records
    from vpgtrans.data.streaming import Layout
    from vpgtrans.model import Template

    torch.set_num_threads(1)
    config = DataConfig(train=str(folder), feature_cache=False, augment=augment, shuffle_buffer=1000)
    model = type("M", (), {"vision": _Preprocess(), "template": Template(),
                           "llm": type("L", (), {"is_encoder_decoder": False})()})()
    dataset, _ = build_dataset(load_records(config), model, config, seed=0)
    dataset.configure(Layout(batch_size=96))
    dataset.train_mode(augment)
    it = iter(dataset)
    for _ in range(200):  # warm-up: the shuffle buffer's first fill and the first shard's opening
        next(it)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(samples):
        pixels, _, _ = next(it)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert tuple(pixels.shape) == (3, 224, 224)
    return {"samples": samples, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "images_per_s_wall": round(samples / wall, 1), "images_per_s_cpu": round(samples / cpu, 1)}


def gpu_rates() -> dict:
    """samples/s of the H200 training steps in results/cuda_check_b96.json (features precomputed)."""
    data = json.loads((RESULTS / "cuda_check_b96.json").read_text())
    return {name.split("[")[1].rstrip("]"): {"samples_per_s": check["samples_per_s"],
                                             "step_s": check["step_s_median"], "batch": check["batch"]}
            for name, check in data["checks"].items() if name.startswith("train[")}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; write JSON; print a table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10k and 100k images instead of 100k and 1M")
    ap.add_argument("--dir", default=os.environ.get("VPGTRANS_BENCH_DIR", "/tmp/vpgtrans-data-path"),
                    help="where the synthetic shards go (kept for later runs)")
    ap.add_argument("--shard-size", type=int, default=10_000, help="samples per shard (img2dataset's default)")
    ap.add_argument("--image-size", type=int, default=32, help="side of the synthetic JPEGs")
    ap.add_argument("--photo-size", type=int, default=384, help="side of the photo-sized JPEGs (0: skip them)")
    ap.add_argument("--rate-samples", type=int, default=3000, help="samples timed per throughput measurement")
    ap.add_argument("--buffer", type=int, default=1000, help="data.shuffle_buffer")
    ap.add_argument("--sizes", default=None, help="the two set sizes, e.g. 2000,20000 (overrides --quick)")
    ap.add_argument("--out", default=None, help="JSON path (default results/data_path[_quick].json)")
    args = ap.parse_args(argv)
    sizes = (10_000, 100_000) if args.quick else (100_000, 1_000_000)
    if args.sizes:
        sizes = tuple(int(v) for v in args.sizes.split(","))
    result: dict = {"benchmark": "data_path", "command": sys.argv, "machine": machine_info(), "sizes": list(sizes)}
    root = Path(args.dir)
    sets = {}
    for n in sizes:
        folder = root / f"tiny{args.image_size}-{n}"
        print(f"shards: {n:,} images of {args.image_size}x{args.image_size} under {folder}", flush=True)
        sets[n] = (folder, build_shards(folder, n, args.shard_size, args.image_size))
    result["shards"] = {str(n): info for n, (_, info) in sets.items()}
    result["memory"] = {}
    for n, (folder, _) in sets.items():
        print(f"stream: one epoch of {n:,} in a fresh process", flush=True)
        result["memory"][f"stream_{n}"] = _in_child("stream", folder, args.buffer)
    small = sets[sizes[0]][0]
    # The indexed reader on both sets where that is quick (it lists every member: minutes at a million).
    for n in [m for m in sizes if m <= 100_000 or m == sizes[0]]:
        print(f"indexed reader on {n:,} (the cache's path)", flush=True)
        result["memory"][f"indexed_{n}"] = _in_child("indexed", sets[n][0], 0)
    rates = {"tiny_train_transform": loader_rate(small, args.rate_samples),
             "tiny_resize_only": loader_rate(small, args.rate_samples, augment=False)}
    if args.photo_size:
        photos = root / f"photo{args.photo_size}-2000"
        build_shards(photos, 2000, 1000, args.photo_size)
        rates["photo_train_transform"] = loader_rate(photos, min(args.rate_samples, 1500))
    result["loader_one_worker"] = rates
    result["gpu"] = gpu_rates()
    feed = {}
    for name, gpu in result["gpu"].items():
        feed[name] = {kind: {"workers_needed": math.ceil(gpu["samples_per_s"] / r["images_per_s_cpu"]),
                             "steps_per_s_one_worker": round(r["images_per_s_cpu"] / gpu["batch"], 2)}
                      for kind, r in rates.items() if kind != "tiny_resize_only"}
    result["feed"] = feed
    result["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    out = args.out or RESULTS / ("data_path_quick.json" if args.quick else "data_path.json")
    write_json(out, result)
    for line in report(result):
        print(line)
    print(f"wrote {out}")
    return result


def report(result: dict) -> list[str]:
    """The benchmark's table as console lines."""
    lines = ["memory: peak RSS of one epoch read through the stream (fresh process each)"]
    for key, m in result["memory"].items():
        if key.startswith("stream"):
            lines.append(f"  {m['samples_in_set']:>9,} samples: peak {m['peak_rss_mb']:.0f} MiB (after imports "
                         f"{m['rss_before_mb']:.0f}), counted in {m['count_shards_s']} s (later runs "
                         f"{m['counts_remembered_s']} s), epoch read in "
                         f"{m['read_epoch_s']} s ({m['raw_samples_per_s']:,} raw samples/s)")
        else:
            lines.append(f"  indexed reader, {m['records']:,} records: peak {m['peak_rss_mb']:.0f} MiB (after "
                         f"imports {m['rss_before_mb']:.0f}), {m['index_s']} s")
    lines.append("loader, one worker, one thread: images/s (CPU time; wall under the machine's load in brackets)")
    for kind, r in result["loader_one_worker"].items():
        lines.append(f"  {kind:<24}{r['images_per_s_cpu']:>8.1f}  ({r['images_per_s_wall']:.1f})")
    lines.append("workers to feed an H200 at batch 96 (cuda_check_b96.json, features precomputed)")
    for name, per in result["feed"].items():
        gpu = result["gpu"][name]
        lines.append(f"  {name} ({gpu['samples_per_s']} samples/s): "
                     + ", ".join(f"{k} {v['workers_needed']}" for k, v in per.items()))
    return lines


if __name__ == "__main__":
    main()
