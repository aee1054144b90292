"""Round trips written from a Hugging Face user's side: only stock transformers calls touch the export.

For every format and backend: `AutoProcessor.from_pretrained(dir)` + `<Class>.from_pretrained(dir)` +
the chat template + `generate` must give the text `vpgtrans generate` gives, greedy and beam, with a batch
of prompts of different lengths.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from vpgtrans.checkpoint import save_model
from vpgtrans.cli import main
from vpgtrans.formats import export_model
from vpgtrans.interfaces import GenerationConfig
from vpgtrans.model import build_model
from vpgtrans.testing import tiny_images, tiny_spec

QUESTIONS = ["what colour is it", "", "describe the picture in detail please and name every shape"]
MINIGPT4 = {"text": "###Human: <Img><ImageHere></Img> {instruction} ###Assistant: ", "end": "###"}
LLAVA = {"text": "USER: <ImageHere>\n{instruction} ASSISTANT:"}
# (format, llm, vision, vpg + config, template)
CASES = [
    ("hf-blip2", "opt", "blip2-vit", {}, {}),
    ("hf-blip2", "llama", "blip2-vit", {}, {}),
    ("hf-blip2", "t5", "blip2-vit", {}, {}),
    ("hf-blip2", "llama", "blip2-vit", {}, MINIGPT4),
    ("hf-blip2", "t5", "blip2-vit", {}, MINIGPT4),
    ("hf-instructblip", "opt", "blip2-vit", {"vpg": "instruct-qformer"}, {}),
    ("hf-llava", "opt", "clip-vit", {"vpg": "mlp", "hidden_size": 32}, {}),
    ("hf-llava", "llama", "clip-vit", {"vpg": "linear", "drop_cls": True}, LLAVA),
    ("hf-llava", "llama", "clip-vit", {"vpg": "mlp", "hidden_size": 32}, MINIGPT4),
]
STOCK = {"hf-blip2": "Blip2ForConditionalGeneration", "hf-instructblip": "InstructBlipForConditionalGeneration",
         "hf-llava": "LlavaForConditionalGeneration"}


def _model(tiny_paths, llm, vision, vpg_cfg, template):
    torch.manual_seed(0)
    vpg_cfg = dict(vpg_cfg)
    if vpg_cfg.get("vpg") == "instruct-qformer":
        vpg_cfg["tokenizer"] = str(tiny_paths["bert"])
    spec = tiny_spec(tiny_paths, llm=llm, vision=vision, **vpg_cfg)
    spec["template"] = template
    model = build_model(spec).eval()
    with torch.no_grad():  # far from init, so the image matters to every generated token
        for p in [*model.vpg.parameters(), *model.projector.parameters()]:
            p.add_(torch.randn_like(p) * 0.3)
    return model


def stock_generate(where, cls_name, images, questions, **gen):
    """What a user writes after reading the export's README.md: nothing from vpgtrans."""
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(where)
    model = getattr(transformers, cls_name).from_pretrained(where).eval()
    prompts = [processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
        add_generation_prompt=True, tokenize=False) for q in questions]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, **gen)
    if not model.config.text_config.is_encoder_decoder:
        out = out[:, inputs["input_ids"].shape[1]:]
    return processor.batch_decode(out, skip_special_tokens=True)


@pytest.mark.parametrize("fmt,llm,vision,vpg_cfg,template", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[3].get('vpg', 'qformer')}-{'tmpl' if c[4] else 'plain'}"
                              for c in CASES])
