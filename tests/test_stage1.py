"""BLIP-2 stage 1: the three attention masks, the losses, and handing the Q-Former to stage 2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vpgtrans.errors import CheckpointError
from vpgtrans.model import build_model
from vpgtrans.testing import tiny_spec
from vpgtrans.train.stage1 import (Stage1Model, _smoothed_targets, attention_mask_4d, init_vpg_from_stage1,
                                   load_stage1, save_stage1)

CAPTIONS = ["a red circle", "a blue square on the left", "two shapes", "a green star above a red circle"]
Q = 4


@pytest.fixture
def stage1(tiny_paths):
    torch.manual_seed(0)
    vpg = dict(num_query_tokens=Q, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               dropout=0.0, tokenizer=str(tiny_paths["bert"]), vocab_size=1)
    return Stage1Model(vpg, vision_width=32, embed_dim=16)


@pytest.fixture
def mixing(stage1):
    """The same model with large random weights, so that any allowed interaction is plainly visible."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in stage1.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return stage1.eval()


def _feats(b=4, seed=0):
    return torch.randn(b, 17, 32, generator=torch.Generator().manual_seed(seed))


def _hidden(model, feats, captions, kind, dec=False):
    ids, mask = model.tokenize(captions)
    if dec:
        ids[:, 0] = model.dec_token_id
    return model.hidden_states(feats, ids, mask, kind), ids, mask


def test_mask_shapes_by_construction():
    text_mask = torch.tensor([[1, 1, 0]])
    allowed = {k: (attention_mask_4d(k, 2, text_mask, torch.float32) == 0)[0, 0].int().tolist()
               for k in ("unimodal", "bidirectional", "causal")}
    assert allowed["unimodal"] == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0]]
    assert allowed["bidirectional"] == [[1, 1, 1, 1, 0]] * 5
    assert allowed["causal"] == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]


@torch.no_grad()
def test_itc_mask_keeps_image_and_text_apart(mixing):
    stage1 = mixing
    a, _, _ = _hidden(stage1, _feats(seed=0), CAPTIONS, "unimodal")
    b, _, _ = _hidden(stage1, _feats(seed=1), CAPTIONS, "unimodal")
    c, _, _ = _hidden(stage1, _feats(seed=0), CAPTIONS[::-1], "unimodal")
    assert torch.allclose(a[:, Q:], b[:, Q:], atol=1e-6)  # text blind to the image
    assert not torch.allclose(a[:, :Q], b[:, :Q], atol=1e-4)
    assert torch.allclose(a[:, :Q], c[:, :Q], atol=1e-6)  # queries blind to the text
    # The query half equals the plain VPG output that stage 2 will use.
    assert torch.allclose(a[:, :Q], stage1.vpg(_feats(seed=0)), atol=1e-5)


@torch.no_grad()
def test_itm_mask_lets_image_and_text_interact(mixing):
    stage1 = mixing
    a, _, _ = _hidden(stage1, _feats(seed=0), CAPTIONS, "bidirectional")
    b, _, _ = _hidden(stage1, _feats(seed=1), CAPTIONS, "bidirectional")
    c, _, _ = _hidden(stage1, _feats(seed=0), CAPTIONS[1:] + CAPTIONS[:1], "bidirectional")
    assert not torch.allclose(a[:, Q:], b[:, Q:], atol=1e-4)  # text reads the image (through queries)
    assert not torch.allclose(a[:, :Q], c[:, :Q], atol=1e-4)  # queries read the text


@torch.no_grad()
def test_itg_mask_is_multimodal_causal(mixing):
    stage1 = mixing
    feats = _feats(b=1)
    base = "a red circle above a blue square"
    a, ids, _ = _hidden(stage1, feats, [base], "causal", dec=True)
    b, ids2, _ = _hidden(stage1, feats, ["a red circle above a green star"], "causal", dec=True)
    first_diff = int((ids[0] != ids2[0]).nonzero()[0])
    text_a, text_b = a[0, Q:], b[0, Q:]
    assert torch.allclose(text_a[:first_diff], text_b[:first_diff], atol=1e-6)  # later tokens unseen
    assert not torch.allclose(text_a[first_diff:], text_b[first_diff:], atol=1e-4)
    assert torch.allclose(a[0, :Q], b[0, :Q], atol=1e-6)  # queries never see text
    c, _, _ = _hidden(stage1, _feats(b=1, seed=3), [base], "causal", dec=True)
    assert not torch.allclose(text_a, c[0, Q:], atol=1e-4)  # text sees the queries, hence the image


