"""Source VPGs from a Hugging Face BLIP-2 directory, a LAVIS-style .pth and a vpgtrans model directory."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from vpgtrans import registry
from vpgtrans.errors import CheckpointError, WeightsNotFoundError
from vpgtrans.transfer.sources import load_source


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    """A tiny real Blip2ForConditionalGeneration (OPT text model) saved sharded and as one file."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig,
                              OPTConfig)

    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=8).to_dict(),
        # One 64-wide head: LAVIS files do not store the head count, and 64-wide heads are what is inferred.
        qformer_config=Blip2QFormerConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=1,
                                          intermediate_size=96, encoder_hidden_size=24, vocab_size=50).to_dict(),
        text_config=OPTConfig(vocab_size=60, hidden_size=40, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                              max_position_embeddings=64, word_embed_proj_dim=40).to_dict(),
        num_query_tokens=5)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # nothing left at its init value, so a mix-up cannot go unnoticed
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("blip2")
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    model.save_pretrained(root / "single")
    return model, root


def _theirs(model) -> dict[str, torch.Tensor]:
    """What each of our keys must equal, read off the transformers model."""
    out = {"vpg.query_tokens": model.query_tokens.detach(),
           "projector.weight": model.language_projection.weight.detach(),
           "projector.bias": model.language_projection.bias.detach()}
    out.update({f"vpg.qformer.{k}": v for k, v in model.qformer.state_dict().items()})
    return out