def test_stock_snippet_gives_vpgtrans_text(tiny_paths, tmp_path, fmt, llm, vision, vpg_cfg, template):
    model = _model(tiny_paths, llm, vision, vpg_cfg, template)
    export_model(model, tmp_path / "hf", fmt)
    images = tiny_images(3, size=48, seed=1)
    for beams in (1, 3):
        # min_new_tokens: untrained tiny LLMs often end at once, which would compare empty strings.
        gen = dict(max_new_tokens=8, min_new_tokens=3, num_beams=beams)
        ours = model.generate(images, QUESTIONS, config=GenerationConfig(**gen))
        if fmt == "hf-instructblip":
            # InstructBlipProcessor pads the Q-Former's text on the LLM's side (left); the Q-Former was trained
            # on right padding, so the model card says: one prompt per call (or prompts of one token length).
            theirs = [stock_generate(tmp_path / "hf", STOCK[fmt], [i], [q], **gen)[0]
                      for i, q in zip(images, QUESTIONS)]
        else:
            theirs = stock_generate(tmp_path / "hf", STOCK[fmt], images, QUESTIONS, **gen)
        end = model.template.end
        theirs = [(t.split(end)[0] if end else t).strip() for t in theirs]
        assert theirs == ours, (beams, theirs, ours)
    assert any(ours), "all generations empty: the comparison would prove nothing"
    card = (tmp_path / "hf" / "README.md").read_text()
    assert f"from transformers import AutoProcessor, {STOCK[fmt]}" in card and "apply_chat_template" in card


def test_exported_files_a_user_needs(tiny_paths, tmp_path):
    """Left padding, the checkpoint's stop ids in the generation config, the chat template, the model card."""
    from transformers import AutoTokenizer, GenerationConfig as HFGenerationConfig

    llm_dir = tmp_path / "llama"
    shutil.copytree(tiny_paths["llama"], llm_dir)
    gen_file = llm_dir / "generation_config.json"
    eos = json.loads(gen_file.read_text())["eos_token_id"]
    gen_file.write_text(json.dumps({**json.loads(gen_file.read_text()), "eos_token_id": [7, eos]}))
    model = _model({**tiny_paths, "llama": llm_dir}, "llama", "blip2-vit", {}, MINIGPT4)
    save_model(model, tmp_path / "model", extra={"training": {"recipe": "minigpt4_stage2", "steps": 12}})
    (tmp_path / "eval.json").write_text(json.dumps({"metrics": {"cider": 0.4321, "n": 5}}))
    res = CliRunner().invoke(main, ["export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "hf"),
                                    "--scores", str(tmp_path / "eval.json")])
    assert res.exit_code == 0, res.output
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.padding_side == "left" and tok.chat_template
    gen = HFGenerationConfig.from_pretrained(tmp_path / "hf")
    assert gen.eos_token_id == [7, eos] and gen.do_sample is False
    card = (tmp_path / "hf" / "README.md").read_text()
    for words in ("minigpt4_stage2", "| cider | `0.4321` |", "###Human", ".split('###')[0]", "padding=True"):
        assert words in card, words
    t5 = _model(tiny_paths, "t5", "blip2-vit", {}, {})
    export_model(t5, tmp_path / "t5", "hf-blip2")
    assert AutoTokenizer.from_pretrained(tmp_path / "t5").padding_side == "right"


def test_t5_export_runs_the_image_only_captioning_snippet(tiny_paths, tmp_path):
    """`processor(images=…)` then `generate(**inputs)`: the BLIP-2 model card's first example (no text)."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    model = _model(tiny_paths, "t5", "blip2-vit", {}, {})
    export_model(model, tmp_path / "hf", "hf-blip2")
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    stock = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    images = tiny_images(2, seed=3)
    out = stock.generate(**processor(images=images, return_tensors="pt"), max_new_tokens=6, min_new_tokens=2)
    theirs = [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
    assert theirs == model.generate(images, "", config=GenerationConfig(max_new_tokens=6, min_new_tokens=2))


def test_generation_stops_on_the_checkpoints_own_eos(tiny_paths, monkeypatch):
    """vpgtrans generate honours the LLM's generation config (BLIP-2 OPT stops on "\\n"), not only </s>."""
    model = _model(tiny_paths, "opt", "blip2-vit", {}, {})
    lm = model.llm.model
    lengths = []
    real = lm.generate

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        lengths.append(out.shape[1])
        return out

    monkeypatch.setattr(lm, "generate", counting)
    images = tiny_images(2, seed=4)
    cfg = GenerationConfig(max_new_tokens=8, min_new_tokens=2)
    model.generate(images, "", config=cfg)
    lm.generation_config.eos_token_id = list(range(lm.config.vocab_size))  # every token ends the text
    model.generate(images, "", config=cfg)
    assert lengths[1] <= 2 < lengths[0]


