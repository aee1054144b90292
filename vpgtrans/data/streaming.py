"""Streamed training data: webdataset shards read in order through a shuffle buffer, resumable to the sample.

Why webdataset: its shards are the de-facto format of image-text corpora (img2dataset writes them, LAION-COCO
ships in them) and its tar reader (`webdataset.tariterators`; it needs only braceexpand, numpy and PyYAML)
streams a shard and groups its members into samples by key exactly as the corpora's tools do; vpgtrans adds
what it lacks, exact resume and an epoch in which no sample repeats under several processes. Shards are local
files: each is counted from its tar headers when the run starts (data is skipped by seeking, not read). Only
what a stream needs is held in memory: the shard names, one count per shard, and per source and loader worker
a buffer of `data.shuffle_buffer` raw samples.

How one pass ("epoch") over a source is laid out, all of it a function of (seed, source, pass):

- its shards are shuffled and dealt to the slots (rank × loader worker), each shard to the slot holding the
  fewest samples so far; a slot reads only its own shards, sequentially;
- every slot emits the same number of samples per pass (`quota`: the smallest slot's total, taken over the
  64 deals that passes cycle through, rounded down to a whole batch for a single source), so all ranks take
  the same number of steps, and the samples left over in a pass are simply not read;
- a slot's samples go through a buffer: fill to `shuffle_buffer`, emit a random one, refill. The buffer's
  draws do not depend on the samples' content, so it is simulated on sample numbers alone: resuming at
  emitted sample k replays k draws on integers, reopens the shard holding the oldest sample still buffered
  (whole shards before it are skipped by their counts) and keeps only the buffered ones until it catches up.

Several sources mix per sample: a seeded draw by weight picks the source of each next sample (the official
VL-LLaMA mixture: COCO caption 0.1, VG 0.2, LAION-COCO 0.7); each source runs through its own passes. A
source may also be an annotation file (COCO / JSONL / cc_sbu_align): its records are indexed as usual and a
pass deals a seeded permutation of them to the slots.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset

from ..errors import ConfigError, DataError
from .readers import IMAGE_EXTS, BadSamples, ImageReader, expand_braces, parse_json

DEALS = 64  # passes cycle through this many shard deals, so every pass's quota is known before training
MIX_BLOCK = 4096  # source draws are made in seeded blocks: resuming at sample k costs k / MIX_BLOCK seedings
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: members it never groups into samples
SOURCE_KEYS = ("train", "weight", "format", "image_root", "name")


# --- configuration ------------------------------------------------------------------------------------
def check_sources(sources: Any) -> list[dict[str, Any]]:
    """`data.sources` validated: a list of {train, weight[, format, image_root, name]}; weights positive."""
    if sources in (None, [], ()):
        return []
    if not isinstance(sources, (list, tuple)):
        raise ConfigError(f"data.sources must be a list, got {type(sources).__name__}",
                          "e.g. data.sources=[{train: coco/{000..009}.tar, weight: 0.1}, {train: laion/, weight: 0.7}]")
    out = []
    for i, src in enumerate(sources):
        if not isinstance(src, dict) or not isinstance(src.get("train"), str) or not src["train"]:
            raise ConfigError(f"data.sources[{i}] needs a 'train' path, got {src!r}",
                              "each source is {train: PATH, weight: NUMBER}")
        unknown = sorted(set(src) - set(SOURCE_KEYS))
        if unknown:
            raise ConfigError(f"data.sources[{i}]: unknown key '{unknown[0]}'", f"use {', '.join(SOURCE_KEYS)}")
        weight = src.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (0 < weight < math.inf):
            raise ConfigError(f"data.sources[{i}].weight must be a positive number, got {weight!r}",
                              "e.g. weight: 0.7 (weights are normalised to sum to 1)")
        name = str(src.get("name") or Path(src["train"].rstrip("/")).name or f"source{i}")
        out.append({**src, "weight": float(weight), "name": name, "format": src.get("format", "auto")})
    names = [s["name"] for s in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.sources names repeat: {names}", "give each source a distinct 'name'")
    return out


def streams(config: Any) -> bool:
    """True when the training split of `config` is read as a stream (see `DataConfig.stream`)."""
    if config.sources:
        return True
    if config.stream == "false":
        return False
    from .readers import detect_format

    fmt = config.format if config.format != "auto" else (detect_format(config.train) if config.train else "")
    if config.stream == "true":
        if fmt != "webdataset":
            raise ConfigError(f"data.stream=true streams webdataset shards, but data.train is {fmt or 'not set'}",
                              "point data.train at .tar shards, or set data.stream=auto")
        return True
    return fmt == "webdataset" and not config.feature_cache


# --- sources --------------------------------------------------------------------------------------------
def tariterators() -> Any:
    """webdataset's tar reader, or a one-line error saying how to install it."""
    try:
        from webdataset import tariterators as module
    except ImportError:
        raise ConfigError("streaming webdataset shards needs the webdataset package",
                          "pip install 'vpgtrans[stream]', or set data.stream=false to index the shards instead "
                          "(data.sources always streams)") from None
    return module


