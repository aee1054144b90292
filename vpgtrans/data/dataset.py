"""Training examples: (vision features, TextSample, instruction) built with the model's template."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
from torch.utils.data import Dataset

from ..config import help_field
from ..errors import ConfigError
from ..interfaces import TextSample
from .cache import CacheReport, FeatureCache, FeatureStore, prepare_features
from .readers import FORMATS, BadSamples, ImageReader, read_records
from .streaming import StreamDataset, StreamSpec, load_stream, streams

T = TypeVar("T")


@dataclass
class DataConfig:
    """Where the data is and how examples are made from it."""

    train: str = help_field("", help="training annotations: .jsonl, COCO .json, cc_sbu_align folder, .tar shards "
                                     "(dir or {000..009} pattern); ${world} = the synthetic world's directory")
    val: str | None = help_field(None, help="validation annotations (same format), used for eval metrics")
    format: str = help_field("auto", help=f"one of {', '.join(FORMATS)}")
    image_root: str | None = help_field(None, help="directory image paths are relative to (default: the file's dir)")
    task: str = help_field("caption", help="caption, vqa, or auto (per row: caption if present, else question)")
    prompt: str = help_field("", help="instruction for caption data (fills {instruction} in the template)")
    instructions: list = help_field([], help="instructions to pick from at random per sample (MiniGPT-4)")
    random_caption: bool = help_field(True, help="rows listing several captions ('captions'): draw one per example "
                                                 "and epoch instead of always the first")
    question_template: str = help_field("Question: {question} Answer:", help="instruction made from a VQA question")
    prefix_lm: bool = help_field(True, help="encoder-decoder LLMs: split captions at a random word into encoder "
                                            "prefix and decoder target (BLIP-2 FlanT5)")
    max_samples: int | None = help_field(None, help="use only the first N training records")
    fraction: float = help_field(1.0, help="train on this fraction of the training records, a seeded random "
                                           "subset in file order (VPGTrans used 10.7 percent: 0.107); before max_samples")
    fraction_seed: int = help_field(0, help="seed of the data.fraction subset (same seed, same subset)")
    max_val_samples: int | None = help_field(None, help="use only the first N validation records")
    feature_cache: bool = help_field(True, help="compute frozen vision features once and cache them on disk")
    cache_dir: str | None = help_field(None, help="feature cache root (default $VPGTRANS_HOME/cache)")
    cache_dtype: str = help_field("float32", help="dtype of cached features (float16 halves the disk use)")
    feature_batch_size: int = help_field(32, help="images per vision forward when filling the cache")
    preload_gb: float = help_field(2.0, help="hold cached features in memory when they fit in this many GB")
    augment: bool = help_field(False, help="train on the official BLIP-2 train transform (random resized crop, "
                                           "bicubic, then a horizontal flip); evaluation always resizes only. "
                                           "Needs data.feature_cache=false: cached features are of the plain image")
    flip: bool = help_field(True, help="data.augment: flip half the images left-right; switch off when the text "
                                       "says left and right")
    crop_scale: list = help_field([0.5, 1.0], help="data.augment: the crop's area range, a fraction of the image")
    stream: str | bool = help_field("auto", help="read webdataset shards as a stream (no index in memory): auto (when "
                                          "the feature cache is off, or data.sources is set), true, false")
    shuffle_buffer: int = help_field(1000, help="streaming: samples held per source and loader worker for "
                                                "shuffling (shards are also dealt in a seeded order every pass)")
    sources: list = help_field([], help="streaming mixture: [{train: shards, weight: 0.7}, ...]; each sample "
                                        "comes from a source drawn by weight (data.train is then ignored)")

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"data.format '{self.format}' is unknown", f"use one of: {', '.join(FORMATS)}")
        if self.task not in ("caption", "vqa", "auto"):
            raise ConfigError(f"data.task '{self.task}' is unknown", "use caption, vqa or auto")
        if not 0.0 < float(self.fraction) <= 1.0:
            raise ConfigError(f"data.fraction must be in (0, 1], got {self.fraction}",
                              "e.g. data.fraction=0.107 (10.7% of the training records)")
        if not 0 <= float(self.preload_gb) < float("inf"):
            raise ConfigError(f"data.preload_gb must be a finite number >= 0, got {self.preload_gb}", "e.g. 2")
        if self.cache_dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"data.cache_dtype '{self.cache_dtype}' is unknown", "use float32, float16 or bfloat16")
        self._check_stream_keys()

    def _check_stream_keys(self) -> None:
        """The transform and streaming keys, each in range, in one line naming the key."""
        scale = self.crop_scale
        if not (isinstance(scale, (list, tuple)) and len(scale) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)
                and 0 < float(scale[0]) <= float(scale[1]) <= 1):
            raise ConfigError(f"data.crop_scale must be two numbers 0 < lo <= hi <= 1, got {scale}",
                              "e.g. data.crop_scale=[0.5,1.0] (the official BLIP-2 range)")
        stream = str(self.stream).lower()  # YAML reads `stream: true` as a bool
        if stream not in ("auto", "true", "false"):
            raise ConfigError(f"data.stream '{self.stream}' is unknown", "use auto, true or false")
        self.stream = stream
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}", "e.g. 1000")
        from .streaming import check_sources

        self.sources = check_sources(self.sources)
        if self.sources and self.stream == "false":
            raise ConfigError("data.sources is a streamed mixture but data.stream=false",
                              "set data.stream=auto, or drop data.sources and name one data.train")


def split_caption(caption: str, rng: random.Random) -> tuple[str, str]:
    """(prefix, target) split at a random word boundary; the target keeps at least one word."""
    words = caption.split()
    if len(words) < 2:
        return "", caption
    k = rng.randint(0, len(words) - 1)
    return " ".join(words[:k]), " ".join(words[k:])


def _answer(answer: Any) -> str:
    if isinstance(answer, (list, tuple)):
        # VQA v2 lists ten human answers: train on the most frequent one.
        return str(Counter(map(str, answer)).most_common(1)[0][0]) if answer else ""
    return str(answer)


class Collate:
    """Batch of (tensor, TextSample, instruction) → {key: stacked, samples: [...], instructions: [...]}."""

    def __init__(self, key: str = "features"):
        self.key = key

    def __call__(self, batch: Sequence[tuple[torch.Tensor, TextSample, str]]) -> dict[str, Any]:
        stacked = torch.stack([b[0] for b in batch])
        if self.key == "features":  # cached as float16/bfloat16 maybe; the VPG computes in float32
            stacked = stacked.float()
        return {self.key: stacked, "samples": [b[1] for b in batch],
                "instructions": [b[2] for b in batch]}


class VLDataset(Dataset):
    """Records → (features or pixels, TextSample, instruction); per-sample randomness from (seed, epoch, index)."""

    def __init__(self, records: Sequence[dict[str, Any]], template: Any, config: DataConfig, *,
                 store: FeatureStore | None = None, shas: Sequence[str] | None = None, vision: Any = None,
                 is_encoder_decoder: bool = False, seed: int = 0):
        if store is None and vision is None:
            raise ConfigError("VLDataset needs cached features or a vision encoder", "pass store= or vision=")
        self.records = list(records)
        self.template = template
        self.config = config
        self.store = store
        self.shas = list(shas) if shas is not None else None
        self.vision = vision
        self.is_encoder_decoder = is_encoder_decoder
        self.seed = seed
        self.epoch = 0
        self._reader: ImageReader | None = None
        self.transform: Any = None
        self.collate = Collate("features" if store is not None else "pixels")

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose instruction/prefix draws `__getitem__` returns."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def train_mode(self, on: bool) -> None:
        """Training draws the recipe's train transform (data.augment) on decoded images; evaluation never does."""
        from .transforms import train_transform

        self.transform = train_transform(self.vision, self.config) if on and self.store is None else None

    def text(self, index: int) -> tuple[TextSample, str]:
        """The text side of one example: TextSample and the instruction (for instruction-aware VPGs)."""
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        return make_text(self.records[index], self.template, self.config, rng, self.is_encoder_decoder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, TextSample, str]:
        sample, instruction = self.text(index)
        if self.store is not None:
            return self.store.get(self.shas[index]), sample, instruction
        if self._reader is None:
            self._reader = ImageReader()
        image = self._reader.decode(self.records[index])
        if self.transform is not None:  # its own stream: the text's draws stay those of an un-augmented run
            image = self.transform(image, random.Random(f"{self.seed}:{self.epoch}:{index}:crop"))
        return self.vision.preprocess([image])[0], sample, instruction


