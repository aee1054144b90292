"""Every VPG (Q-Former, InstructBLIP Q-Former, linear, MLP, abstractor) with every LLM backend."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from vpgtrans.errors import ConfigError
from vpgtrans.interfaces import GenerationConfig, TextSample
from vpgtrans.model import build_model
from vpgtrans.registry import describe, get
from vpgtrans.testing import tiny_images, tiny_spec

VPGS = ["qformer", "instruct-qformer", "linear", "mlp", "abstractor"]
SAMPLES = [TextSample(target="a red circle left of a blue square"), TextSample(after="what colour?", target="red")]
INSTRUCTIONS = ["describe the image", "what colour is the circle?"]
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vpg(paths, name: str) -> dict:
    """Small configs of each VPG for the tiny (width 32) models."""
    return {"qformer": {}, "instruct-qformer": {"tokenizer": str(paths["bert"])}, "linear": {"drop_cls": True},
            "mlp": {"hidden_size": 48},
            "abstractor": dict(num_query_tokens=6, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64)}[name]


def build(paths, vpg: str, llm: str = "opt", **extra):
    torch.manual_seed(0)
    return build_model(tiny_spec(paths, llm=llm, vpg=vpg, **{**tiny_vpg(paths, vpg), **extra}))


def features(model, n: int = 2) -> torch.Tensor:
    return model.encode_images(model.vision.preprocess(tiny_images(n)))


@pytest.mark.parametrize("llm", ["opt", "llama", "t5"])
@pytest.mark.parametrize("vpg", VPGS)
def test_every_vpg_trains_with_every_llm_and_generates(tiny_paths, vpg, llm):
    model = build(tiny_paths, vpg, llm)
    feats = features(model)
    instructions = INSTRUCTIONS if model.vpg.uses_instruction else None
    prompts = model.prompts(feats, instructions)
    assert prompts.shape == (2, model.vpg.num_prompts(feats.shape[1]), model.llm.embed_dim)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = []
    for step in range(3):
        loss = model(feats, SAMPLES, instructions)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                trains = name.startswith(("vpg.", "projector."))
                assert p.requires_grad == trains, name
                assert (p.grad is not None) == trains, name  # frozen parts get no gradient at all
            assert model.projector.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("vpg.", "projector.")) for k in changed), sorted(changed)[:5]
    if any(True for _ in model.vpg.parameters()):
        assert any(k.startswith("vpg.") for k in changed)
    model.eval()
    out = model.generate(tiny_images(2), "describe", config=GenerationConfig(max_new_tokens=4))
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


@pytest.mark.parametrize("vpg", VPGS)
def test_transfer_merge_needs_only_the_final_projector(tiny_paths, vpg):
    """VPGTrans: inherit the VPG, fold a converter into the projector; prompts become conv(source prompts)."""
    from vpgtrans.transfer.merge import merge_projector

    src, dst = build(tiny_paths, vpg, "opt"), build(tiny_paths, vpg, "llama")
    dst.vpg.load_state_dict(src.vpg.state_dict())
    torch.manual_seed(1)
    conv = torch.nn.Linear(src.llm.embed_dim, dst.llm.embed_dim)
    dst.projector = merge_projector(src.projector, conv)
    src.eval(), dst.eval()
    feats = features(src)
    instructions = INSTRUCTIONS if src.vpg.uses_instruction else None
    with torch.no_grad():
        expected = conv(src.prompts(feats, instructions))
        assert torch.allclose(dst.prompts(feats, instructions), expected, atol=1e-5)
        assert torch.isfinite(dst(feats, SAMPLES, instructions))


def test_linear_is_identity_and_drops_cls_on_request(tiny_paths):
    model = build(tiny_paths, "linear", drop_cls=True)
    feats = features(model)
    assert torch.equal(model.vpg(feats), feats[:, 1:])
    assert model.vpg.num_prompts(feats.shape[1]) == feats.shape[1] - 1
    assert sum(p.numel() for p in model.vpg.parameters()) == 0
    keep = build(tiny_paths, "linear", drop_cls=False)
    assert torch.equal(keep.vpg(feats), feats) and keep.vpg.output_dim == model.vision.hidden_size


def test_mlp_is_linear_gelu_per_patch(tiny_paths):
    model = build(tiny_paths, "mlp")
    feats = features(model)
    out = model.vpg(feats)
    assert out.shape == (2, feats.shape[1], 48)
    assert torch.allclose(out, torch.nn.functional.gelu(model.vpg.fc(feats)))
    # Each patch is mapped independently: changing one patch changes only its own prompt.
    bumped = feats.clone()
    bumped[:, 3] += 1.0
    diff = (model.vpg(bumped) - out).abs().sum(-1)
    assert diff[:, 3].min() > 0 and diff[:, :3].max() == 0 and diff[:, 4:].max() == 0


def test_abstractor_prompts_queries_plus_end_prompt(tiny_paths):
    model = build(tiny_paths, "abstractor")
    vpg = model.vpg.eval()
    feats = features(model)
    out = vpg(feats)
    assert out.shape == (2, 7, 32) and vpg.num_prompts(17) == 7
    # The learned end-of-vision prompt is appended unchanged, the same for every image.
    assert torch.equal(out[0, -1], vpg.end_prompt[0, 0]) and torch.equal(out[1, -1], vpg.end_prompt[0, 0])
    # Queries read the patches: other images give other query outputs.
    assert not torch.allclose(out[0, :-1], out[1, :-1])
    no_end = build(tiny_paths, "abstractor", end_prompt=False).vpg
    assert no_end(feats).shape[1] == 6 and no_end.end_prompt is None
    # A vision width other than the abstractor width goes through an input Linear.
    assert isinstance(build(tiny_paths, "abstractor", hidden_size=16, num_attention_heads=2).vpg.vision_proj,
                      torch.nn.Linear)
    with pytest.raises(ConfigError, match="divisible"):
        build(tiny_paths, "abstractor", num_attention_heads=5)


def test_instruct_qformer_reads_the_instruction(tiny_paths):
    model = build(tiny_paths, "instruct-qformer")
    vpg = model.vpg.eval()
    assert vpg.uses_instruction and model.vpg.tokenizer is not None
    feats = features(model, 1).expand(2, -1, -1)
    out = vpg(feats, ["describe the image", "what colour is the square?"])
    assert out.shape == (2, 4, 32)
    assert not torch.allclose(out[0], out[1])  # same image, different instruction
    same = vpg(feats, ["describe the image", "describe the image"])
    assert torch.allclose(same[0], same[1], atol=1e-6)
    with pytest.raises(ConfigError, match="one instruction per image"):
        vpg(feats, ["only one"])


def test_instruct_qformer_config_errors_and_bert_init(tiny_paths):
    with pytest.raises(ConfigError, match="text_input"):
        build(tiny_paths, "instruct-qformer", text_input=False)
    no_tok = build_model(tiny_spec(tiny_paths, vpg="instruct-qformer"))
    with pytest.raises(ConfigError, match="no tokenizer"):
        no_tok.vpg(features(no_tok), ["hi", "there"])
    init = build_model(tiny_spec(tiny_paths, vpg="instruct-qformer", init_from=str(tiny_paths["bert"])))
    assert "text_embeddings.word_embeddings.weight" in init.vpg.loaded_from_bert
    assert init.vpg.tokenizer.truncation_side == "left"


def _abstractor_params(width=1024, inner=2816, layers=6, queries=64) -> int:
    linear = lambda i, o: i * o + o  # noqa: E731
    per_layer = 3 * 2 * width + 4 * linear(width, width) + 2 * linear(width, inner) + 2 * inner + linear(inner, width)
    return layers * per_layer + queries * width + width


def test_default_parameter_counts_are_reported():
    counts = {name: describe(get("vpg", name)) for name in VPGS}
    assert counts["linear"]["default_params"] == 0
    assert counts["mlp"]["default_params"] == 1024 * 4096 + 4096
    assert counts["abstractor"]["default_params"] == _abstractor_params()
    assert counts["abstractor"]["default_params_vision_width"] == 1024
    assert counts["qformer"]["default_params_vision_width"] == 1408
    # The instruction branch adds BERT's word/position embeddings and the text feed-forward layers.
    assert 100e6 < counts["qformer"]["default_params"] < counts["instruct-qformer"]["default_params"] < 200e6


def test_components_json_lists_default_params():
    from vpgtrans.cli import main

    result = CliRunner().invoke(main, ["components", "--json", "--kind", "vpg"])
    assert result.exit_code == 0, result.output
    items = {d["name"]: d for d in json.loads(result.stdout)}
    assert set(VPGS) <= set(items)
    assert all(isinstance(items[n]["default_params"], int) for n in VPGS)


@pytest.mark.parametrize("vpg", VPGS)
def test_every_vpg_saves_and_reloads_exactly(tiny_paths, tmp_path, vpg):
    from vpgtrans.checkpoint import load_model, save_model

    model = build(tiny_paths, vpg, "llama").eval()
    with torch.no_grad():
        for p in model.vpg.parameters():  # make sure reload does not just reproduce the seeded init
            p.add_(0.01)
    feats = features(model)
    instructions = INSTRUCTIONS if model.vpg.uses_instruction else None
    reloaded = load_model(save_model(model, tmp_path / vpg)).eval()
    assert type(reloaded.vpg) is type(model.vpg)
    with torch.no_grad():
        assert torch.equal(model.prompts(feats, instructions), reloaded.prompts(feats, instructions))
