"""Guards on what every speed-up divides by (issue 29, item 6).

A speed-up is TFS's epochs (or steps) to its best ÷ VPGTrans's to surpass it. Each test pins one thing that,
wrong, changes the ratio without any error: the TFS baseline's recipe, where its best is read, the converter's
held-out figure, and which token pairs the converter is fitted on. Each fails when the matching bug is put in.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

# --- the TFS recipe equals stage 2's except its cap, its data share and its stop target -------------------------
TFS_MAY_DIFFER = {"train": {"max_steps", "epochs", "until"}, "data": {"fraction"}}


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from vpgtrans.world import build_world
    from vpgtrans.world.config import WorldConfig

    return build_world(tmp_path_factory.mktemp("guard-world") / "world", config=WorldConfig.preset("tiny"),
                       progress=lambda _: None)


@pytest.fixture(scope="module")
def source_model(tiny_world, tmp_path_factory):
    """An (untrained) stage-2 world model on OPT-s: the plan only reads its spec and weights' shapes."""
    from vpgtrans.checkpoint import save_model
    from vpgtrans.model import build_model
    from vpgtrans.recipes import load_recipe

    recipe = load_recipe("blip2_stage2_world", [f"model.llm.path={tiny_world / 'opt-s'}",
                                                f"model.vision.path={tiny_world / 'vit'}"])
    out = tmp_path_factory.mktemp("guard-src") / "model"
    save_model(build_model(recipe.model), out)
    return out


def _plan(tiny_world, source_model, tmp_path, **options):
    from vpgtrans.transfer.options import TransferOptions
    from vpgtrans.transfer.plan import plan_transfer

    w = tiny_world
    overrides = (f"data.train={w / 'data' / 'train.jsonl'}", f"data.val={w / 'data' / 'val.jsonl'}",
                 f"model.vision.path={w / 'vit'}", "train.max_steps=12", "train.lr=3e-4", "train.min_lr=3e-5")
    return plan_transfer(TransferOptions(src=str(source_model), dst=str(w / "opt-m"), out=str(tmp_path / "t"),
                                         recipe="vpgtrans_world", overrides=overrides, data_fraction=0.5,
                                         compare_scratch=True, until="val_loss<=1.0", **options))


def _differences(a, b) -> set[str]:
    return {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}


def test_tfs_recipe_is_stage_two_but_for_cap_data_and_stop(tiny_world, source_model, tmp_path):
    plan = _plan(tiny_world, source_model, tmp_path)
    tfs, stage2 = plan.scratch, plan.finetune
    # Same LR, schedule, trainable parts, batch, seed …: only the cap, the data share and the stop target differ.
    assert _differences(tfs.train, stage2.train) <= TFS_MAY_DIFFER["train"]
    assert _differences(tfs.data, stage2.data) <= TFS_MAY_DIFFER["data"]
    assert tfs.model == stage2.model and tfs.eval == stage2.eval
    assert tfs.train.trainable == ["vpg", "projector"] and tfs.train.lr == pytest.approx(3e-4)
    # … and they do differ where the paper's protocol says: TFS on all the data, never stopped at a target.
    assert tfs.data.fraction == 1.0 and stage2.data.fraction == 0.5
    assert tfs.train.until is None and stage2.train.until == "val_loss<=1.0"


# --- the best (and the plateau rule) is applied where the ratio is read ----------------------------------------
def _curve(values: list[float], every: int = 10) -> list[dict[str, float]]:
    return [{"step": (i + 1) * every, "samples": (i + 1) * every * 4, "wall_time": float(i + 1), "value": v}
            for i, v in enumerate(values)]


def test_ratio_reads_tfs_best_not_its_last_point():
    from vpgtrans.transfer import report as rep

    scratch = _curve([2.0, 1.5, 1.2, 1.0, 1.1])  # best 1.0 at step 40; the last point (1.1) is worse
    ours = _curve([1.3, 1.05, 1.0, 0.9])
    out = rep.speedup(ours, scratch, "val_loss")
    assert out["scratch_best"] == 1.0 and out["scratch"]["step"] == 40
    assert out["vpgtrans"]["step"] == 30 and out["speedup"] == pytest.approx(40 / 30, abs=1e-3)
    up = rep.speedup(_curve([0.1, 0.4, 0.5]), _curve([0.2, 0.6, 0.5]), "cider")  # higher is better for CIDEr
    assert up["scratch_best"] == 0.6 and up["vpgtrans"] is None and up["speedup"] is None  # "-": never surpassed


