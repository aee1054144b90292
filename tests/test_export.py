"""Export to stock transformers (BLIP-2, InstructBLIP, LLaVA) and import back, on tiny real models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from vpgtrans.checkpoint import load_model, read_manifest, save_model
from vpgtrans.cli import main
from vpgtrans.errors import ConfigError
from vpgtrans.formats import ExportRefused, export_model, import_model, stock_inputs
from vpgtrans.model import build_model
from vpgtrans.testing import tiny_images, tiny_spec

INSTRUCTIONS = ["what colour is it", "describe the picture in detail please"]


def _model(tiny_paths, llm="opt", seed=0, vision_extra=None, **vpg):
    """A tiny model whose VPG and projector are far from their initialisation (so a wrong copy shows)."""
    torch.manual_seed(seed)
    spec = tiny_spec(tiny_paths, llm=llm, **vpg)
    spec["vision"].update(vision_extra or {})
    model = build_model(spec).eval()
    with torch.no_grad():
        for p in model.vpg.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        model.projector.weight.normal_(0, 0.3)
        model.projector.bias.normal_(0, 0.1)
    return model


def _samples(model, instructions=("a red", "")):
    return [model.template.sample(instructions[0], "circle left of the tree"),
            model.template.sample(instructions[1], "big blue square")]


def _ours(model, samples, instructions=None):
    pixels = model.vision.preprocess(tiny_images(2))
    with torch.no_grad():
        feats = model.encode_images(pixels)
        return pixels, model.logits(feats, samples, instructions), model(feats, samples, instructions)


def _theirs(stock, pixels, inputs):
    with torch.no_grad():
        out = stock(pixel_values=pixels, **inputs)
    return out.logits, out.loss


def _close(ours, theirs):
    """Same logits at every position and every vocabulary entry both have (the export adds the image token)."""
    assert theirs.shape[:2] == ours.shape[:2]
    assert theirs.shape[-1] >= ours.shape[-1]
    torch.testing.assert_close(theirs[..., : ours.shape[-1]], ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("llm", ["opt", "llama", "t5"])
def test_hf_blip2_stock_model_gives_vpgtrans_logits_and_imports_back(tiny_paths, tmp_path, llm):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    model = _model(tiny_paths, llm)
    samples = _samples(model)
    pixels, ours, _ = _ours(model, samples)
    result = export_model(model, tmp_path / "blip2", "hf-blip2")
    stock = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "blip2").eval()
    assert stock.config.use_decoder_only_language_model == (llm != "t5")
    inputs = stock_inputs(model, samples, result.image_token_id)
    assert int((inputs["input_ids"] == result.image_token_id).sum()) == 2 * 4
    logits, _ = _theirs(stock, pixels, inputs)
    _close(ours, logits)
    # (The stock loss differs slightly here: its softmax also covers the image-token row the export added.)
    # The image really flows through the stock model: other images, other logits.
    other, _ = _theirs(stock, pixels.flip(0), inputs)
    assert (other[..., : ours.shape[-1]] - ours).abs().max() > 1e-3

    # Its processor builds vpgtrans's own sequence and pixels for a prompt.
    processor = Blip2Processor.from_pretrained(tmp_path / "blip2")
    enc = processor(images=tiny_images(1), text="a red", return_tensors="pt")
    prompt = [model.template.sample("a red")]
    if llm == "t5":
        want, soft, _ = model.llm._encoder_inputs(4, prompt)
    else:
        want, soft, _, _ = model.llm._sequences(4, prompt, 0, False, False)
    assert enc.input_ids.tolist() == want.masked_fill(soft, result.image_token_id).tolist()
    torch.testing.assert_close(enc.pixel_values, model.vision.preprocess(tiny_images(1)), atol=1e-5, rtol=0)

    # Import back: identical logits, frozen parts beside the weights, the export's extra token undone.
    out = import_model(tmp_path / "blip2", tmp_path / "imported", "hf-blip2")
    spec = read_manifest(out)["spec"]
    assert spec["vision"]["path"] == str((tmp_path / "imported" / "vision").resolve())
    assert spec["llm"]["path"] == str((tmp_path / "imported" / "llm").resolve())
    back = load_model(out).eval()
    assert "<image>" not in back.llm.tokenizer.get_vocab()
    assert torch.equal(_ours(back, samples)[1], ours)


def test_import_of_a_foreign_blip2_dir_matches_its_stock_forward(tiny_paths, tmp_path):
    """A directory vpgtrans did not write (no marker): the imported model reproduces the stock model."""
    from transformers import Blip2ForConditionalGeneration

    model = _model(tiny_paths, "opt", seed=2)
    result = export_model(model, tmp_path / "blip2", "hf-blip2")
    (tmp_path / "blip2" / "vpgtrans_export.json").unlink()
    shutil.rmtree(tmp_path / "blip2" / "vpgtrans_tokenizer")
    back = load_model(import_model(tmp_path / "blip2", tmp_path / "imported", "hf-blip2")).eval()
    assert back.llm.tokenizer.convert_tokens_to_ids("<image>") == result.image_token_id
    stock = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "blip2").eval()
    samples = _samples(back)
    pixels, ours, _ = _ours(back, samples)
    logits, _ = _theirs(stock, pixels, stock_inputs(back, samples, result.image_token_id))
    assert logits.shape == ours.shape
    _close(ours, logits)


def test_hf_instructblip_matches_and_round_trips(tiny_paths, tmp_path, llm="opt"):
    from transformers import InstructBlipForConditionalGeneration

    model = _model(tiny_paths, llm, vpg="instruct-qformer", tokenizer=str(tiny_paths["bert"]))
    samples = _samples(model, INSTRUCTIONS)
    pixels, ours, _ = _ours(model, samples, INSTRUCTIONS)
    result = export_model(model, tmp_path / "ib", "hf-instructblip")
    stock = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "ib").eval()
    inputs = stock_inputs(model, samples, result.image_token_id, instructions=INSTRUCTIONS)
    logits, _ = _theirs(stock, pixels, inputs)
    _close(ours, logits)
    # The instruction reaches the Q-Former: another instruction changes the stock logits.
    inputs_swapped = stock_inputs(model, samples, result.image_token_id, instructions=INSTRUCTIONS[::-1])
    assert (_theirs(stock, pixels, inputs_swapped)[0][..., : ours.shape[-1]] - ours).abs().max() > 1e-4
    back = load_model(import_model(tmp_path / "ib", tmp_path / "imported", "hf-instructblip")).eval()
    assert back.spec.vpg["name"] == "instruct-qformer"
    assert torch.equal(_ours(back, samples, INSTRUCTIONS)[1], ours)


LLAVA_TEMPLATE = {"text": "USER: <ImageHere>\n{instruction} ASSISTANT:"}


@pytest.mark.parametrize("llm,vpg,vpg_cfg,vision_extra,template", [
    ("opt", "mlp", {"hidden_size": 32}, {"drop_cls": True, "layer": -2}, {}),
    ("llama", "linear", {"drop_cls": True}, {}, LLAVA_TEMPLATE),
])
def test_hf_llava_matches_and_round_trips(tiny_paths, tmp_path, llm, vpg, vpg_cfg, vision_extra, template):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    torch.manual_seed(0)
    spec = tiny_spec(tiny_paths, llm=llm, vision="clip-vit", vpg=vpg, **vpg_cfg)
    spec["vision"].update(vision_extra)
    spec["template"] = template
    model = build_model(spec).eval()
    with torch.no_grad():
        for p in [*model.vpg.parameters(), *model.projector.parameters()]:
            p.normal_(0, 0.3)
    samples = _samples(model)
    pixels, ours, _ = _ours(model, samples)
    result = export_model(model, tmp_path / "llava", "hf-llava")
    stock = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    assert stock.config.projector_hidden_act == ("gelu" if vpg == "mlp" else "linear")
    logits, _ = _theirs(stock, pixels, stock_inputs(model, samples, result.image_token_id))
    _close(ours, logits)
    if template:  # text before the image, as LLaVA's own prompts: its processor builds vpgtrans's sequence
        enc = LlavaProcessor.from_pretrained(tmp_path / "llava")(
            images=tiny_images(1), text="USER: <image>\nwhat colour ASSISTANT:", return_tensors="pt")
        want, soft, _, _ = model.llm._sequences(model.vpg.num_prompts(model.vision.num_tokens),
                                                [model.template.sample("what colour")], 0, False, False)
        assert enc.input_ids.tolist() == want.masked_fill(soft, result.image_token_id).tolist()
    back = load_model(import_model(tmp_path / "llava", tmp_path / "imported", "hf-llava")).eval()
    assert back.spec.vpg["name"] == vpg and back.spec.template == template
    assert torch.equal(_ours(back, samples)[1], ours)


def test_lora_is_merged_or_shipped_in_peft_format(tiny_paths, tmp_path):
    from peft import PeftModel
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(3)
    spec = tiny_spec(tiny_paths, llm="llama")
    spec["lora"] = {"r": 4}
    model = build_model(spec).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    samples = _samples(model)
    pixels, ours, _ = _ours(model, samples)
    for mode in ("merge", "peft"):
        result = export_model(model, tmp_path / mode, "hf-blip2", lora=mode)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "export changed the model"
        stock = Blip2ForConditionalGeneration.from_pretrained(tmp_path / mode).eval()
        assert not any("lora_" in n for n, _ in stock.named_parameters())
        inputs = stock_inputs(model, samples, result.image_token_id)
        if mode == "peft":
            assert (tmp_path / mode / "lora" / "adapter_config.json").exists()
            base, _ = _theirs(stock, pixels, inputs)
            assert (base[..., : ours.shape[-1]] - ours).abs().max() > 1e-3  # unmerged: the base alone differs
            stock.language_model = PeftModel.from_pretrained(stock.language_model, tmp_path / mode / "lora").eval()
        else:
            assert not (tmp_path / mode / "lora").exists()
        _close(ours, _theirs(stock, pixels, inputs)[0])
    # Importing the peft export brings the adapter back as the model's own LoRA.
    back = load_model(import_model(tmp_path / "peft", tmp_path / "imported", "hf-blip2")).eval()
    assert back.spec.lora["r"] == 4
    assert torch.equal(_ours(back, samples)[1], ours)


def test_lavis_ln_vision_on_top_of_the_vit_layernorm_is_refused(tiny_paths, tmp_path):
    model = build_model(tiny_spec(tiny_paths, "opt", vision_layernorm=True))
    with pytest.raises(ExportRefused, match="two LayerNorms") as info:
        export_model(model, tmp_path / "refused", "hf-blip2")
    assert "vision_layernorm=false" in str(info.value)
    assert not (tmp_path / "refused").exists()


def test_formats_that_cannot_represent_a_model_refuse_in_one_line(tiny_paths, tmp_path):
    qformer = build_model(tiny_spec(tiny_paths, "opt"))
    clip = build_model(tiny_spec(tiny_paths, "opt", vision="clip-vit"))
    mlp_t5 = build_model(tiny_spec(tiny_paths, "t5", vision="clip-vit", vpg="mlp", hidden_size=32))
    mlp_wide = build_model(tiny_spec(tiny_paths, "opt", vision="clip-vit", vpg="mlp", hidden_size=48))
    cases = [(clip, "hf-blip2", "Blip2VisionModel"), (qformer, "hf-instructblip", "no instruction-aware Q-Former"),
             (qformer, "hf-llava", "mlp"), (mlp_t5, "hf-llava", "decoder-only"), (mlp_wide, "hf-llava", "wide")]
    for model, fmt, words in cases:
        with pytest.raises(ExportRefused, match=words) as info:
            export_model(model, tmp_path / "x", fmt)
        assert "\n" not in str(info.value) and " — " in str(info.value)
    with pytest.raises(ConfigError, match="unknown format"):
        export_model(qformer, tmp_path / "x", "onnx")
    assert not (tmp_path / "x").exists()


def test_every_refusal_names_a_format_that_accepts_the_model_or_none(tiny_paths, tmp_path):
    from vpgtrans.formats import accepting_formats

    qformer = build_model(tiny_spec(tiny_paths, "opt"))
    clip_mlp = build_model(tiny_spec(tiny_paths, "opt", vision="clip-vit", vpg="mlp", hidden_size=32))
    clip_qformer = build_model(tiny_spec(tiny_paths, "opt", vision="clip-vit"))
    ln_vision = build_model(tiny_spec(tiny_paths, "opt", vision_layernorm=True))
    assert accepting_formats(qformer) == ["hf-blip2"] and accepting_formats(clip_mlp) == ["hf-llava"]
    assert accepting_formats(clip_qformer) == accepting_formats(ln_vision) == []
    for model, fmt, fix in [(qformer, "hf-llava", "--format hf-blip2"),
                            (qformer, "hf-instructblip", "--format hf-blip2"),
                            (clip_mlp, "hf-blip2", "--format hf-llava"),
                            (clip_mlp, "hf-instructblip", "--format hf-llava"),
                            (clip_qformer, "hf-blip2", "no export format holds this model"),
                            (clip_qformer, "hf-llava", "no export format holds this model"),
                            (ln_vision, "hf-llava", "no export format holds this model")]:
        with pytest.raises(ExportRefused) as info:
            export_model(model, tmp_path / "x", fmt)
        refusal = str(info.value)
        assert fix in refusal and "instructblip" not in refusal.split(" — ")[1], refusal
    assert not (tmp_path / "x").exists()


def test_cli_export_then_import(tiny_paths, tmp_path):
    model = _model(tiny_paths, "opt")
    save_model(model, tmp_path / "model")
    runner = CliRunner()
    res = runner.invoke(main, ["export", "--model", str(tmp_path / "model"), "--format", "hf-blip2",
                               "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    assert "Blip2ForConditionalGeneration.from_pretrained" in res.output
    info = json.loads((tmp_path / "hf" / "vpgtrans_export.json").read_text())
    assert info["format"] == "hf-blip2" and info["added_rows"] == 1
    res = runner.invoke(main, ["import", "--format", "hf-blip2", "--src", str(tmp_path / "hf"),
                               "--out", str(tmp_path / "back")])
    assert res.exit_code == 0, res.output
    assert "VPG qformer" in res.output and read_manifest(tmp_path / "back")["imported_from"]["format"] == "hf-blip2"

    res = runner.invoke(main, ["export", "--model", str(tmp_path / "model"), "--format", "hf-llava",
                               "--out", str(tmp_path / "llava")])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and res.output.startswith("error: hf-llava represents")
    res = runner.invoke(main, ["import", "--format", "hf-llava", "--src", str(tmp_path / "hf"),
                               "--out", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "blip-2" in res.output and "--format" in res.output


LLAVA15_CHAT = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %} ASSISTANT:{% endfor %}")
BOS_FIRST_CHAT = ("{{ bos_token }}{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                  "<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")


def _stock_llava(tiny_paths, tmp_path, chat):
    """A LLaVA directory as published (no vpgtrans marker) whose processor ships `chat` (None: no chat template)."""
    model = build_model(tiny_spec(tiny_paths, "llama", vision="clip-vit", vpg="mlp", hidden_size=32)).eval()
    export_model(model, tmp_path / "src", "hf-llava")
    (tmp_path / "src" / "vpgtrans_export.json").unlink()
    if chat == "exported":  # the chat template the export wrote: vpgtrans's own `[image][BOS] text`
        return tmp_path / "src"
    for name in ("chat_template.jinja", "chat_template.json"):
        (tmp_path / "src" / name).unlink(missing_ok=True)
    if chat is not None:
        (tmp_path / "src" / "chat_template.jinja").write_text(chat)
    return tmp_path / "src"


@pytest.mark.parametrize("chat, text", [(LLAVA15_CHAT, "USER: <ImageHere>\n{instruction} ASSISTANT:"),
                                        (BOS_FIRST_CHAT, "<s><ImageHere>{instruction}"),
                                        ("exported", "<ImageHere>{instruction}")])
def test_llava_import_takes_the_prompt_layout_from_the_chat_template(tiny_paths, tmp_path, chat, text):
    src = _stock_llava(tiny_paths, tmp_path, chat)
    back = load_model(import_model(src, tmp_path / "imported", "hf-llava")).eval()
    assert back.spec.template == {"text": text}
    llm = back.llm
    ids, soft, _, _ = llm._sequences(back.vpg.num_prompts(back.vision.num_tokens), [back.template.sample("hi")], 0,
                                     False, False)
    bos = llm.tokenizer.bos_token_id
    assert ids[0].tolist().count(bos) == 1  # BOS once, wherever the layout puts it
    if chat == "exported":  # the soft prompts first, then BOS
        assert soft[0, 0] and ids[0, int(soft[0].sum())].item() == bos
    else:  # BOS first: before the image too
        assert ids[0, 0].item() == bos and not soft[0, 0]


def test_llava_import_without_a_chat_template_warns(tiny_paths, tmp_path, capsys):
    src = _stock_llava(tiny_paths, tmp_path, None)
    capsys.readouterr()
    back = load_model(import_model(src, tmp_path / "imported", "hf-llava"))
    assert back.spec.template == {}
    err = capsys.readouterr().err
    assert "warning:" in err and "ships no chat template" in err and "spec.template.text" in err