def _lavis_state(model) -> dict[str, torch.Tensor]:
    """The model's weights under LAVIS / BERT key names, plus parts a VPG must ignore."""
    state = {"query_tokens": model.query_tokens.detach().clone(),
             "ln_vision.weight": model.vision_model.post_layernorm.weight.detach().clone(),
             "ln_vision.bias": model.vision_model.post_layernorm.bias.detach().clone(),
             "opt_proj.weight": model.language_projection.weight.detach().clone(),
             "opt_proj.bias": model.language_projection.bias.detach().clone(),
             "opt_model.model.decoder.embed_tokens.weight": torch.randn(60, 40),
             "Qformer.cls.predictions.bias": torch.randn(50),
             "Qformer.bert.embeddings.word_embeddings.weight": torch.randn(50, 64)}
    for key, value in model.qformer.state_dict().items():
        key = key.replace("layernorm.", "embeddings.LayerNorm.", 1) if key.startswith("layernorm.") else key
        key = key.replace(".attention.attention.", ".attention.self.").replace(".crossattention.attention.",
                                                                               ".crossattention.self.")
        state[f"Qformer.bert.{key}"] = value.detach().clone()
    # The text-only feed-forward layers of stage 1, which stage 2 never uses.
    state["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.randn(96, 64)
    state["Qformer.bert.encoder.layer.0.output.dense.weight"] = torch.randn(64, 96)
    return state


def _vpg_from(source) -> torch.nn.Module:
    """Rebuild the VPG with the registered `qformer` component and load the source weights strictly."""
    spec = {k: v for k, v in source.vpg_spec.items() if k != "name"}
    vpg = registry.build("vpg", source.vpg_spec["name"], spec)
    vpg.load_state_dict(source.vpg_state(), strict=True)
    return vpg.eval()


@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_hf_blip2_directory(blip2, layout):
    model, root = blip2
    src = load_source(root / layout)
    theirs = _theirs(model)
    assert src.format == "hf-blip2" and set(src.state) == set(theirs)
    assert all(torch.equal(src.state[k], theirs[k]) for k in theirs)
    assert src.num_query_tokens == 5 and (src.projector_in, src.projector_out) == (64, 40)
    assert src.qformer_config["num_hidden_layers"] == 3 and src.qformer_config["encoder_hidden_size"] == 24
    assert src.source_llm == "opt"
    assert torch.equal(src.vision_post_layernorm["weight"], model.vision_model.post_layernorm.weight)
    x = torch.randn(2, 64)
    assert torch.allclose(src.projector()(x), model.language_projection(x))
    vpg = _vpg_from(src)
    features = torch.randn(2, 9, 24)
    with torch.no_grad():
        ours = vpg(features)
        ref = model.qformer(query_embeds=model.query_tokens.expand(2, -1, -1), encoder_hidden_states=features)
    assert torch.allclose(ours, ref.last_hidden_state, atol=1e-5)


def test_lavis_pth_needs_trust_and_maps_every_tensor(blip2, tmp_path):
    model, _ = blip2
    path = tmp_path / "blip2_opt.pth"
    torch.save({"model": _lavis_state(model), "config": {"model": {"opt_model": "facebook/opt-2.7b"}}, "epoch": 3},
               path)
    with pytest.raises(CheckpointError, match="--trust-pickle") as info:
        load_source(path)
    assert "trusted source" in str(info.value) and "\n" not in str(info.value)

    src = load_source(path, trust_pickle=True)
    theirs = _theirs(model)
    theirs["vpg.ln_vision.weight"] = model.vision_model.post_layernorm.weight.detach()
    theirs["vpg.ln_vision.bias"] = model.vision_model.post_layernorm.bias.detach()
    assert src.format == "lavis-pth" and set(src.state) == set(theirs)
    assert all(torch.equal(src.state[k], theirs[k]) for k in theirs)
    assert src.source_llm == "facebook/opt-2.7b"
    hf = load_source(blip2[1] / "single")
    assert src.qformer_config == hf.qformer_config  # inferred from shapes alone
    assert any("dropped 2" in n for n in src.notes)
    assert src.vpg_spec["vision_layernorm"] is True
    vpg = _vpg_from(src)
    assert torch.equal(vpg.ln_vision.weight, model.vision_model.post_layernorm.weight)


def test_lavis_variants_and_refusals(blip2, tmp_path):
    model, _ = blip2
    state = _lavis_state(model)
    llama = {("llama_proj." + k[len("opt_proj."):] if k.startswith("opt_proj.") else f"module.{k}"): v
             for k, v in state.items()}
    torch.save(llama, tmp_path / "bare.pth")  # no "model" wrapper, DDP prefixes, MiniGPT-4's projector name
    src = load_source(tmp_path / "bare.pth", trust_pickle=True)
    assert src.source_llm == "llama" and torch.equal(src.state["projector.weight"], state["opt_proj.weight"])

    stage1 = {k: v for k, v in state.items() if not k.startswith("opt_proj.")}
    torch.save({"model": stage1}, tmp_path / "stage1.pth")
    with pytest.raises(CheckpointError, match="no projector"):
        load_source(tmp_path / "stage1.pth", trust_pickle=True)

    torch.save({"model": {"llama_proj.weight": torch.randn(4, 4)}}, tmp_path / "minigpt4.pth")
    with pytest.raises(CheckpointError, match="no Q-Former"):
        load_source(tmp_path / "minigpt4.pth", trust_pickle=True)

    torch.save({"model": state, "extra": _Opaque()}, tmp_path / "objects.pth")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_source(tmp_path / "objects.pth", trust_pickle=True)


class _Opaque:
    """An arbitrary object: weights_only loading must refuse to rebuild it."""


def test_vpgtrans_model_directory(blip2, tmp_path):
    from safetensors.torch import save_file

    hf = load_source(blip2[1] / "single")
    out = tmp_path / "model"
    out.mkdir()
    state = {k: v.contiguous() for k, v in hf.state.items()}
    state["llm.lora_A.weight"] = torch.zeros(2, 2)  # an adapter a source VPG does not carry over
    save_file(state, str(out / "model.safetensors"))
    manifest = {"format": "vpgtrans-model", "format_version": 1,
                "spec": {"vision": {"name": "blip2-vit", "path": "world-vit"}, "vpg": hf.vpg_spec,
                         "llm": {"name": "opt", "path": "world-opt-s"}}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    src = load_source(out)
    assert src.format == "vpgtrans" and set(src.state) == set(hf.state)
    assert all(torch.equal(src.state[k], hf.state[k]) for k in hf.state)
    assert src.qformer_config == hf.qformer_config and src.vpg_spec == hf.vpg_spec
    assert src.source_llm == "world-opt-s" and "vpgtrans source" in src.summary()


def test_directory_written_by_save_model(tiny_paths, tmp_path):
    from vpgtrans.checkpoint import save_model
    from vpgtrans.model import build_model
    from vpgtrans.testing import tiny_spec

    model = build_model(tiny_spec(tiny_paths))
    save_model(model, tmp_path / "m")
    src = load_source(tmp_path / "m")
    theirs = model.trainable_state_dict()
    assert set(src.state) == set(theirs) and all(torch.equal(src.state[k], theirs[k]) for k in theirs)
    assert src.vpg_spec["name"] == "qformer" and src.num_query_tokens == model.vpg.config.num_query_tokens
    assert (src.projector_in, src.projector_out) == (model.projector.in_features, model.projector.out_features)
    _vpg_from(src)


def test_unknown_sources(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="vpgtrans model directory.*BLIP-2.*LAVIS"):
        load_source(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="format"):
        load_source(tmp_path)
    with pytest.raises(CheckpointError, match="aliases"):
        load_source(str(tmp_path / "missing"))
    with pytest.raises(WeightsNotFoundError, match="hf download Salesforce/blip2-opt-2.7b"):
        load_source("opt-2.7b")


def _lavis_reference(model, vpg, pixels):
    """What LAVIS computes: the ViT without its final norm, then the source's ln_vision, then the Q-Former."""
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        return vpg.qformer(query_embeds=vpg.query_tokens.expand(len(pixels), -1, -1),
                           encoder_hidden_states=vpg.ln_vision(hidden)).last_hidden_state


@pytest.mark.parametrize("same_norm", [True, False])
def test_lavis_ln_vision_is_applied_once_on_a_tower_that_ends_with_it(blip2, tmp_path, same_norm):
    from vpgtrans.transfer.sources import reconcile_ln_vision

    model = copy.deepcopy(blip2[0])
    with torch.no_grad():  # a trained ln_vision is far from the identity (else LN(LN(x)) ≈ LN(x) hides the bug)
        model.vision_model.post_layernorm.weight.normal_(1.0, 0.5)
        model.vision_model.post_layernorm.bias.normal_(0.0, 0.5)
    root = tmp_path
    model.save_pretrained(root / "single")
    state = _lavis_state(model)
    if not same_norm:  # another BLIP-2 model's ln_vision: LAVIS trains it with the Q-Former
        state["ln_vision.weight"] = state["ln_vision.weight"] * 1.5 + 0.1
    torch.save({"model": state}, tmp_path / "lavis.pth")
    src = load_source(tmp_path / "lavis.pth", trust_pickle=True)
    reference_vpg = _vpg_from(src)  # as loaded: its own ln_vision
    pixels = torch.randn(2, 3, 16, 16)
    want = _lavis_reference(model, reference_vpg, pixels)

    vision_spec = {"name": "blip2-vit", "path": str(root / "single")}
    spec, note = reconcile_ln_vision(src, vision_spec)
    tower = registry.build("vision", "blip2-vit", {k: v for k, v in spec.items() if k != "name"})
    vpg = _vpg_from(src)
    with torch.no_grad():
        got = vpg(tower(pixels))
        twice = reference_vpg(registry.build("vision", "blip2-vit", {"path": str(root / "single")})(pixels))
    # Same norm: exact up to the epsilons (the ViT's 1e-6 where LAVIS's ln_vision has 1e-5).
    torch.testing.assert_close(got, want, atol=1e-3 if same_norm else 1e-5, rtol=0)
    assert (twice - want).abs().max() > 2e-2  # what applying it on top of post_layernorm gave
    if same_norm:
        assert "does not apply it a second time" in note and spec == vision_spec
        assert src.vpg_spec["vision_layernorm"] is False and isinstance(vpg.ln_vision, torch.nn.Identity)
    else:
        assert "read before it (layer 1)" in note and spec["layer"] == 1