@torch.no_grad()
def test_padding_does_not_change_outputs(mixing):
    stage1 = mixing
    feats = _feats(b=2)
    for kind in ("unimodal", "bidirectional", "causal"):
        alone, ids, _ = _hidden(stage1, feats[:1], CAPTIONS[:1], kind)
        padded, _, mask = _hidden(stage1, feats, [CAPTIONS[0], CAPTIONS[3]], kind)
        n = ids.shape[1]
        assert mask[0].sum() == n and mask.shape[1] > n
        assert torch.allclose(alone[0, : Q + n], padded[0, : Q + n], atol=1e-5), kind


def test_label_smoothed_targets_equal_torch_label_smoothing():
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    ours = F.cross_entropy(logits, _smoothed_targets(torch.eye(5, dtype=torch.bool), 0.1))
    assert torch.allclose(ours, F.cross_entropy(logits, torch.arange(5), label_smoothing=0.1))


def test_losses_finite_and_training_lowers_them(stage1):
    torch.manual_seed(0)
    feats = _feats()
    first = stage1.losses(feats, CAPTIONS)
    assert set(first) == {"loss", "itc", "itm", "itg"}
    assert all(torch.isfinite(v) for v in first.values())
    assert torch.allclose(first["loss"], first["itc"] + first["itm"] + first["itg"])
    opt = torch.optim.AdamW(stage1.parameters(), lr=3e-3)
    for _ in range(40):
        loss = stage1(feats, CAPTIONS)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = stage1.losses(feats, CAPTIONS)
    assert last["loss"] < 0.6 * first["loss"]
    assert last["itg"] < first["itg"] and last["itc"] < first["itc"]
    assert 0.001 <= stage1.temp.item() <= 0.5


def test_duplicate_captions_and_tiny_batches(stage1):
    torch.manual_seed(0)
    same = stage1.losses(_feats(b=3), ["a red circle"] * 3)  # no valid hard negative anywhere
    one = stage1.losses(_feats(b=1), ["a red circle"])
    for out in (same, one):
        assert all(torch.isfinite(v) for v in out.values())
    # Only positives in ITM: the loss is CE against label 1 alone.
    assert same["itm"] > 0


def test_hard_negatives_never_pick_a_positive(stage1, monkeypatch):
    picked = []
    real = torch.multinomial

    def spy(weights, n):
        picked.append(weights.detach().clone())
        return real(weights, n)

    monkeypatch.setattr(torch, "multinomial", spy)
    stage1.losses(_feats(b=4), ["a red circle", "a red circle", "two shapes", "a blue square"])
    assert len(picked) == 2
    for weights in picked:  # rows 0/1 share a caption: neither may draw the other or itself
        assert weights[0, 0] == 0 and weights[0, 1] == 0 and weights[1, 0] == 0 and weights[1, 1] == 0
        assert torch.allclose(weights.sum(1), torch.ones(4))


def test_itm_share_scores_matching_on_the_first_rows_only(stage1, monkeypatch):
    from vpgtrans.errors import ConfigError
    from vpgtrans.train.config import TrainConfig

    seen = []
    real = Stage1Model._itm_loss

    def spy(self, features, ids, mask, logits, positive):
        seen.append((features.shape[0], ids.shape[0], tuple(logits.shape), tuple(positive.shape)))
        return real(self, features, ids, mask, logits, positive)

    monkeypatch.setattr(Stage1Model, "_itm_loss", spy)
    captions = CAPTIONS * 2
    full = stage1.losses(_feats(b=8), captions)
    stage1.itm_share = 0.25
    share = stage1.losses(_feats(b=8), captions)
    assert seen == [(8, 8, (8, 8), (8, 8)), (2, 2, (2, 2), (2, 2))]
    assert torch.isfinite(share["itm"]) and share["itc"].shape == full["itc"].shape
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="itm_share"):
            TrainConfig(itm_share=bad)


def test_dec_token_and_tied_lm_head(stage1):
    assert stage1.tokenizer.convert_ids_to_tokens(stage1.dec_token_id) == "[DEC]"
    emb = stage1.vpg.text_embeddings.word_embeddings
    assert emb.num_embeddings == stage1.dec_token_id + 1 == stage1.lm_bias.numel()
    assert stage1.lm_logits(torch.zeros(1, 2, 32)).shape == (1, 2, emb.num_embeddings)
    names = {n for n, _ in stage1.named_parameters()}
    assert not any("decoder" in n for n in names)  # output weights are the embedding table


