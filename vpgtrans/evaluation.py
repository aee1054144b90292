"""Caption CIDEr, VQA accuracy and the synthetic world's attribute accuracy, plus a generate-and-score loop.

- CIDEr is pycocoevalcap's CIDEr-D scorer on the usual 0-10 scale (COCO tables print it ×100).
  Text is tokenised in Python (lowercase, punctuation → space, split) instead of the Java PTB
  tokenizer. IDF comes from the references being scored, so a corpus of one image scores 0.
- VQA accuracy is the common min(1, #gold answers equal to the prediction / 3) after the VQA
  answer normalisation (lowercase, punctuation, number words → digits, articles dropped). With a
  single gold answer a match counts as 3 (accuracy 1 or 0). The official evaluator's average over
  the ten leave-one-out subsets of 10 answers is not applied.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .conversation import DEFAULT_VQA_PROMPT
from .data import ImageReader, read_records
from .errors import ConfigError, DataError
from .interfaces import GenerationConfig

ATTRIBUTE_KEYS = ("color", "shape", "size", "position")
ATTRIBUTE_FIELDS = ("attributes", "scene", "objects")  # record keys that may hold the true attributes
_ADJECTIVES = ("color", "size")  # bound to the nearest shape word in multi-object scenes
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}


# --- text normalisation --------------------------------------------------------------------------
def caption_tokens(text: str) -> list[str]:
    """Lowercase words with punctuation removed (the pure-Python stand-in for the PTB tokenizer)."""
    return re.sub(r"[^\w\s]|_", " ", text.lower()).split()


def normalize_answer(text: str) -> str:
    """VQA answer normalisation: lowercase, punctuation, number words → digits, articles dropped."""
    text = text.lower().replace("\n", " ").replace("\t", " ")
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,000 → 1000
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # keep decimal points only
    text = text.replace("'", "")
    text = re.sub(r"[^\w\s.]|_", " ", text)
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


# --- metrics -------------------------------------------------------------------------------------
def cider(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus CIDEr-D of one prediction per image against that image's reference captions."""
    return cider_per_sample(predictions, references)[0]


def cider_per_sample(predictions: Sequence[str],
                     references: Sequence[str | Sequence[str]]) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, per-image scores) with pycocoevalcap's scorer."""
    from pycocoevalcap.cider.cider import Cider

    if len(predictions) != len(references):
        raise ConfigError(f"CIDEr: {len(predictions)} predictions but {len(references)} reference sets",
                          "pass one prediction per image")
    if not predictions:
        return 0.0, []
    gts, res = {}, {}
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise DataError(f"CIDEr: image {i} has no reference caption", "give every image at least one caption")
        gts[i] = [" ".join(caption_tokens(r)) for r in refs]
        res[i] = [" ".join(caption_tokens(pred))]
    score, scores = Cider().compute_score(gts, res)
    return float(score), [float(s) for s in scores]