def make_text(rec: dict[str, Any], template: Any, cfg: DataConfig, rng: random.Random,
              is_encoder_decoder: bool = False) -> tuple[TextSample, str]:
    """TextSample and instruction of one record: instruction, caption and prefix split drawn from `rng`."""
    if "caption" in rec:
        instruction = rng.choice(cfg.instructions) if cfg.instructions else cfg.prompt
        prefix, target = "", rec["caption"]
        if cfg.random_caption and isinstance(rec.get("captions"), list) and rec["captions"]:
            target = str(rng.choice(rec["captions"]))
        if is_encoder_decoder and cfg.prefix_lm:
            prefix, target = split_caption(target, rng)
        sample = template.sample(instruction, target)
        if prefix:
            sample.after = f"{sample.after.rstrip()} {prefix}" if sample.after.strip() else prefix
        return sample, instruction
    instruction = cfg.question_template.format(question=rec["question"])
    return template.sample(instruction, _answer(rec["answer"])), instruction


def load_records(config: DataConfig, split: str = "train", bad: BadSamples | None = None) -> Any:
    """Read the train or val annotations named by the config (train: data.fraction subset, then max_samples).

    A streamed training split (`data.stream`, `data.sources`) is not indexed: a `StreamSpec` comes back,
    which counts its samples (`len`) and reads the first ones' text (`spec[:n]`).
    """
    if split == "train" and streams(config):
        return load_stream(config, bad)
    path = config.train if split == "train" else config.val
    if not path:
        raise ConfigError(f"data.{split} is not set", f"set data.{split}=PATH in the recipe or on the command line")
    records = read_records(path, config.format, task=config.task, image_root=config.image_root, bad=bad)
    if split == "train" and config.fraction < 1.0:
        records = fraction_subset(records, config.fraction, config.fraction_seed)
    limit = config.max_samples if split == "train" else config.max_val_samples
    return records[:limit] if limit else records


