"""CIDEr, VQA accuracy, attribute accuracy, the generate-and-score loop and `vpgtrans eval`."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from click.testing import CliRunner

from vpgtrans.checkpoint import save_model
from vpgtrans.cli import main
from vpgtrans.errors import DataError
from vpgtrans.evaluation import (attribute_accuracy, attribute_scores, caption_tokens, cider, cider_per_sample,
                                 evaluate_model, group_by_image, load_eval_records, normalize_answer, vqa_accuracy, vqa_score)
from vpgtrans.interfaces import GenerationConfig
from vpgtrans.model import build_model
from vpgtrans.testing import tiny_images, tiny_spec


def _reference_cider(preds, refs, n=4, sigma=6.0):
    """CIDEr-D written out from its definition, independent of pycocoevalcap (raw-count tf, as coco-caption)."""

    def grams(words):
        return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))

    refs = [[caption_tokens(r) for r in rs] for rs in refs]
    preds = [caption_tokens(p) for p in preds]
    df = Counter(g for rs in refs for g in {g for r in rs for g in grams(r)})
    log_n = math.log(len(refs))

    def vectors(words):
        vec = [{} for _ in range(n)]
        for g, tf in grams(words).items():
            vec[len(g) - 1][g] = tf * (log_n - math.log(max(1.0, df[g])))
        return vec

    scores = []
    for p, rs in zip(preds, refs):
        vp = vectors(p)
        per_n = [0.0] * n
        for r in rs:
            vr = vectors(r)
            for k in range(n):
                norm_p = math.sqrt(sum(v * v for v in vp[k].values()))
                norm_r = math.sqrt(sum(v * v for v in vr[k].values()))
                dot = sum(min(v, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, v in vp[k].items())
                cos = dot / (norm_p * norm_r) if norm_p and norm_r else 0.0
                per_n[k] += cos * math.exp(-((len(p) - len(r)) ** 2) / (2 * sigma ** 2))
        scores.append(10.0 * sum(per_n) / n / len(rs))
    return sum(scores) / len(scores)


def test_cider_hand_value_disjoint_identical_captions():
    # Two images, each caption equal to its single reference and sharing no n-gram with the other:
    # unigram and bigram cosines are 1, 3/4-grams do not exist → 10 · (1 + 1 + 0 + 0) / 4 = 5.
    assert cider(["red circle", "blue square"], [["red circle"], ["blue square"]]) == pytest.approx(5.0)
    # "a" is in both images' references (idf 0) but the trigram exists: 10 · 3/4 = 7.5.
    assert cider(["a red circle", "a blue square"], [["a red circle"], ["a blue square"]]) == pytest.approx(7.5)


def test_cider_matches_independent_implementation():
    refs = [["A red circle in the top left.", "there is a small red circle top left"],
            ["Two shapes: a blue square, and a green star!", "a blue square left of a green star"],
            ["the picture shows a large yellow triangle", "a yellow triangle at the bottom", "large triangle"]]
    preds = ["a red circle on the left", "a blue square and a star", "the picture shows a yellow triangle"]
    expected = _reference_cider(preds, refs)
    assert cider(preds, refs) == pytest.approx(expected, rel=1e-9)
    assert 0.0 < expected < 10.0


def test_cider_ranks_identical_above_unrelated():
    refs = [["a red circle in the top left"], ["a blue square at the bottom"], ["a green star in the center"]]
    same = cider([r[0] for r in refs], refs)
    unrelated = cider(["dog sky tree", "the car house", "one man and a woman"], refs)
    assert same > 1.0 and unrelated == pytest.approx(0.0)
    corpus, per_image = cider_per_sample([refs[0][0], "dog", refs[2][0]], refs)
    assert per_image[0] > 0 and per_image[1] == 0 and corpus == pytest.approx(sum(per_image) / 3)


def test_caption_tokens_replace_punctuation():
    assert caption_tokens("A Red-circle, top LEFT.") == ["a", "red", "circle", "top", "left"]


@pytest.mark.parametrize("matches,expected", [(0, 0.0), (1, 1 / 3), (2, 2 / 3), (3, 1.0), (7, 1.0)])
def test_vqa_accuracy_counts_matching_annotators(matches, expected):
    answers = ["red"] * matches + ["blue"] * (10 - matches)
    assert vqa_score("Red.", answers) == pytest.approx(expected)


def test_vqa_single_gold_answer_counts_as_three_and_normalisation():
    assert vqa_score("two", "2") == 1.0
    assert vqa_score("the circle", "circle") == 1.0
    assert vqa_score("square", "circle") == 0.0
    assert normalize_answer("It's 1,000.5 dogs!") == "its 1000.5 dogs"
    acc = vqa_accuracy(["yes", "no", "red"], [["yes"] * 10, ["yes"] * 9 + ["no"], "blue"])
    assert acc == pytest.approx((1 + 1 / 3 + 0) / 3)


def test_attribute_accuracy_single_object_dict():
    truth = {"color": "red", "shape": "circle", "size": "small", "position": "top left"}
    assert attribute_accuracy(["a small red circle in the top left."], [truth]) == 1.0
    assert attribute_accuracy(["a large red square in the top right"], [truth]) == pytest.approx(1 / 4)
    scores = attribute_scores(["a small blue circle on the left"], [truth])
    assert scores["attr_color"] == 0 and scores["attr_shape"] == 1 and scores["attr_position"] == 0


def test_attribute_accuracy_binds_adjectives_to_their_shape():
    objs = [{"color": "red", "shape": "circle", "size": "small"}, {"color": "blue", "shape": "square", "size": "large"}]
    right = attribute_scores(["a small red circle and a large blue square"], [objs])
    swapped = attribute_scores(["a small blue circle and a large red square"], [objs])
    assert right["attribute_accuracy"] == 1.0
    assert swapped["attr_color"] == 0.0 and swapped["attr_shape"] == 1.0 and swapped["attr_size"] == 1.0
    # Equal distance to two shapes: the adjective belongs to the shape after it.
    tie = [{"size": "medium", "shape": "circle"}, {"size": "medium", "shape": "ring"}]
    assert attribute_accuracy(["a medium circle, a medium ring"], [tie]) == 1.0


def test_attribute_accuracy_reads_world_scene_with_relation():
    scene = {"objects": [{"color": "red", "shape": "circle", "size": "small", "position": "left", "row": 1, "col": 0},
                         {"color": "blue", "shape": "square", "size": "large", "position": "right", "row": 1,
                          "col": 2}],
             "relation": {"subject": 0, "object": 1, "relation": "to the left of"}}
    good = attribute_scores(["a small red circle to the left of a large blue square"], [scene])
    # "left" inside the relation phrase must not be credited as the circle's position.
    assert good["attr_relation"] == 1.0 and good["attr_position"] == 0.0
    assert good["attribute_accuracy"] == pytest.approx(7 / 9)


def test_eval_records_group_captions_per_image_and_reject_bad_input(tmp_path):
    data = tmp_path / "d" / "val.jsonl"
    data.parent.mkdir()
    data.write_text(json.dumps({"image": "img/0.png", "caption": "a red circle"}) + "\n\n"
                    + json.dumps({"image": "/abs/1.png", "caption": ["x", "y"]}) + "\n"
                    + json.dumps({"image": "img/0.png", "caption": "the red circle"}) + "\n")
    recs = load_eval_records(data)
    assert [r["image"] for r in recs] == [str((data.parent / "img/0.png").resolve()), "/abs/1.png"]
    assert recs[0]["captions"] == ["a red circle", "the red circle"] and recs[1]["captions"] == ["x", "y"]
    assert len(load_eval_records(data, limit=1)) == 1
    assert len(group_by_image([{"image": "a", "caption": "x"}, {"image": "a", "caption": "x"}])[0]["captions"]) == 1
    with pytest.raises(DataError, match="not found"):
        load_eval_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="question"):
        load_eval_records(data, task="vqa")


def _write_data(root, n=3):
    lines = []
    for i, img in enumerate(tiny_images(n)):
        img.save(root / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": "a red circle", "question": "what color?",
                                 "answer": "red", "attributes": {"color": "red", "shape": "circle"}}))
    (root / "val.jsonl").write_text("\n".join(lines) + "\n")
    return root / "val.jsonl"


def test_evaluate_model_on_tiny_model(tiny_paths, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_spec(tiny_paths))
    records = load_eval_records(_write_data(tmp_path))
    gen = GenerationConfig(max_new_tokens=3)
    caption = evaluate_model(model, records, task="caption", batch_size=2, gen_config=gen)
    assert set(caption) >= {"cider", "attribute_accuracy", "attribute_accuracy_refs", "n"} and caption["n"] == 3
    assert caption["attribute_accuracy_refs"] == 1.0  # "a red circle" states both attributes
    calls = []

    def features_fn(batch):
        calls.append(len(batch))
        return torch.zeros(len(batch), model.vision.num_tokens, model.vision.hidden_size)

    with pytest.raises(DataError, match="question"):
        evaluate_model(model, records, features_fn, task="vqa", gen_config=gen)
    records = load_eval_records(tmp_path / "val.jsonl", task="vqa")
    answers = iter(["Red.", "blue", "RED"])  # the gold answer is "red": 2 of 3 right after normalisation
    model.generate = lambda features, prompt, config: [next(answers) for _ in prompt]
    vqa = evaluate_model(model, records, features_fn, task="vqa", batch_size=2, gen_config=gen)
    assert calls == [2, 1] and vqa["vqa_accuracy"] == pytest.approx(2 / 3)


def test_eval_cli_prints_metrics_and_writes_predictions(tiny_paths, tmp_path):
    torch.manual_seed(0)
    save_model(build_model(tiny_spec(tiny_paths)), tmp_path / "m")
    data = _write_data(tmp_path)
    out = tmp_path / "res.json"
    res = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "m"), "--data", str(data), "--limit", "2",
                                    "--max-new-tokens", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "cider:" in res.output and "attribute_accuracy:" in res.output and "n: 2" in res.output
    written = json.loads(out.read_text())
    assert len(written["predictions"]) == 2 and "cider" in written["metrics"]
    res = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "m"), "--data", str(data), "--task", "vqa",
                                    "--max-new-tokens", "2", "--beams", "2"])
    assert res.exit_code == 0, res.output
    assert "vqa_accuracy:" in res.output


def test_eval_cli_missing_data_file_is_one_line(tiny_paths, tmp_path):
    save_model(build_model(tiny_spec(tiny_paths)), tmp_path / "m")
    res = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "nope.jsonl")])
    assert res.exit_code != 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "not found" in lines[0] and "nope.jsonl" in lines[0] and "Traceback" not in res.output


def test_training_metrics_are_found_by_the_trainer(tiny_paths, tmp_path):
    from vpgtrans.train.objectives import EvalConfig, EvalContext, get_metric

    torch.manual_seed(0)
    model = build_model(tiny_spec(tiny_paths))
    records = load_eval_records(_write_data(tmp_path))
    ctx = EvalContext(records=records, dataset=None,
                      config=EvalConfig(metrics=["cider"], max_samples=2, batch_size=2, max_new_tokens=2))
    out = get_metric("cider")(model, ctx)
    assert {"cider", "attribute_accuracy"} <= set(out) and "n" not in out
    vqa_ctx = EvalContext(records=load_eval_records(tmp_path / "val.jsonl", task="vqa"), dataset=None,
                          config=EvalConfig(metrics=["vqa_accuracy"], max_samples=3, max_new_tokens=2))
    model.generate = lambda features, prompt, config: ["red"] * len(prompt)
    assert get_metric("vqa_accuracy")(model, vqa_ctx)["vqa_accuracy"] == 1.0
    model.generate = lambda features, prompt, config: ["a blue one"] * len(prompt)
    assert get_metric("vqa_accuracy")(model, vqa_ctx)["vqa_accuracy"] == 0.0


def test_eval_stop_reads_the_answer_before_the_stop_string(tiny_paths, tmp_path):
    """`eval.stop` (lmms-eval's `until`) cuts generated text: "red\\nshape" is the answer "red"."""
    from vpgtrans.train.objectives import EvalConfig, EvalContext, get_metric

    torch.manual_seed(0)
    model = build_model(tiny_spec(tiny_paths))
    _write_data(tmp_path)
    records = load_eval_records(tmp_path / "val.jsonl", task="vqa")
    raw = ["red\nshape"] * len(records)
    model.llm.generate = lambda prompts, samples, config: raw[:len(samples)]
    for stop, expected in (([], 0.0), (["\n"], 1.0)):
        ctx = EvalContext(records=records, dataset=None,
                          config=EvalConfig(metrics=["vqa_accuracy"], max_samples=3, max_new_tokens=2, stop=stop))
        assert get_metric("vqa_accuracy")(model, ctx)["vqa_accuracy"] == expected
    out = model.generate(features=torch.randn(2, 4, 32), prompt="q", config=GenerationConfig(stop=("sh", "\n")))
    assert out == ["red", "red"]


def test_easyvqa_recipe_reads_the_first_line():
    from vpgtrans.recipes import load_recipe

    assert load_recipe("easyvqa_smollm2", []).eval.stop == ["\n"]


def test_eval_cli_stop_cuts_predictions(tiny_paths, tmp_path, monkeypatch):
    save_model(build_model(tiny_spec(tiny_paths)), tmp_path / "m")
    data = _write_data(tmp_path)
    backend = type(build_model(tiny_spec(tiny_paths)).llm)
    monkeypatch.setattr(backend, "generate", lambda self, prompts, samples, config: ["red\nshape"] * len(samples))
    for extra, expected in (([], "0.0000"), (["--stop", "\\n"], "1.0000")):
        res = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "m"), "--data", str(data), "--task", "vqa",
                                        *extra])
        assert res.exit_code == 0, res.output
        assert f"vqa_accuracy: {expected}" in res.output