def vqa_score(prediction: str, answers: str | Sequence[str]) -> float:
    """min(1, matches / 3) for one question; a single gold answer counts as three annotators."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        raise DataError("VQA: a question has no gold answer", "give every question at least one answer")
    pred = normalize_answer(prediction)
    matches = sum(normalize_answer(a) == pred for a in answers)
    if len(answers) == 1:
        matches *= 3
    return min(1.0, matches / 3.0)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> float:
    """Mean VQA accuracy over questions."""
    if len(predictions) != len(answers):
        raise ConfigError(f"VQA: {len(predictions)} predictions but {len(answers)} answer sets",
                          "pass one prediction per question")
    return sum(vqa_score(p, a) for p, a in zip(predictions, answers)) / max(1, len(predictions))


def _find(words: list[str], phrase: list[str], used: set[int]) -> list[int]:
    """Start indices of `phrase` in `words` whose words are all still unused."""
    n = len(phrase)
    return [i for i in range(len(words) - n + 1)
            if words[i:i + n] == phrase and not used.intersection(range(i, i + n))]


def _scene_targets(attributes: Any, keys: Sequence[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """(objects, scene-level relation phrases) from a dict, a list of dicts or a world scene."""
    relations: list[str] = []
    if isinstance(attributes, Mapping) and "objects" in attributes:
        rel = attributes.get("relation")
        rel = rel.get("relation") if isinstance(rel, Mapping) else rel
        if isinstance(rel, str) and rel and "relation" in keys:
            relations.append(rel)
        objects = list(attributes["objects"])
    elif isinstance(attributes, Mapping):
        if isinstance(attributes.get("relation"), str) and "relation" in keys:
            relations.append(attributes["relation"])
        objects = [attributes]
    elif isinstance(attributes, Sequence) and not isinstance(attributes, str):
        objects = list(attributes)
    else:
        raise DataError(f"attributes must be a dict or a list of dicts, got {type(attributes).__name__}",
                        'write e.g. {"color": "red", "shape": "circle"}')
    return [o for o in objects if isinstance(o, Mapping)], relations


def attribute_hits(prediction: str, attributes: Any, keys: Sequence[str] = (*ATTRIBUTE_KEYS, "relation")
                   ) -> list[tuple[str, bool]]:
    """(attribute name, found correctly) for every attribute value of one sample.

    Values match as whole words. Longer phrases are matched first and consume their words, so
    "to the left of" is not also read as the position "left". With several objects, colour and
    size only count when the nearest shape word in the caption is their own object's shape.
    Positions a caption never states (e.g. a relation caption) count as misses, so reference
    captions themselves score below 1 (``attribute_accuracy_refs`` in `score` reports that ceiling).
    """
    words = caption_tokens(prediction)
    objects, relations = _scene_targets(attributes, keys)
    used: set[int] = set()
    hits: list[tuple[str, bool]] = []
    for rel in sorted(relations, key=lambda r: -len(r.split())):
        found = _find(words, caption_tokens(rel), used)
        if found:
            used.update(range(found[0], found[0] + len(caption_tokens(rel))))
        hits.append(("relation", bool(found)))
    shapes = {o["shape"].lower() for o in objects if isinstance(o.get("shape"), str)}
    shape_at = [i for i, w in enumerate(words) if w in shapes]
    targets = [(key, obj, caption_tokens(obj[key])) for obj in objects for key in keys
               if key != "relation" and isinstance(obj.get(key), str) and obj[key].strip()]
    for key, obj, phrase in sorted(targets, key=lambda t: -len(t[2])):
        found = _find(words, phrase, used)
        own = obj.get("shape")
        if key in _ADJECTIVES and len(objects) > 1 and isinstance(own, str) and shape_at:
            # Nearest shape word; on a tie the following one (English adjectives precede their noun).
            found = [i for i in found if words[min(shape_at, key=lambda s: (abs(s - i), s < i))] == own.lower()]
        if found:
            used.update(range(found[0], found[0] + len(phrase)))
        hits.append((key, bool(found)))
    return hits


def attribute_scores(predictions: Sequence[str], attributes: Sequence[Any],
                     keys: Sequence[str] = (*ATTRIBUTE_KEYS, "relation")) -> dict[str, float]:
    """Share of attribute values found in the captions: overall and per attribute name."""
    if len(predictions) != len(attributes):
        raise ConfigError(f"attributes: {len(predictions)} predictions but {len(attributes)} attribute sets",
                          "pass one attribute set per prediction")
    totals: dict[str, list[int]] = {}
    for pred, attrs in zip(predictions, attributes):
        for key, ok in attribute_hits(pred, attrs, keys):
            totals.setdefault(key, [0, 0])
            totals[key][0] += int(ok)
            totals[key][1] += 1
    hit = sum(t[0] for t in totals.values())
    count = sum(t[1] for t in totals.values())
    out = {"attribute_accuracy": hit / count if count else 0.0}
    out.update({f"attr_{k}": t[0] / t[1] for k, t in sorted(totals.items())})
    return out


def attribute_accuracy(predictions: Sequence[str], attributes: Sequence[Any]) -> float:
    """Fraction of attribute values (colour, shape, size, position, relation) stated correctly."""
    return attribute_scores(predictions, attributes)["attribute_accuracy"]


# --- records -------------------------------------------------------------------------------------
def _references(record: Mapping[str, Any], index: int) -> list[str]:
    refs = record.get("captions") or record.get("caption")
    if not refs:
        raise DataError(f"record {index} has no 'caption' or 'captions'", "add the reference caption(s)")
    return [refs] if isinstance(refs, str) else list(refs)


def _answers(record: Mapping[str, Any], index: int) -> list[str]:
    answers = record.get("answers") or record.get("answer")
    if not answers or not record.get("question"):
        raise DataError(f"record {index} needs 'question' and 'answer' (or 'answers') for VQA",
                        "add them, or evaluate with --task caption")
    return [answers] if isinstance(answers, str) else [a["answer"] if isinstance(a, Mapping) else a for a in answers]


def group_by_image(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per image for caption scoring: COCO-style one-row-per-caption files are merged."""
    merged: dict[tuple[Any, Any], dict[str, Any]] = {}
    for rec in records:
        key = (rec.get("archive"), rec["image"])
        if key not in merged:
            merged[key] = {**rec, "captions": list(_references(rec, len(merged)))}
        else:
            merged[key]["captions"] += [c for c in _references(rec, len(merged)) if c not in merged[key]["captions"]]
    return list(merged.values())