def test_models_no_stock_class_holds_are_refused_in_one_line(tiny_paths, tmp_path):
    """OPT-350m's project_in layout and mPLUG-Owl's abstractor: a one-line refusal, not a size-mismatch crash."""
    from transformers import OPTConfig, OPTForCausalLM

    from vpgtrans.formats import ExportRefused

    opt350 = tmp_path / "opt350"
    shutil.copytree(tiny_paths["opt"], opt350)
    cfg = OPTConfig.from_pretrained(opt350)
    cfg.word_embed_proj_dim = cfg.hidden_size // 2
    OPTForCausalLM(cfg).save_pretrained(opt350)
    proj = build_model(tiny_spec({**tiny_paths, "opt": opt350}, "opt"))
    owl = build_model(tiny_spec(tiny_paths, "llama", vision="clip-vit", vpg="abstractor", num_query_tokens=4,
                                hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    for model, fmt, words in [(proj, "hf-blip2", "project_in"), (owl, "hf-blip2", "no stock transformers class"),
                              (owl, "hf-llava", "no stock transformers class"), (proj, "hf-llava", "mlp"),
                              (proj, "hf-instructblip", "no instruction-aware")]:
        with pytest.raises(ExportRefused, match=words) as info:
            export_model(model, tmp_path / "x", fmt)
        assert "\n" not in str(info.value) and " — " in str(info.value)
        # The demo's OPT-s → OPT-m model: no format holds it, and no refusal sends the user to another that fails.
        assert "no export format holds this model" in str(info.value) and "--format" not in str(info.value)
    assert not (tmp_path / "x").exists()


def test_imported_llava_preprocesses_like_its_clip_processor(tiny_paths, tmp_path):
    """CLIPImageProcessor resizes the short side and centre-crops: an imported model must see the same pixels."""
    from transformers import AutoProcessor, CLIPImageProcessor, LlavaProcessor

    from vpgtrans.checkpoint import load_model
    from vpgtrans.formats import import_model

    model = _model(tiny_paths, "llama", "clip-vit", {"vpg": "mlp", "hidden_size": 32}, LLAVA)
    export_model(model, tmp_path / "hf", "hf-llava")
    source = AutoProcessor.from_pretrained(tmp_path / "hf")
    clip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
                              image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], resample=3)
    LlavaProcessor(image_processor=clip, tokenizer=source.tokenizer, patch_size=source.patch_size,
                   vision_feature_select_strategy=source.vision_feature_select_strategy,
                   num_additional_image_tokens=1, chat_template=source.tokenizer.chat_template
                   ).save_pretrained(tmp_path / "hf")
    back = load_model(import_model(tmp_path / "hf", tmp_path / "imported", "hf-llava")).eval()
    images = [tiny_images(1, size=40)[0].resize((40, 64)), tiny_images(1, size=40, seed=2)[0].resize((70, 36))]
    want = AutoProcessor.from_pretrained(tmp_path / "hf").image_processor(images, return_tensors="pt").pixel_values
    torch.testing.assert_close(back.vision.preprocess(images), want, atol=1e-5, rtol=0)
    back.vision.crop = None  # what vpgtrans did before: straight resize to 32x32, same statistics
    assert (back.vision.preprocess(images) - want).abs().max() > 0.1
    back.vision.crop = (32, (32, 32))
    # Exported again, the processor still crops.
    export_model(back, tmp_path / "again", "hf-llava")
    again = AutoProcessor.from_pretrained(tmp_path / "again").image_processor(images, return_tensors="pt")
    torch.testing.assert_close(again.pixel_values, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt,llm,vision,vpg_cfg,template", [CASES[2], CASES[8]], ids=["blip2-t5", "llava-minigpt4"])
def test_model_card_snippet_runs_verbatim(tiny_paths, tmp_path, capsys, fmt, llm, vision, vpg_cfg, template):
    """The README.md an export writes: its Python block, run as is, prints vpgtrans's text."""
    import ast

    from vpgtrans.formats.usage import EXAMPLE_INSTRUCTION

    model = _model(tiny_paths, llm, vision, vpg_cfg, template)
    export_model(model, tmp_path / "hf", fmt)
    images = tiny_images(2, size=48, seed=5)
    for name, image in zip(("photo.jpg", "other.jpg"), images):
        image.save(tmp_path / name, format="PNG")
    card = (tmp_path / "hf" / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    code = (code.replace("<this directory>", str(tmp_path / "hf")).replace('"photo.jpg"', repr(str(tmp_path / "photo.jpg")))
            .replace('"other.jpg"', repr(str(tmp_path / "other.jpg"))))
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {})
    printed = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == model.generate(images, [EXAMPLE_INSTRUCTION, ""], config=GenerationConfig(max_new_tokens=30))


def test_imported_blip2_stops_where_the_stock_model_stops(tiny_paths, tmp_path):
    """A published BLIP-2 OPT ends on "\\n" (its text config's eos): the imported model must stop there too."""
    from vpgtrans.checkpoint import load_model
    from vpgtrans.formats import import_model
    from vpgtrans_adapters.llm import stop_token_ids

    model = _model(tiny_paths, "opt", "blip2-vit", {}, {})
    export_model(model, tmp_path / "hf", "hf-blip2")
    newline = model.llm.tokenizer("\n", add_special_tokens=False).input_ids[-1]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["text_config"]["eos_token_id"] = newline  # as in Salesforce/blip2-opt-2.7b
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    (tmp_path / "hf" / "vpgtrans_export.json").unlink()
    back = load_model(import_model(tmp_path / "hf", tmp_path / "imported", "hf-blip2")).eval()
    assert stop_token_ids(back.llm)[0] == newline


def test_instructblip_export_cuts_long_instructions_as_the_model_does(tiny_paths, tmp_path):
    """max_instruction_len, on the same side: a long instruction gives the Q-Former the same ids and the same text."""
    from transformers import AutoProcessor

    model = _model(tiny_paths, "opt", "blip2-vit", {"vpg": "instruct-qformer", "max_instruction_len": 6}, {})
    export_model(model, tmp_path / "hf", "hf-instructblip")
    long = "please look closely and tell me what you see here: " * 3 + "what is in the picture?"
    ours_ids, _ = model.vpg.tokenize([long], torch.device("cpu"))
    assert ours_ids.shape[1] == 6  # the instruction is longer than the model reads
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": long}]}],
        add_generation_prompt=True, tokenize=False)
    image = tiny_images(1, size=48, seed=2)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    assert torch.equal(inputs["qformer_input_ids"], ours_ids)
    gen = dict(max_new_tokens=8, min_new_tokens=3)
    theirs = stock_generate(tmp_path / "hf", STOCK["hf-instructblip"], image, [long], **gen)
    assert [t.strip() for t in theirs] == model.generate(image, [long], config=GenerationConfig(**gen))
    card = (tmp_path / "hf" / "README.md").read_text()
    # The card's Notes advise one prompt per call for a decoder-only LLM: its snippet does so.
    assert "one prompt per call" in card and "for image, prompt in zip(images, prompts)" in card
    assert "padding=True" not in card.split("```python")[1].split("```")[0]