def _unit(text: str) -> float:
    """A uniform number in [0, 1) from text: the per-key draw of data.fraction, the same in every process."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2 ** 64


def shard_paths(spec: str) -> list[str]:
    """A directory's .tar files, a brace pattern expanded, or one .tar; refuses a missing one by name."""
    path = Path(str(spec)).expanduser()
    shards = sorted(str(p) for p in path.glob("*.tar")) if path.is_dir() else expand_braces(str(path))
    missing = [p for p in shards if not Path(p).is_file()]
    if not shards or missing:
        raise DataError(f"no webdataset shard at {missing[0] if missing else spec}",
                        "pass a .tar file, a directory of .tar files or a pattern like data/{00000..00009}.tar")
    return [str(Path(p).resolve()) for p in shards]


def _image_ext(sample: dict[str, Any]) -> str | None:
    return next((e for e in IMAGE_EXTS if e in sample), None)


class Keep:
    """Which samples of a shard count: those with an image, within the data.fraction draw by key."""

    def __init__(self, fraction: float = 1.0, seed: int = 0):
        self.fraction, self.seed = float(fraction), seed

    def __call__(self, sample: dict[str, Any]) -> bool:
        """True when the sample is one of the source's."""
        if _image_ext(sample) is None:
            return False
        return self.fraction >= 1.0 or _unit(f"fraction:{self.seed}:{sample['__key__']}") < self.fraction


def count_shard(path: str, keep: Keep) -> int:
    """Samples of one shard, reading tar headers only (member data is skipped by seeking, never read)."""
    group_by_keys = tariterators().group_by_keys

    def names(tar: tarfile.TarFile) -> Iterator[dict[str, Any]]:
        for member in tar:
            name = member.name
            tar.members = []  # tarfile keeps every header it saw; a shard's index is not needed
            if not member.isreg() or _META.match(name) or ("/" not in name and name.startswith("__")
                                                           and name.endswith("__")):
                continue
            yield {"fname": name, "data": b"", "__url__": path}
        yield {}  # end of shard, as webdataset's expander marks it

    try:
        with tarfile.open(path) as tar:
            return sum(1 for s in group_by_keys(names(tar)) if keep(s))
    except (tarfile.TarError, ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable webdataset shard ({exc})", "re-create the shard") from None


def counted_shard(path: str, keep: Keep, root: str | Path | None = None) -> int:
    """`count_shard`, remembered under `<cache root>/shard-counts` by the shard's path, size and mtime.

    Counting reads every tar header (~4,000 samples/s on a busy 2-core machine: minutes for millions), so a
    run counts each shard once; a shard rewritten since is counted again.
    """
    import os

    from .cache import default_cache_root

    st = os.stat(path)
    key = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}|{keep.fraction}|{keep.seed}".encode()).hexdigest()
    memo = Path(root).expanduser() if root else default_cache_root()
    memo = memo / "shard-counts" / key[:2] / key
    try:
        return int(memo.read_text())
    except (OSError, ValueError):
        pass
    n = count_shard(path, keep)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{key}.{os.getpid()}.tmp")
        tmp.write_text(str(n))
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache only costs the counting again next time
    return n