def load_eval_records(path: str | Path, task: str = "caption", limit: int | None = None,
                      fmt: str = "auto") -> list[dict[str, Any]]:
    """Read annotations (JSONL, COCO, cc_sbu_align, shards) for evaluation; captions grouped per image."""
    records = read_records(path, fmt, task=task)
    for i, rec in enumerate(records):
        (_answers if task == "vqa" else _references)(rec, i)
    if task == "caption":
        records = group_by_image(records)
    return records[:limit] if limit else records


def image_features(model: Any) -> Callable[[Sequence[Mapping[str, Any]]], torch.Tensor]:
    """Default features_fn: decode each record's image (file or shard member) and run the frozen encoder."""
    reader = ImageReader()

    def features(batch: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        images = [r["image"] if not isinstance(r["image"], (str, Path)) else reader.decode(dict(r)) for r in batch]
        return model.encode_images(model.vision.preprocess(images).to(model.projector.weight.device))

    return features


# --- generate and score --------------------------------------------------------------------------
def _question_prompt(prompt: str, question: str) -> str:
    if "{question}" in prompt:
        return prompt.format(question=question)
    return prompt.format(question) if "{}" in prompt else f"{prompt}{question}"


def predict(model: Any, records: Sequence[Mapping[str, Any]], features_fn: Callable | None = None,
            task: str = "caption", batch_size: int = 16, gen_config: GenerationConfig | None = None,
            prompt: str | None = None) -> list[str]:
    """Generate one text per record: a caption, or an answer to the record's question."""
    if task not in ("caption", "vqa"):
        raise ConfigError(f"unknown task {task!r}", "use task caption or vqa")
    for i, rec in enumerate(records):
        if task == "vqa" and not rec.get("question"):
            raise DataError(f"record {i} has no 'question'", "VQA records need question and answer")
    features_fn = features_fn or image_features(model)
    if prompt is None:
        prompt = DEFAULT_VQA_PROMPT if task == "vqa" else ""
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(records), max(1, batch_size)):
            batch = records[start:start + batch_size]
            if task == "vqa":
                prompts = [_question_prompt(prompt, r["question"]) for r in batch]
            else:
                prompts = [prompt] * len(batch)
            with torch.no_grad():
                out += model.generate(features=features_fn(batch), prompt=prompts, config=gen_config)
    finally:
        model.train(was_training)
    return [t.strip() for t in out]


