"""`vpgtrans surrogate`: first-K-layer surrogates in stock transformers, healing, surrogate-sourced transfer."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from vpgtrans.checkpoint import save_model
from vpgtrans.errors import ConfigError
from vpgtrans.cli import main
from vpgtrans.model import build_model
from vpgtrans.recipes import load_recipe
from vpgtrans.surrogate import final_norm, make_surrogate, read_surrogate
from vpgtrans.testing import WORDS, tiny_spec, write_caption_set
from vpgtrans.transfer import race
from vpgtrans.transfer.options import TransferOptions
from vpgtrans.transfer.plan import plan_lines, plan_transfer

QUIET = {"echo": lambda _: None}


def _full(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("llm", ["llama", "opt"])
def test_surrogate_is_the_first_k_layers(tiny_paths, tmp_path, llm):
    from transformers import AutoTokenizer

    out = tmp_path / "sur"
    manifest = make_surrogate(str(tiny_paths[llm]), 1, out, **QUIET)
    sur, full = _full(out), _full(tiny_paths[llm])  # stock transformers loads it like any causal LM
    assert sur.config.num_hidden_layers == 1 and full.config.num_hidden_layers == 2
    assert sur.config.surrogate_of["layers"] == 1 and sur.config.surrogate_of["of_layers"] == 2
    assert read_surrogate(out)["surrogate-of"] == manifest["surrogate-of"]
    saved, full_state = load_file(str(out / "model.safetensors")), full.state_dict()
    assert saved and all(torch.equal(v, full_state[k]) for k, v in saved.items())
    assert any(".layers.1." in k for k in full_state) and not any(".layers.1." in k for k in sur.state_dict())
    # Every tensor the surrogate uses is the full model's (tied LM head included).
    assert all(torch.equal(v, full_state[k]) for k, v in sur.state_dict().items())
    text = "a red circle to the left of a blue square"
    tok_s, tok_f = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tiny_paths[llm])
    assert tok_s(text).input_ids == tok_f(text).input_ids
    ids = tok_f(text, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = full(input_ids=ids, output_hidden_states=True).hidden_states[1]  # after decoder layer 0
        expected = full.lm_head(final_norm(full)(hidden))
        assert torch.allclose(sur(input_ids=ids).logits, expected, atol=1e-5)


def test_healing_moves_the_surrogate_towards_the_full_llm(tiny_paths, tmp_path):
    import random

    rng = random.Random(0)
    data = tmp_path / "heal.txt"
    data.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(80)))
    out = tmp_path / "healed"
    manifest = make_surrogate(str(tiny_paths["llama"]), 1, out, heal_steps=30, heal_data=data, heal_lr=1e-2, **QUIET)
    heal = manifest["heal"]
    assert heal["after"]["kl"] < heal["before"]["kl"] and heal["heldout_passages"] == 8
    assert manifest["surrogate-of"]["healed"] is True
    sur, full = _full(out).state_dict(), _full(tiny_paths["llama"]).state_dict()
    # Embeddings stay the full LLM's own (the graft relies on it); only the top layer and the norm moved.
    assert torch.equal(sur["model.embed_tokens.weight"], full["model.embed_tokens.weight"])
    changed = {k for k in sur if not torch.equal(sur[k], full[k])}
    assert changed and all(k.startswith(("model.layers.0.", "model.norm.")) for k in changed)


@pytest.fixture(scope="module")
def deep_llms(tmp_path_factory, tiny_paths):
    """5-layer versions of the tiny LLaMA and OPT (room for first K + translator + last L with layers between)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root, out = tmp_path_factory.mktemp("deep-llms"), {}
    for name in ("llama", "opt"):
        cfg = AutoConfig.from_pretrained(tiny_paths[name])
        cfg.num_hidden_layers = 5
        torch.manual_seed(1)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(root / name)
        AutoTokenizer.from_pretrained(tiny_paths[name]).save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("llm", ["llama", "opt"])
