"""Gemma-family LLMs scale their input embeddings inside the lookup: soft prompts and converters must follow."""

from __future__ import annotations

import shutil

import torch

from vpgtrans.model import build_model
from vpgtrans.testing import tiny_spec


def _tiny_gemma(tiny_paths, root):
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    path = root / "gemma"
    shutil.copytree(tiny_paths["llama"], path)  # the tiny SentencePiece-style tokenizer; weights replaced below
    for f in path.glob("model*.safetensors"):
        f.unlink()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(3)
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                              sliding_window=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    Gemma3ForCausalLM(config).save_pretrained(path)
    return path


def test_soft_prompts_live_in_gemmas_scaled_embedding_space(tiny_paths, tmp_path):
    spec = tiny_spec(tiny_paths, "llama")
    spec["llm"] = {"path": str(_tiny_gemma(tiny_paths, tmp_path))}
    llm = build_model(spec).llm
    emb = llm.model.get_input_embeddings()
    assert float(emb.embed_scale) > 1  # sqrt(32): the premise of this test
    matrix = llm.input_embedding_matrix()
    ids = torch.arange(3, 9)
    assert torch.allclose(matrix[ids], emb(ids))  # what the first layer sees, not the stored weight
    assert not torch.allclose(matrix[ids], emb.weight[ids])
    # A soft prompt equal to a token's row of that matrix means the same to the LLM as the token itself.
    with torch.no_grad():
        as_text = llm.model(input_ids=ids[None]).logits
        as_prompts = llm.model(inputs_embeds=matrix[ids][None]).logits
    assert torch.allclose(as_text, as_prompts, atol=1e-5)


def test_gemma_trains_and_generates_behind_the_generic_backend(tiny_paths, tmp_path):
    from vpgtrans.interfaces import GenerationConfig, TextSample
    from vpgtrans.testing import tiny_images

    spec = tiny_spec(tiny_paths, "llama")
    spec["llm"] = {"path": str(_tiny_gemma(tiny_paths, tmp_path))}
    torch.manual_seed(0)
    model = build_model(spec)
    assert model.spec.llm["name"] == "causal-lm" and type(model.llm.model).__name__ == "Gemma3ForCausalLM"
    feats = model.encode_images(model.vision.preprocess(tiny_images(2)))
    loss = model(feats, [TextSample(target="a red circle"), TextSample(after="what colour?", target="red")])
    loss.backward()
    assert torch.isfinite(loss) and model.projector.weight.grad.abs().sum() > 0
    out = model.generate(features=feats, prompt="describe", config=GenerationConfig(max_new_tokens=3))
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