@dataclass
class ShardSource:
    """One webdataset source: its shards, the samples each holds, and its mixture weight."""

    name: str
    shards: list[str]
    counts: list[int]
    weight: float = 1.0
    keep: Keep | None = None

    @property
    def size(self) -> int:
        """Samples in the source."""
        return sum(self.counts)

    def deal(self, pass_no: int, seed: int, slots: int) -> list[list[int]]:
        """Shard indices of each slot in this pass: a seeded shuffle, each shard to the lightest slot."""
        import heapq

        order = list(range(len(self.shards)))
        random.Random(f"{seed}:{self.name}:deal:{pass_no % DEALS}").shuffle(order)
        dealt: list[list[int]] = [[] for _ in range(slots)]
        lightest = [(0, k) for k in range(slots)]  # (samples so far, slot): ties go to the lower slot
        for i in order:
            load, k = heapq.heappop(lightest)
            dealt[k].append(i)
            heapq.heappush(lightest, (load + self.counts[i], k))
        return dealt

    def quota(self, seed: int, slots: int) -> int:
        """Samples every slot can emit in any pass: the smallest slot's total over the cycle of deals."""
        memo = self.__dict__.setdefault("_quotas", {})
        if (seed, slots) not in memo:
            memo[seed, slots] = min(min(sum(self.counts[i] for i in part) for part in self.deal(p, seed, slots))
                                    for p in range(DEALS))
        return memo[seed, slots]

    def samples(self, shard_ids: Sequence[int], start: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(number, raw sample) of the slot's shards in order, from sample number `start` on."""
        tarfile_samples = tariterators().tarfile_samples
        base = 0
        for i in shard_ids:
            count = self.counts[i]
            if base + count <= start:  # a whole shard before the resume point: not even opened
                base += count
                continue
            n = base
            try:
                for sample in tarfile_samples([{"url": self.shards[i]}]):
                    if not self.keep(sample):
                        continue
                    if n >= start:
                        yield n, sample
                    n += 1
            except (tarfile.TarError, ValueError, OSError) as exc:
                raise DataError(f"{self.shards[i]}: not a readable webdataset shard ({exc})",
                                "re-create the shard") from None
            if n != base + count:
                raise DataError(f"{self.shards[i]} holds {n - base} samples, {count} when the run started",
                                "do not change shards during a run; restart it to count them again")
            base += count


@dataclass
class RecordSource:
    """An annotation file in a mixture: records indexed as usual, dealt per pass as a seeded permutation."""

    name: str
    records: list[dict[str, Any]]
    weight: float = 1.0

    @property
    def size(self) -> int:
        """Records in the source."""
        return len(self.records)

    def quota(self, seed: int, slots: int) -> int:
        """Records every slot emits per pass."""
        return len(self.records) // slots


def open_source(src: dict[str, Any], config: Any, bad: BadSamples | None = None) -> ShardSource | RecordSource:
    """The source named by one `data.sources` entry (or by data.train): shards counted, or records read."""
    from .readers import detect_format, read_records

    fmt = src.get("format", "auto")
    fmt = detect_format(src["train"]) if fmt == "auto" else fmt
    if fmt != "webdataset":
        records = read_records(src["train"], fmt, task=config.task, image_root=src.get("image_root"), bad=bad)
        if config.fraction < 1.0:
            from .dataset import fraction_subset

            records = fraction_subset(records, config.fraction, config.fraction_seed)
        return RecordSource(src["name"], records, src["weight"])
    keep = Keep(config.fraction, config.fraction_seed)
    shards = shard_paths(src["train"])
    counts = [counted_shard(p, keep, config.cache_dir) for p in shards]
    return ShardSource(src["name"], shards, counts, src["weight"], keep)


class StreamSpec:
    """The streamed training split before a model exists: its sources and their sizes (`len` = samples).

    Stands where the indexed split's list of records stands (`load_records`), so the plan can count it;
    slicing reads the first samples' text only (the transfer fits its token pairs on caption text).
    """

    def __init__(self, sources: list[ShardSource | RecordSource], config: Any, bad: BadSamples | None = None):
        self.sources, self.config, self.bad = sources, config, bad
        if not sum(s.size for s in sources):
            raise DataError(f"no samples in {', '.join(s.name for s in sources)}",
                            "every webdataset sample needs an image member (.jpg/.png/...) and a .txt or .json")

    def __len__(self) -> int:
        return sum(s.size for s in self.sources)

    def __getitem__(self, index: slice) -> list[dict[str, Any]]:
        if not isinstance(index, slice) or index.start not in (None, 0) or index.step not in (None, 1):
            raise TypeError("a streamed split can only be sliced from its start: spec[:n]")
        want = len(self) if index.stop is None else index.stop
        out: list[dict[str, Any]] = []
        for src in self.sources:
            if isinstance(src, RecordSource):
                out += src.records[:want - len(out)]
                continue
            for _, sample in src.samples(range(len(src.shards)), 0):
                if len(out) >= want:
                    break
                rec = sample_record(sample, self.config.task)
                if rec is not None:
                    out.append(rec)
        return out[:want]

    def describe(self) -> str:
        """One line: the sources, their sizes and weights."""
        total = sum(s.weight for s in self.sources)
        parts = [f"{s.name} {s.size:,}" + (f" × {s.weight / total:.2f}" if len(self.sources) > 1 else "")
                 + (f" ({len(s.shards)} shard{'s' if len(s.shards) != 1 else ''})" if isinstance(s, ShardSource)
                    else " (indexed)")
                 for s in self.sources]
        return "sources: " + ", ".join(parts)


def load_stream(config: Any, bad: BadSamples | None = None) -> StreamSpec:
    """The training split of `config` as a stream (data.sources, or data.train's shards)."""
    tariterators()
    if config.max_samples:
        raise ConfigError("data.max_samples needs the whole index, and a streamed split keeps none",
                          "use data.fraction (a seeded share of the samples), or data.stream=false")
    entries = config.sources or [{"train": config.train, "weight": 1.0, "format": config.format,
                                  "image_root": config.image_root, "name": Path(str(config.train)).name or "train"}]
    return StreamSpec([open_source(e, config, bad) for e in entries], config, bad)


def sample_record(sample: dict[str, Any], task: str) -> dict[str, Any] | None:
    """A webdataset sample as a record (caption from .txt, fields from .json), or None when its text is bad."""
    from .readers import _record

    key, url = sample["__key__"], sample.get("__url__", "")
    where = f"{Path(str(url)).name}:{key}"
    row: dict[str, Any] = {"key": key}
    try:
        if "json" in sample:
            meta = parse_json(sample["json"].decode("utf-8", "replace"), f"{where}.json",
                              "fix the shard or pass --skip-bad-samples")
            if isinstance(meta, dict):
                row.update(meta)
        if "txt" in sample:
            row["caption"] = sample["txt"].decode("utf-8", "replace").strip()
        return _record(row, f"{key}.{_image_ext(sample)}", where, task)
    except DataError:
        return None


# --- the shuffle buffer, on sample numbers ---------------------------------------------------------------
class OrdinalShuffle:
    """A shuffle buffer over sample numbers 0..n-1: fill to `size`, emit a random one, refill; seeded."""

    def __init__(self, n: int, size: int, rng: random.Random):
        self.n, self.size, self.rng = n, size, rng
        self.buffer: list[int] = []
        self.next_read = 0

    def next(self) -> int:
        """The number of the next sample out of the buffer (samples below `next_read` have been read)."""
        while len(self.buffer) < self.size and self.next_read < self.n:
            self.buffer.append(self.next_read)
            self.next_read += 1
        j = self.rng.randrange(len(self.buffer))
        out, self.buffer[j] = self.buffer[j], self.buffer[-1]
        self.buffer.pop()
        return out


# --- the dataset -----------------------------------------------------------------------------------------
@dataclass
class Layout:
    """Where one loader stream sits: its rank, the loader workers, and the batch its loader makes."""

    batch_size: int = 1
    rank: int = 0
    world_size: int = 1
    workers: int = 0

    @property
    def slots(self) -> int:
        """Independent readers: ranks × loader workers (a worker-less loader reads in the process itself)."""
        return self.world_size * max(1, self.workers)


class StreamDataset(IterableDataset):
    """Streamed (pixels, TextSample, instruction) examples; `configure` then iterate from a micro-batch position.

    `len()` is the samples of one epoch over all slots, so `count_steps` and the trainer count steps as for an
    indexed dataset. Items that cannot be decoded come out as None under `--skip-bad-samples` (and the batch
    is one smaller), so the stream keeps its numbering and a resume stays exact.
    """

    def __init__(self, spec: StreamSpec, template: Any, config: Any, *, vision: Any, is_encoder_decoder: bool = False,
                 seed: int = 0):
        self.spec, self.template, self.config, self.vision = spec, template, config, vision
        self.is_encoder_decoder, self.seed = is_encoder_decoder, seed
        self.skip_bad = bool(spec.bad is not None and spec.bad.skip)
        self.layout = Layout()
        self.quotas: list[int] = []
        self.start = 0
        self.transform: Callable | None = None
        self.collate = drop_bad_collate
        self.configure(Layout())

    # -- layout ---------------------------------------------------------------------------------------
    def configure(self, layout: Layout, start: int = 0) -> None:
        """Set ranks/workers/batch (fixing every source's per-pass quota) and the micro-batch to start at."""
        self.layout, self.start = layout, start
        slots, b = layout.slots, layout.batch_size
        self.quotas = [s.quota(self.seed, slots) for s in self.spec.sources]
        if len(self.quotas) == 1:  # one source: a pass is an epoch, in whole batches
            self.quotas[0] -= self.quotas[0] % b
        if min(self.quotas) < 1 or sum(self.quotas) < b:
            shards = [len(s.shards) for s in self.spec.sources if isinstance(s, ShardSource)]
            raise DataError(f"the stream cannot give each of its {slots} readers (ranks × loader workers) a batch "
                            f"of {b} per pass ({', '.join(f'{s.name} {s.size}' for s in self.spec.sources)} samples"
                            + (f" in {min(shards)} shards" if shards else "") + ")",
                            "use fewer train.num_workers or processes, a smaller batch, or split the data into "
                            "more shards (at least one per reader)")

    def train_mode(self, on: bool) -> None:
        """Training draws the recipe's train transform (data.augment); evaluation never does."""
        from .transforms import train_transform

        self.transform = train_transform(self.vision, self.config) if on else None

    def per_slot_epoch(self) -> int:
        """Samples one slot emits per epoch (a multiple of the batch)."""
        total = sum(self.quotas)
        return total - total % self.layout.batch_size

    def __len__(self) -> int:
        return self.per_slot_epoch() * self.layout.slots

    # -- iteration ----------------------------------------------------------------------------------------
    def _slot(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # A fresh loader asks its worker 0 first; after `start` batches it is worker start % W's turn, so loader
        # worker i plays the part of worker (i + start) % W and the round-robin order carries on unchanged.
        worker = (worker + self.start) % workers
        return self.layout.rank * workers + worker, worker

    def emitted_before(self, worker: int) -> int:
        """Samples this worker had emitted before micro-batch `start` (the loader takes workers in turn)."""
        w = max(1, self.layout.workers)
        batches = (self.start - worker + w - 1) // w if self.start > worker else 0
        return batches * self.layout.batch_size

    def __iter__(self) -> Iterator[Any]:
        slot, worker = self._slot()
        reader = ImageReader()
        for source_index, item in self._mixed(slot, self.emitted_before(worker)):
            yield self._example(self.spec.sources[source_index], item, reader)

    def _choices(self, slot: int, start: int) -> Iterator[int]:
        """The source of each sample from number `start` on: seeded blocks of weighted draws."""
        import numpy as np

        sources = self.spec.sources
        if len(sources) == 1:
            while True:
                yield 0
        p = np.array([s.weight for s in sources], dtype=np.float64)
        p /= p.sum()
        block = start // MIX_BLOCK
        while True:
            rng = np.random.default_rng([self.seed, slot, block, 0x5EED])
            draws = rng.choice(len(sources), size=MIX_BLOCK, p=p)
            for j in range(start - block * MIX_BLOCK if block == start // MIX_BLOCK else 0, MIX_BLOCK):
                yield int(draws[j])
            block += 1

    def _counts_before(self, slot: int, k: int) -> list[int]:
        """Samples taken from each source among the slot's first k."""
        import numpy as np

        counts = [0] * len(self.spec.sources)
        if len(counts) == 1:
            return [k]
        p = np.array([s.weight for s in self.spec.sources], dtype=np.float64)
        p /= p.sum()
        for block in range(0, -(-k // MIX_BLOCK)):
            draws = np.random.default_rng([self.seed, slot, block, 0x5EED]).choice(len(counts), size=MIX_BLOCK, p=p)
            upto = min(MIX_BLOCK, k - block * MIX_BLOCK)
            for s, c in enumerate(np.bincount(draws[:upto], minlength=len(counts))):
                counts[s] += int(c)
        return counts

    def _mixed(self, slot: int, k: int) -> Iterator[tuple[int, Any]]:
        """(source index, raw item) of this slot from its sample number k on, forever."""
        taken = self._counts_before(slot, k)
        subs = [self._source_stream(i, slot, n) for i, n in enumerate(taken)]
        for s in self._choices(slot, k):
            yield s, next(subs[s])

    def _source_stream(self, index: int, slot: int, k: int) -> Iterator[Any]:
        """Raw items of one source for this slot from its k-th on, pass after pass."""
        source, quota = self.spec.sources[index], self.quotas[index]
        pass_no, within = divmod(k, quota)
        while True:
            if isinstance(source, RecordSource):
                yield from self._record_pass(source, pass_no, slot, quota, within)
            else:
                yield from self._shard_pass(source, pass_no, slot, quota, within)
            pass_no, within = pass_no + 1, 0

    def _record_pass(self, source: RecordSource, pass_no: int, slot: int, quota: int,
                     within: int) -> Iterator[Any]:
        gen = torch.Generator().manual_seed(int(_unit(f"{self.seed}:{source.name}:{pass_no}") * 2 ** 62))
        perm = torch.randperm(source.size, generator=gen)[slot::self.layout.slots][:quota].tolist()
        for i in perm[within:]:
            yield ("record", pass_no, i, source.records[i])

    def _shard_pass(self, source: ShardSource, pass_no: int, slot: int, quota: int,
                    within: int) -> Iterator[Any]:
        mine = source.deal(pass_no, self.seed, self.layout.slots)[slot]
        n = sum(source.counts[i] for i in mine)
        shuffle = OrdinalShuffle(n, self.config.shuffle_buffer,
                                 random.Random(f"{self.seed}:{source.name}:{pass_no}:{slot}:shuffle"))
        for _ in range(within):  # replay the draws on numbers only: nothing is read or decoded
            shuffle.next()
        need = set(shuffle.buffer)
        caught_up = shuffle.next_read
        raw = source.samples(mine, min(need) if need else caught_up)
        held: dict[int, dict[str, Any]] = {}
        read = min(need) if need else caught_up
        for _ in range(within, quota):
            number = shuffle.next()
            while read < shuffle.next_read:
                got, sample = next(raw)
                if got >= caught_up or got in need:
                    held[got] = sample
                read = got + 1
            yield ("sample", pass_no, number, held.pop(number))

    def _example(self, source: Any, item: tuple, reader: ImageReader) -> Any:
        from ..images import decode_image
        from .dataset import make_text

        kind, pass_no, number, payload = item
        try:
            if kind == "record":
                rec = payload
                image = reader.decode(rec)
            else:
                rec = sample_record(payload, self.config.task)
                if rec is None:
                    raise DataError(f"{Path(str(payload.get('__url__', ''))).name}:{payload['__key__']}: "
                                    "no caption (.txt) or usable .json", "fix the shard or pass --skip-bad-samples")
                ext = _image_ext(payload)
                image = decode_image(io.BytesIO(payload[ext]), rec["where"], "pass --skip-bad-samples")
        except DataError as exc:
            if self.skip_bad:
                self.spec.bad.add(exc)  # counted where it is read (a loader worker keeps its own count)
                return None
            raise
        rng = random.Random(f"{self.seed}:{source.name}:{pass_no}:{number}")
        sample, instruction = make_text(rec, self.template, self.config, rng, self.is_encoder_decoder)
        if self.transform is not None:
            image = self.transform(image, rng)
        return self.vision.preprocess([image])[0], sample, instruction


def drop_bad_collate(batch: Sequence[Any]) -> dict[str, Any]:
    """Collate streamed examples, leaving out the ones skipped as bad (None)."""
    from .dataset import Collate

    kept = [b for b in batch if b is not None]
    if not kept:
        raise DataError(f"every sample of a batch of {len(batch)} was bad", "check the shards; see the warnings")
    return Collate("pixels")(kept)