def fraction_subset(records: Sequence[T], fraction: float, seed: int = 0) -> list[T]:
    """A seeded random `fraction` of `records` (at least one), kept in their original order."""
    n = len(records)
    k = max(1, round(n * fraction)) if n else 0
    keep = sorted(random.Random(f"fraction:{seed}").sample(range(n), k))
    return [records[i] for i in keep]


def build_dataset(records: Sequence[dict[str, Any]], model: Any, config: DataConfig, *, seed: int = 0,
                  bad: BadSamples | None = None, progress: bool = True,
                  device: str | torch.device | None = None) -> tuple[VLDataset | StreamDataset, CacheReport | None]:
    """Dataset for `model` (its template and vision encoder); fills the feature cache first when enabled."""
    kw = dict(is_encoder_decoder=bool(getattr(model.llm, "is_encoder_decoder", False)), seed=seed)
    if isinstance(records, StreamSpec):
        return StreamDataset(records, model.template, config, vision=model.vision, **kw), None
    if not config.feature_cache:
        return VLDataset(records, model.template, config, vision=model.vision, **kw), None
    cache = FeatureCache(config.cache_dir, model.vision.cache_id())
    shas, report = prepare_features(records, model.vision, cache, batch_size=config.feature_batch_size,
                                    device=device, dtype=getattr(torch, config.cache_dtype), bad=bad,
                                    progress=progress)
    keep = [i for i, s in enumerate(shas) if s is not None]
    kept_records = [records[i] for i in keep]
    kept_shas = [shas[i] for i in keep]
    store = FeatureStore(cache, kept_shas, preload_limit_bytes=int(config.preload_gb * (1 << 30)))
    return VLDataset(kept_records, model.template, config, store=store, shas=kept_shas, **kw), report
