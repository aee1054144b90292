"""LoRA on the LLM through peft: what trains, peft-format save, exact reload, merge for export."""

from __future__ import annotations

import json

import pytest
import torch

from vpgtrans.checkpoint import load_model, read_manifest, save_model
from vpgtrans.errors import ConfigError
from vpgtrans.interfaces import GenerationConfig, TextSample
from vpgtrans.lora import apply_lora, load_adapter, lora_parameters, merge_lora
from vpgtrans.model import build_model
from vpgtrans.testing import tiny_images, tiny_spec

SAMPLES = [TextSample(target="a red circle left of a blue square"), TextSample(after="what colour?", target="red")]
DEFAULT_TARGETS = {"opt": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"], "t5": ["q", "v"]}
pytestmark = pytest.mark.usefixtures("one_thread")


def lora_model(paths, llm: str = "opt", **lora):
    torch.manual_seed(0)
    spec = tiny_spec(paths, llm=llm)
    spec["lora"] = {"r": 4, **lora}
    return build_model(spec)


def features(model):
    return model.encode_images(model.vision.preprocess(tiny_images(2)))


def train_steps(model, feats, n: int = 3, lr: float = 1e-2) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(n):
        loss = model(feats, SAMPLES)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("llm", ["opt", "llama", "t5"])
def test_lora_trains_only_adapter_vpg_projector_and_reloads_exactly(tiny_paths, tmp_path, llm):
    model = lora_model(tiny_paths, llm)
    assert model.spec.lora["target_modules"] == DEFAULT_TARGETS[llm]
    lora = lora_parameters(model)
    assert lora and all(p.requires_grad for p in lora.values())
    assert all(name.split(".")[-4] in DEFAULT_TARGETS[llm] for name in lora)  # ...q_proj.lora_A.default.weight
    for name, p in model.named_parameters():
        assert p.requires_grad == (name.startswith(("vpg.", "projector.")) or name in lora), name
    assert model.parameter_report()["llm"]["trainable"] == sum(p.numel() for p in lora.values())

    feats = features(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, feats)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("lora_B" in k for k in changed) and any(k.startswith("vpg.") for k in changed)
    assert all(k.startswith(("vpg.", "projector.")) or "lora_" in k for k in changed), sorted(changed)[:5]

    out = save_model(model, tmp_path / "m")
    adapter = out / "lora"
    assert (adapter / "adapter_model.safetensors").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and sorted(config["target_modules"]) == \
        sorted(DEFAULT_TARGETS[llm])
    assert read_manifest(out)["spec"]["lora"]["r"] == 4

    reloaded = load_model(out)
    with torch.no_grad():
        assert torch.equal(model.logits(feats, SAMPLES), reloaded.logits(feats, SAMPLES))
    cfg = GenerationConfig(max_new_tokens=5)
    assert model.generate(features=feats, config=cfg) == reloaded.generate(features=feats, config=cfg)


def test_peft_folder_loads_in_peft_and_back(tiny_paths, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = lora_model(tiny_paths)
    train_steps(model, features(model), n=2)
    out = save_model(model, tmp_path / "m")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_paths["opt"])),
                                           str(out / "lora")).eval()
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, model.llm.model(input_ids=ids).logits)
    fresh = lora_model(tiny_paths)
    load_adapter(fresh, out / "lora")
    trained = lora_parameters(model)
    assert all(torch.equal(p, trained[k]) for k, p in lora_parameters(fresh).items())


def test_merge_lora_for_export_keeps_outputs(tiny_paths, tmp_path):
    model = lora_model(tiny_paths, "llama")
    feats = features(model)
    train_steps(model, feats)
    with torch.no_grad():
        expected = model.logits(feats, SAMPLES)
    merge_lora(model, tmp_path / "merged-llm")
    assert not lora_parameters(model) and model.spec.lora is None and not model.llm.trainable
    assert all(not p.requires_grad for p in model.llm.parameters())
    with torch.no_grad():
        assert torch.allclose(model.logits(feats, SAMPLES), expected, atol=1e-5)
    out = save_model(model, tmp_path / "exported")
    assert not (out / "lora").exists() and read_manifest(out)["spec"]["lora"] is None
    with torch.no_grad():
        assert torch.allclose(load_model(out).logits(feats, SAMPLES), expected, atol=1e-5)


def test_lora_dropout_follows_train_mode(tiny_paths):
    model = lora_model(tiny_paths, dropout=0.5)
    dropouts = [m for n, m in model.llm.model.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and not any(d.training for d in dropouts)  # a freshly built model infers deterministically
    model.train()
    assert all(d.training for d in dropouts)
    model.eval()
    assert not any(d.training for d in dropouts)


def test_lora_config_errors(tiny_paths):
    with pytest.raises(ConfigError, match="target modules"):
        lora_model(tiny_paths, target_modules=["no_such_proj"])
    with pytest.raises(ConfigError, match="unknown key"):
        lora_model(tiny_paths, rank=4)
    model = lora_model(tiny_paths, target_modules=["k_proj"])
    assert all(".k_proj.lora_" in n for n in lora_parameters(model))
    with pytest.raises(ConfigError, match="already applied"):
        apply_lora(model, {"r": 2})
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        merge_lora(build_model(tiny_spec(tiny_paths)))
