"""Assembly of vision → VPG → projector → LLM on tiny real models loaded from disk."""

from __future__ import annotations

import pytest
import torch

from vpgtrans.errors import ConfigError
from vpgtrans.interfaces import GenerationConfig, TextSample
from vpgtrans.model import Template, build_model
from vpgtrans.testing import tiny_images, tiny_spec

SAMPLES = [TextSample(target="a red circle left of a blue square"),
           TextSample(after="what colour is it?", target="red")]


@pytest.mark.parametrize("llm", ["opt", "llama", "t5"])
@pytest.mark.parametrize("vision", ["blip2-vit", "clip-vit"])
def test_loss_backprops_only_into_vpg_and_projector(tiny_paths, llm, vision):
    torch.manual_seed(0)
    model = build_model(tiny_spec(tiny_paths, llm=llm, vision=vision))
    model.train()
    pixels = model.vision.preprocess(tiny_images(2))
    feats = model.encode_images(pixels)
    assert feats.shape == (2, model.vision.num_tokens, model.vision.hidden_size)
    loss = model(feats, SAMPLES)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        trains = name.startswith(("vpg.", "projector."))
        assert p.requires_grad == trains, name
        if not trains:
            assert p.grad is None, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vpg.parameters())
    assert model.projector.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("llm", ["opt", "llama", "t5"])
def test_generate_returns_strings_greedy_and_beam(tiny_paths, llm):
    torch.manual_seed(0)
    model = build_model(tiny_spec(tiny_paths, llm=llm))
    for beams in (1, 3):
        out = model.generate(tiny_images(2), "describe", config=GenerationConfig(max_new_tokens=4, num_beams=beams))
        assert len(out) == 2 and all(isinstance(t, str) for t in out)


def test_parameter_report_states_what_trains(tiny_paths):
    model = build_model(tiny_spec(tiny_paths))
    report = model.parameter_report()
    assert report["vision"]["trainable"] == 0 and report["llm"]["trainable"] == 0
    assert report["vpg"]["frozen"] == 0 and report["projector"]["trainable"] == 32 * 32 + 32
    text = model.describe_trainable()
    assert "qformer" in text and "opt" in text and "trainable" in text


def test_llm_detected_from_checkpoint_when_name_missing(tiny_paths):
    spec = tiny_spec(tiny_paths, llm="t5")
    del spec["llm"]["name"]
    model = build_model(spec)
    assert model.spec.llm["name"] == "flant5" and model.llm.is_encoder_decoder


def test_prompt_positions_are_masked_and_soft_prompts_matter(tiny_paths):
    torch.manual_seed(0)
    model = build_model(tiny_spec(tiny_paths, llm="llama"))
    feats = model.encode_images(model.vision.preprocess(tiny_images(2)))
    ids, soft, labels, attn = model.llm._sequences(4, SAMPLES, 64, True, False)
    assert (labels[soft] == -100).all()
    assert soft.sum(1).tolist() == [4, 4]
    # Different images → different soft prompts → different loss.
    l1 = model(feats[:1], SAMPLES[:1])
    l2 = model(feats[1:], SAMPLES[:1])
    assert l1.item() != l2.item()


def test_minigpt4_template_splits_around_image():
    t = Template(text="###Human: <Img><ImageHere></Img> {instruction} ###Assistant: ", end="###")
    s = t.sample("Describe this image.", "a cat")
    assert s.before == "###Human: <Img>" and s.after == "</Img> Describe this image. ###Assistant: "
    assert s.target == "a cat###"
    with pytest.raises(ConfigError):
        Template(text="no slot").sample()


def test_projector_width_mismatch_is_clear(tiny_paths):
    from vpgtrans.model import VisionLanguageModel

    model = build_model(tiny_spec(tiny_paths))
    with pytest.raises(ConfigError, match="projector output width 7 != LLM embedding width"):
        VisionLanguageModel(model.vision, model.vpg, model.llm, model.spec,
                            projector=torch.nn.Linear(model.vpg.output_dim, 7))
    with pytest.raises(ConfigError, match="projector input width 5 != VPG output width"):
        VisionLanguageModel(model.vision, model.vpg, model.llm, model.spec,
                            projector=torch.nn.Linear(5, model.llm.embed_dim))


def test_qformer_initialised_from_bert(tiny_paths):
    from transformers import BertModel

    spec = tiny_spec(tiny_paths)
    spec["vpg"]["init_from"] = str(tiny_paths["bert"])
    model = build_model(spec)
    bert = BertModel.from_pretrained(tiny_paths["bert"])
    q = model.vpg.qformer.encoder.layer[0]
    assert torch.equal(q.attention.attention.query.weight, bert.encoder.layer[0].attention.self.query.weight)
    assert torch.equal(q.intermediate_query.dense.weight, bert.encoder.layer[0].intermediate.dense.weight)
    assert torch.equal(model.vpg.qformer.layernorm.weight, bert.embeddings.LayerNorm.weight)


def test_vision_tower_cut_out_of_full_blip2_checkpoint(tiny_paths, tmp_path):
    """`eva-vit-g` points at a full BLIP-2 checkpoint: the tower must load with its real weights."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2VisionModel, OPTConfig

    from vpgtrans.registry import build

    vis = Blip2VisionModel.from_pretrained(tiny_paths["blip2-vit"])
    cfg = Blip2Config(vision_config=vis.config.to_dict(),
                      qformer_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                                      "intermediate_size": 64, "encoder_hidden_size": 32},
                      text_config=OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                            num_attention_heads=2, word_embed_proj_dim=16).to_dict(),
                      num_query_tokens=4)
    full = Blip2ForConditionalGeneration(cfg)
    full.vision_model.load_state_dict(vis.state_dict())
    full.save_pretrained(tmp_path / "blip2")
    enc = build("vision", "blip2-vit", {"path": str(tmp_path / "blip2")})
    for (k, a), b in zip(vis.state_dict().items(), enc.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("llm", ["opt", "opt-m", "llama"])
def test_loss_at_target_positions_only_equals_stock_forward(tiny_paths, llm):
    # The backend skips the LM head at non-target positions; loss and gradients must be the stock model's.
    torch.manual_seed(0)
    model = build_model(tiny_spec(tiny_paths, llm=llm))
    backend = model.llm
    assert type(backend.model).__name__ in ("OPTForCausalLM", "LlamaForCausalLM")
    prompts = torch.randn(2, 4, backend.embed_dim, requires_grad=True)
    fast = backend.loss(prompts, SAMPLES, 64)
    (g_fast,) = torch.autograd.grad(fast, prompts)
    stock = backend._forward(prompts, SAMPLES, 64).loss
    (g_stock,) = torch.autograd.grad(stock, prompts)
    assert torch.allclose(fast, stock, atol=1e-6, rtol=1e-5)
    assert torch.allclose(g_fast, g_stock, atol=1e-7, rtol=1e-4)
    # A target token that changes changes the loss (the fast path reads the labels).
    other = [SAMPLES[0], TextSample(after="what colour is it?", target="blue")]
    assert backend.loss(prompts, other, 64).item() != fast.item()