def test_race_target_is_tfs_best_up_to_its_plateau(tiny_world, source_model, tmp_path):
    import json

    from vpgtrans.transfer import race

    plan = _plan(tiny_world, source_model, tmp_path)
    scratch = plan.stage_dir("scratch")
    (scratch / "model").mkdir(parents=True)  # a finished scratch run: the race only reads its log
    # Flat from step 30 on (< 1% gain over the last quarter, >= 4 evaluations in it), then a late gain to 1.0.
    values = [2.0, 1.5, 1.2] + [1.2 - 0.0001 * i for i in range(1, 30)] + [1.0]
    (scratch / "log.jsonl").write_text("".join(json.dumps({**p, "metrics": {"val_loss": p.pop("value")}}) + "\n"
                                               for p in _curve(values)))
    run = race._scratch_first(plan, echo=lambda _: None)
    assert run.summary.plateau_step is not None and run.curve[-1]["step"] == run.summary.plateau_step < 320
    # The target VPGTrans races to is the best before the plateau, not the late gain a longer run found.
    assert run.summary.best == pytest.approx(min(values[: len(run.curve)])) and run.summary.best > 1.0
    assert run.target == f"val_loss<={run.summary.best!r}"


# --- the converter's fitted and held-out rows are disjoint -------------------------------------------------------
class _Memoriser:
    """A converter that maps exactly the rows it is fitted on (one-hot sources) and sends every other to 0."""

    uses_unpaired = False

    def fit(self, src: torch.Tensor, dst: torch.Tensor, seed: int = 0, **_: object) -> nn.Linear:
        lin = nn.Linear(src.shape[1], dst.shape[1])
        with torch.no_grad():
            lin.weight.zero_()
            lin.bias.zero_()
            for s, d in zip(src, dst):
                lin.weight[:, int(s.argmax())] = d
        return lin


def test_converter_heldout_rows_are_not_fitted():
    from vpgtrans.transfer.converter import fit_converter

    n = 40
    src_emb = torch.eye(n)  # token i's embedding says which token it is
    dst_emb = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(n)
    fit = fit_converter(_Memoriser(), src_emb, dst_emb, (ids, ids), heldout=0.25, seed=3)
    assert fit.n_fit + fit.n_heldout == n and fit.n_heldout == 10
    # Fitted rows are reproduced exactly; a held-out row the fit had seen would be too (cosine 1, not 0).
    assert fit.train_cosine == pytest.approx(1.0, abs=1e-5)
    assert fit.heldout_cosine == pytest.approx(0.0, abs=1e-6)


# --- the caption-pair filter keeps a pair only when both of its tokens occur in the texts ----------------------
def _word_tokenizer(words: list[str], lowercase: bool):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_pair_filter_needs_both_sides_in_the_texts():
    from vpgtrans.transfer.pairing import pair_tokens, restrict_to_texts

    # The source lowercases, the destination does not: in "Red dog" the source sees "red", the destination
    # "Red" — the pair (red, red) has only its source side in the text and must go.
    words = ["red", "Red", "dog", "fish", "blue"]
    src, dst = _word_tokenizer(words, lowercase=True), _word_tokenizer(words, lowercase=False)
    pairs = pair_tokens(src, dst, min_coverage=0.0)
    kept = restrict_to_texts(pairs, src, dst, ["Red dog", "blue dog"], min_pairs=1)
    names = {src.convert_ids_to_tokens(int(i)) for i in kept.src_ids}
    assert names == {"dog", "blue"}  # "fish": in neither text; "red": only on the source side; "Red": only dst's
    assert kept.n_pairs == 2 < pairs.n_pairs