def score(task: str, predictions: Sequence[str], records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Metrics of predictions against records: CIDEr (+ attribute accuracy) or VQA accuracy."""
    metrics: dict[str, float] = {"n": float(len(records))}
    if task == "vqa":
        metrics["vqa_accuracy"] = vqa_accuracy(predictions, [_answers(r, i) for i, r in enumerate(records)])
        return metrics
    metrics["cider"] = cider(predictions, [_references(r, i) for i, r in enumerate(records)])
    with_attrs = [(p, next((r[k] for k in ATTRIBUTE_FIELDS if r.get(k)), None)) for p, r in zip(predictions, records)]
    with_attrs = [(p, a) for p, a in with_attrs if a]
    if with_attrs:
        metrics.update(attribute_scores([p for p, _ in with_attrs], [a for _, a in with_attrs]))
        refs = [(ref, next(r[k] for k in ATTRIBUTE_FIELDS if r.get(k))) for r in records
                if any(r.get(k) for k in ATTRIBUTE_FIELDS) for ref in _references(r, 0)]
        metrics["attribute_accuracy_refs"] = attribute_scores([c for c, _ in refs], [a for _, a in refs])[
            "attribute_accuracy"]
    return metrics


def evaluate_model(model: Any, records: Sequence[Mapping[str, Any]], features_fn: Callable | None = None,
                   task: str = "caption", batch_size: int = 16, gen_config: GenerationConfig | None = None,
                   prompt: str | None = None) -> dict[str, float]:
    """Generate for every record and score it; returns a flat dict of floats (for logs and --until).

    ``features_fn(records_batch) -> [B, T, D]`` supplies frozen vision features (e.g. from a
    feature cache); by default each record's ``image`` is opened and encoded. ``prompt`` is the
    caption instruction (default empty) or, for VQA, a format string for the question (default
    ``"Question: {} Answer:"``). Keys: ``cider`` [+ ``attribute_accuracy``, ``attr_*``] or
    ``vqa_accuracy``, and ``n``.
    """
    for i, rec in enumerate(records):  # fail on bad references before the slow part
        (_answers if task == "vqa" else _references)(rec, i)
    predictions = predict(model, records, features_fn, task, batch_size, gen_config, prompt)
    return score(task, predictions, records)


# --- metrics for the trainer's eval callback (`eval.metrics` in a recipe) -------------------------
def _metric_inputs(model: Any, ctx: Any, task: str) -> tuple[Any, list[dict[str, Any]], Callable, str]:
    """(unwrapped model, first max_samples records, features_fn reading the dataset's cached features, prompt)."""
    model = getattr(model, "module", model)
    dataset = ctx.dataset
    n = min(len(ctx.records), ctx.config.max_samples)
    records = [{**ctx.records[i], "_index": i} for i in range(n)]
    if task == "caption":
        records = group_by_image(records)
    features_fn = image_features(model)
    if dataset is not None:
        device = model.projector.weight.device

        def features_fn(batch: Sequence[Mapping[str, Any]]) -> torch.Tensor:
            collated = dataset.collate([dataset[r["_index"]] for r in batch])
            if "features" in collated:
                return collated["features"].to(device)
            return model.encode_images(collated["pixels"].to(device))

    prompt = ctx.config.prompt
    if prompt is None and dataset is not None:
        prompt = dataset.config.question_template if task == "vqa" else dataset.config.prompt
    return model, records, features_fn, prompt


def _training_metric(task: str) -> Callable[[Any, Any], dict[str, float]]:
    def metric(model: Any, ctx: Any) -> dict[str, float]:
        model, records, features_fn, prompt = _metric_inputs(model, ctx, task)
        gen = GenerationConfig(max_new_tokens=ctx.config.max_new_tokens, num_beams=ctx.config.num_beams,
                               stop=tuple(ctx.config.stop))
        out = evaluate_model(model, records, features_fn, task, ctx.config.batch_size, gen, prompt)
        out.pop("n", None)
        return out

    return metric


# Looked up by name by vpgtrans.train.objectives.get_metric; "cider" also reports attribute accuracy
# when the validation records carry attributes, so list just one of the two caption names.
TRAINING_METRICS: dict[str, Callable[[Any, Any], dict[str, float]]] = {
    "cider": _training_metric("caption"), "attribute_accuracy": _training_metric("caption"),
    "vqa_accuracy": _training_metric("vqa"),
}