def test_translator_surrogate_keeps_first_k_translator_and_last_layers(deep_llms, tmp_path, llm):
    out = tmp_path / "sur"
    manifest = make_surrogate(str(deep_llms[llm]), 1, out, last_layers=1, **QUIET)
    sur, full = _full(out), _full(deep_llms[llm])
    assert sur.config.num_hidden_layers == 3 and manifest["surrogate-of"]["kept_layers"] == [0, 1, 4]
    prefix = "model.layers." if llm == "llama" else "model.decoder.layers."
    full_state = full.state_dict()
    for k, v in sur.state_dict().items():  # layer i of the surrogate is layer kept[i] of the full LLM
        src = k
        if k.startswith(prefix):
            i, rest = k[len(prefix):].split(".", 1)
            src = f"{prefix}{[0, 1, 4][int(i)]}.{rest}"
        assert torch.equal(v, full_state[src]), k
    # The bypassed layers 2 and 3 are gone; the forward is the full model's with them skipped.
    ids = torch.tensor([[1, 5, 7, 9, 4]])
    layers = full.model.layers if llm == "llama" else full.model.decoder.layers
    skipped = torch.nn.ModuleList([layers[i] for i in (0, 1, 4)])
    if llm == "llama":
        full.model.layers = skipped
    else:
        full.model.decoder.layers = skipped
    full.config.num_hidden_layers = 3
    with torch.no_grad():
        assert torch.allclose(sur(input_ids=ids).logits, full(input_ids=ids, use_cache=False).logits, atol=1e-5)
        # Generation uses the KV cache, indexed by position in the stack: it must agree with the cache-less run.
        gen = sur.generate(ids, max_new_tokens=4, do_sample=False)
        step = ids
        for _ in range(4):
            step = torch.cat([step, sur(input_ids=step, use_cache=False).logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(gen, step)


def test_healing_a_translator_trains_only_the_translator(deep_llms, tmp_path):
    import random

    rng = random.Random(0)
    data = tmp_path / "heal.txt"
    data.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(80)))
    out = tmp_path / "healed"
    manifest = make_surrogate(str(deep_llms["llama"]), 1, out, last_layers=1, heal_steps=30, heal_data=data,
                              heal_lr=1e-2, **QUIET)
    heal = manifest["heal"]
    assert heal["after"]["kl"] < heal["before"]["kl"] and heal["trained"] == "translator (decoder layer 1)"
    sur, full = _full(out).state_dict(), _full(deep_llms["llama"]).state_dict()
    changed = {k for k in sur if not torch.equal(sur[k], full[k.replace("layers.2.", "layers.4.")])}
    # Everything but the translator is the full LLM's own: first layer, last layer, norm, embeddings, head.
    assert changed and all(k.startswith("model.layers.1.") for k in changed)


@pytest.fixture(scope="module")
def surrogate_source(tmp_path_factory, tiny_paths):
    """A tiny captioning set and a VPG model trained (well, perturbed) on a 1-layer surrogate of tiny LLaMA."""
    root = tmp_path_factory.mktemp("surrogate-transfer")
    write_caption_set(root, 8, 5, ["a red circle on the left", "a blue circle on the left"])
    sur = root / "sur"
    make_surrogate(str(tiny_paths["llama"]), 1, sur, **QUIET)
    spec = tiny_spec(tiny_paths, "llama")
    spec["llm"]["path"] = str(sur)
    torch.manual_seed(0)
    model = build_model(spec)
    with torch.no_grad():
        for p in [*model.vpg.parameters(), *model.projector.parameters()]:
            p.add_(0.01 * torch.randn_like(p))
    return {"root": root, "data": str(root / "train.jsonl"), "src": save_model(model, root / "src"),
            "projector": {k: v.clone() for k, v in model.projector.state_dict().items()}}


