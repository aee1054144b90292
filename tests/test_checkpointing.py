"""Activation checkpointing through the frozen LLM: same loss and gradients, gradients still reach the soft
prompts, and less memory held for the backward pass."""

from __future__ import annotations

import pytest
import torch

from vpgtrans.interfaces import TextSample
from vpgtrans.memory import TensorMemoryTracker, saved_activation_bytes
from vpgtrans.model import build_model
from vpgtrans.testing import tiny_spec

CAPTIONS = ["a red circle on the left of a blue square", "two small green stars", "the tiny black triangle",
            "a large yellow square above the white circle"]


def _model(paths, llm: str, lora: bool = False):
    spec = tiny_spec(paths, llm=llm)
    if lora:
        spec["lora"] = {"r": 4, "dropout": 0.1}  # dropout: the replay must draw the same masks
    torch.manual_seed(0)
    return build_model(spec)


def _loss_and_grads(model, checkpointing: bool, feats: torch.Tensor) -> tuple[float, dict[str, torch.Tensor], int]:
    model.set_gradient_checkpointing(checkpointing)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = []
    saved = saved_activation_bytes(lambda: out.append(model(feats, [TextSample(target=c) for c in CAPTIONS])),
                                   exclude=model.parameters())
    out[0].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(out[0].detach()), grads, saved


@pytest.mark.parametrize("llm,lora", [("opt", False), ("llama", False), ("t5", False), ("llama", True)])
def test_checkpointing_gives_the_same_loss_and_gradients(tiny_paths, llm, lora):
    model = _model(tiny_paths, llm, lora)
    feats = torch.randn(len(CAPTIONS), model.vision.num_tokens, model.vision.hidden_size,
                        generator=torch.Generator().manual_seed(2))
    loss0, grads0, saved0 = _loss_and_grads(model, False, feats)
    loss1, grads1, saved1 = _loss_and_grads(model, True, feats)
    assert saved1 < 0.8 * saved0  # the LLM's layers really were checkpointed
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    assert set(grads1) == set(grads0)
    assert any(n.startswith("vpg.") for n in grads0) and "projector.weight" in grads0
    assert any("lora_" in n for n in grads0) == lora
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-7, msg=name)
    # Gradients reach the soft prompts through the checkpointed frozen layers.
    assert grads1["projector.weight"].abs().sum() > 0


def test_checkpointing_keeps_fewer_activations_and_can_be_switched_off(tiny_paths):
    model = _model(tiny_paths, "opt")
    feats = torch.randn(len(CAPTIONS), model.vision.num_tokens, model.vision.hidden_size)
    samples = [TextSample(target=c) for c in CAPTIONS]
    full = saved_activation_bytes(lambda: model(feats, samples), exclude=model.parameters())
    model.set_gradient_checkpointing(True)
    ckpt = saved_activation_bytes(lambda: model(feats, samples), exclude=model.parameters())
    model.set_gradient_checkpointing(False)
    again = saved_activation_bytes(lambda: model(feats, samples), exclude=model.parameters())
    assert ckpt < 0.8 * full and again == full


@pytest.mark.slow
def test_checkpointing_lowers_measured_peak_memory_of_a_training_step(tmp_path):
    """An OPT deep and wide enough for activations to matter: 12 layers × 256 wide, batch 8 × ~100 tokens."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    llm = OPTForCausalLM(OPTConfig(vocab_size=512, hidden_size=256, ffn_dim=1024, num_hidden_layers=12,
                                   num_attention_heads=8, word_embed_proj_dim=256, max_position_embeddings=256))
    llm.save_pretrained(tmp_path / "opt")
    _tokenizer_like(tmp_path / "opt")
    peaks = {}
    from vpgtrans_adapters.llm import CausalLMBackend, LLMConfig

    backend = CausalLMBackend(LLMConfig(path=str(tmp_path / "opt")))
    prompts = torch.randn(8, 32, 256, requires_grad=True)
    samples = [TextSample(target=" ".join(["a red circle"] * 20))] * 8
    for on in (False, True):
        backend.set_gradient_checkpointing(on)
        tracker = TensorMemoryTracker(existing=list(backend.parameters()) + [prompts])
        with tracker:
            backend.loss(prompts, samples, max_text_len=64).backward()
        peaks[on] = tracker.peak - tracker.baseline
        prompts.grad = None
    assert peaks[True] < 0.75 * peaks[False], peaks


def _tokenizer_like(out) -> None:
    from vpgtrans.testing import _bpe_bytelevel, _save_tokenizer

    raw, sp = _bpe_bytelevel()
    _save_tokenizer(raw, sp, out)


def test_recipe_key_trains_the_same_run(tmp_path, tiny_paths):
    """`train.gradient_checkpointing=true` in a real `vpgtrans train` run: the same logged losses as without."""
    import json

    import yaml
    from click.testing import CliRunner

    from vpgtrans.cli import main
    from vpgtrans.testing import tiny_images
    from vpgtrans.train import read_log

    (tmp_path / "img").mkdir()
    rows = []
    for i, im in enumerate(tiny_images(8, seed=4)):
        im.save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "caption": CAPTIONS[i % len(CAPTIONS)]})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"name": "tiny_ckpt", "model": tiny_spec(tiny_paths, llm="llama"),
              "data": {"train": str(tmp_path / "train.jsonl")},
              "train": {"batch_size": 4, "lr": 1e-3, "max_steps": 3, "max_text_len": 16}, "eval": {"metrics": []}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    losses = {}
    for on in ("false", "true"):
        out = tmp_path / f"run-{on}"
        result = CliRunner().invoke(main, ["train", "--recipe", str(tmp_path / "r.yaml"), "--out", str(out),
                                           "--no-progress", f"train.gradient_checkpointing={on}"])
        assert result.exit_code == 0, result.output
        losses[on] = [r["loss"] for r in read_log(out / "log.jsonl")]
        assert json.loads((out / "run.json").read_text())["plan"]["gradient_checkpointing"] == (on == "true")
    assert len(losses["true"]) == 3 and losses["true"][0] != losses["true"][-1]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-6)