def test_stage2_vpg_initialised_from_stage1(stage1, tiny_paths, tmp_path):
    torch.manual_seed(1)
    model = build_model(tiny_spec(tiny_paths))
    model.eval()
    stage1.eval()
    state = stage1.vpg_state()
    assert "query_tokens" in state and not any(k.startswith("text_embeddings") for k in state)
    assert not any(".intermediate." in k or k.split(".")[4:5] == ["output"] for k in state)
    feats = _feats(b=2)
    save_stage1(stage1, tmp_path / "s1")
    loaded = init_vpg_from_stage1(model.vpg, tmp_path / "s1")
    assert "query_tokens" in loaded
    with torch.no_grad():
        expected = stage1.vpg(feats)
        assert torch.allclose(model.vpg(feats), expected, atol=1e-5)
        again = load_stage1(tmp_path / "s1")
        again.eval()
        assert torch.allclose(again.vpg(feats), expected, atol=1e-5)
        ids, mask = again.tokenize(CAPTIONS[:2])
        assert torch.allclose(again.hidden_states(feats, ids, mask, "causal"),
                              stage1.hidden_states(feats, ids, mask, "causal"), atol=1e-5)
    bigger = build_model(tiny_spec(tiny_paths, num_query_tokens=8))
    with pytest.raises(CheckpointError, match="other shapes"):
        init_vpg_from_stage1(bigger.vpg, stage1)


def test_any_tokenizer_gets_cls_sep_pad(tiny_paths):
    torch.manual_seed(0)
    model = Stage1Model(dict(num_query_tokens=Q, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                             intermediate_size=64, dropout=0.0, tokenizer=str(tiny_paths["t5"]), vocab_size=1),
                        vision_width=32, embed_dim=16)
    tok = model.tokenizer
    ids, mask = model.tokenize(CAPTIONS[:2])
    assert ids[0, 0] == tok.cls_token_id and ids[0, int(mask[0].sum()) - 1] == tok.sep_token_id
    assert (ids[mask == 0] == tok.pad_token_id).all()
    assert model.vpg.text_embeddings.word_embeddings.num_embeddings == len(tok)
    assert all(torch.isfinite(v) for v in model.losses(_feats(b=2), CAPTIONS[:2]).values())


def test_stage1_recipe_runs_and_feeds_stage2(tiny_paths, tmp_path):
    import json

    from vpgtrans.recipes import build_recipe
    from vpgtrans.testing import tiny_images
    from vpgtrans.train.runner import init_weights, run_stage1_recipe

    lines = []
    for i, img in enumerate(tiny_images(8)):
        img.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": CAPTIONS[i % 4] + f" {i}"}))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    spec = tiny_spec(tiny_paths, tokenizer=str(tiny_paths["bert"]), vocab_size=1)
    recipe = build_recipe({
        "model": {"vision": spec["vision"], "vpg": spec["vpg"]},
        "data": {"train": str(tmp_path / "d.jsonl"), "val": str(tmp_path / "d.jsonl"),
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"lr": 1e-3, "batch_size": 4, "max_steps": 4, "eval_every": 2, "warmup_steps": 0},
        "eval": {"max_samples": 8, "batch_size": 4}}, name="stage1-test")
    echoed = []
    run = run_stage1_recipe(recipe, tmp_path / "run", progress=False, echo=echoed.append)
    assert run["status"] == "finished" and run["results"]["steps"] == 4
    metrics = run["results"]["metrics"]
    assert {"val_loss", "val_itc", "val_itm", "val_itg", "i2t_r1", "t2i_r1"} <= set(metrics)
    assert (tmp_path / "run" / "stage1" / "stage1.json").exists()
    stage2 = build_model(tiny_spec(tiny_paths))
    assert "stage-1" in init_weights(stage2, str(tmp_path / "run" / "stage1"))
    stage1 = load_stage1(tmp_path / "run" / "stage1").eval()
    stage2.eval()
    with torch.no_grad():
        feats = stage2.encode_images(stage2.vision.preprocess(tiny_images(2)))
        assert torch.allclose(stage2.vpg(feats), stage1.vpg(feats), atol=1e-5)


def test_train_cli_runs_a_stage1_recipe(tiny_paths, tmp_path):
    import json

    import yaml
    from click.testing import CliRunner

    from vpgtrans.cli import main
    from vpgtrans.testing import tiny_images

    lines = []
    for i, img in enumerate(tiny_images(4)):
        img.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": CAPTIONS[i]}))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    spec = tiny_spec(tiny_paths, tokenizer=str(tiny_paths["bert"]), vocab_size=1)
    recipe = {"name": "s1", "stage": 1, "model": {"vision": spec["vision"], "vpg": spec["vpg"]},
              "data": {"train": str(tmp_path / "d.jsonl")},
              "train": {"lr": 1e-3, "batch_size": 2, "max_steps": 2, "warmup_steps": 0}}
    (tmp_path / "s1.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["train", "--recipe", str(tmp_path / "s1.yaml"), "--out", str(tmp_path / "run"),
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "BLIP-2 stage 1" in result.output
    assert (tmp_path / "run" / "stage1" / "stage1.json").exists()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["stage"] == 1