def test_graft_is_the_identity_for_a_surrogate_source(surrogate_source, tiny_paths):
    s = surrogate_source
    def plan_to(dst, **kw):
        return plan_transfer(TransferOptions(src=str(s["src"]), dst=str(dst), data=s["data"], recipe="vpgtrans_world",
                                             out=s["root"] / "unused", **kw))

    plan = plan_to(tiny_paths["llama"])
    dry = race.prepare(plan, fit=False, **QUIET)  # --dry-run names the converter 'auto' will pick
    stage0 = next(x for x in plan_lines(plan, dry.model, dry.pairs, 4) if x.startswith("stage 0"))
    assert "converter identity (auto: identical vocabularies and widths)" in stage0
    prepared = race.prepare(plan, **QUIET)
    assert prepared.converter == "identity"  # 'auto' with identical vocabularies
    assert prepared.pairs.method == "identity" and prepared.pairs.dst_coverage == 1.0
    assert prepared.fit.heldout_cosine == pytest.approx(1.0, abs=1e-5)
    # Zero-shot graft: the surrogate's projector lands unchanged on the full LLM.
    for k, v in prepared.model.projector.state_dict().items():
        assert torch.allclose(v, s["projector"][k], atol=1e-6)
    # A different vocabulary still gets the fitted default.
    other = plan_to(tiny_paths["opt"], min_coverage=0.0)
    assert race.prepare(other, **QUIET).converter == "linear-cosine"
    # The warm-up LR: 1x the recipe's for a surrogate of the destination (its projector already fits), else the
    # recipe's transfer.warmup_lr_scale (the world's: its epochs are ~4x shorter than the paper's), else 5x.
    assert plan.warmup_lr_scale == 1.0 and plan.warmup.train.lr == plan.finetune.train.lr
    assert any("surrogate of the destination" in n for n in plan.notes)
    world_scale = load_recipe("vpgtrans_world").transfer.warmup_lr_scale
    assert world_scale is not None and world_scale > 5
    assert other.warmup_lr_scale == world_scale
    assert other.warmup.train.lr == pytest.approx(world_scale * other.finetune.train.lr)
    assert any("transfer.warmup_lr_scale" in n for n in other.notes)
    paper = plan_to(tiny_paths["opt"], min_coverage=0.0, overrides=("transfer.warmup_lr_scale=null",))
    assert paper.warmup_lr_scale == 5.0 and paper.warmup.train.lr == pytest.approx(5 * paper.finetune.train.lr)
    given = plan_to(tiny_paths["llama"], warmup_lr_scale=5.0)
    assert given.warmup.train.lr == pytest.approx(5 * given.finetune.train.lr)
    with pytest.raises(ConfigError, match="transfer.warmup_lr_scale must be positive"):
        plan_to(tiny_paths["opt"], min_coverage=0.0, overrides=("transfer.warmup_lr_scale=-1",))


def test_surrogate_sourced_transfer_end_to_end(surrogate_source, tiny_paths, tmp_path):
    s, out = surrogate_source, tmp_path / "t"
    args = ["transfer", "--src", str(s["src"]), "--dst", str(tiny_paths["llama"]), "--data", s["data"],
            "--out", str(out), "--warmup-epochs", "0.5", "--compare-scratch", "--no-progress",
            "--recipe", "vpgtrans_world", "train.batch_size=2", "train.max_steps=3", "train.eval_every=1",
            "train.save_every=0", "train.max_text_len=12", "eval.metrics=[val_loss]", "data.max_val_samples=4",
            f"data.val={s['data']}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["converter"]["converter"] == "identity" and report["converter"]["dst_coverage"] == 1.0
    assert report["source_llm"]["path"].endswith("sur") and report["stages"]["warmup"]["steps"] >= 1
    assert report["speedup"]["metric"] == "val_loss" and "ratio" in result.output
    # The zero-shot graft is scored before any training, with the recipe's metric.
    assert report["zero_shot"]["val_loss"] > 0 and "zero-shot graft (before training): val_loss" in result.output
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    assert manifest["spec"]["llm"]["path"] == str(tiny_paths["llama"])
    assert manifest["transfer"]["warmup_lr_scale"] == 1.0


@pytest.mark.parametrize("llm, layers, extra, expected", [
    ("llama", "0", [], "--layers 0 is out of range"),
    ("llama", "3", [], "has 2 decoder layers"),
    ("t5", "1", [], "encoder-decoder"),
    ("llama", "1", ["--heal-steps", "5"], "--heal-steps needs --heal-data"),
    ("llama", "1", ["--last-layers", "1"], "bypass no layer"),
    ("llama", "1", ["--last-layers", "-1"], "--last-layers -1 is negative"),
])
def test_bad_input_is_one_line(tiny_paths, tmp_path, llm, layers, extra, expected):
    out = tmp_path / "sur"
    result = CliRunner().invoke(main, ["surrogate", "--llm", str(tiny_paths[llm]), "--layers", layers,
                                       "--out", str(out), *extra])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert not out.exists()


def test_cli_writes_a_surrogate_and_refuses_to_overwrite(tiny_paths, tmp_path):
    out = tmp_path / "sur"
    args = ["surrogate", "--llm", str(tiny_paths["opt"]), "--layers", "1", "--out", str(out)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0 and "1 of 2 decoder layers" in first.output, first.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "--force" in again.output
    assert CliRunner().invoke(main, [*args, "--force"]).exit_code == 0
